//! Launch wrappers of the model ops' kernels, on device buffers: `rmsnorm.cu`, `swiglu.cu`,
//! `rope.cu`, `cross_entropy.cu` and `embedding.cu`, each named and shaped as the CPU function
//! of `kernels::ops` it mirrors (rope positions are `u32` here, `usize` on the CPU). Index
//! arguments (targets, ids, positions) travel as `Indices`, checked on the host when uploaded:
//! the kernels do not bound-check them. Never run on a GPU.

use super::{
    BLOCK, GRID_X_MAX, GRID_Y_MAX, Gpu, GpuError, check_len, config, grid_dim, grid_stride, int,
    long, shape_err,
};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// One block of `BLOCK` threads per row, as the row-reduction kernels expect.
fn per_row(kernel: &'static str, rows: usize) -> Result<cudarc::driver::LaunchConfig, GpuError> {
    Ok(config((grid_dim(kernel, rows, GRID_X_MAX)?, 1), BLOCK))
}

/// Indices on the device (token ids, targets, rope positions), each checked on the host to be
/// below `bound` when uploaded: the kernels do not bound-check them, so the wrappers take only
/// this type and compare `bound` with the table they index.
pub struct Indices {
    buf: CudaSlice<u32>,
    bound: usize,
    /// The indices on the host (their count; the embedding's weight gradient sorts its rows by
    /// them).
    host: Vec<u32>,
}

impl Indices {
    /// A copy on the device, with the same bound.
    pub fn try_clone(&self) -> Result<Indices, GpuError> {
        Ok(Indices {
            buf: self.buf.try_clone()?,
            bound: self.bound,
            host: self.host.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// Every index is below this.
    pub fn bound(&self) -> usize {
        self.bound
    }

    /// Ok when the indices fit a table of `rows` rows.
    fn fit(&self, kernel: &'static str, rows: usize) -> Result<&CudaSlice<u32>, GpuError> {
        if self.bound <= rows {
            Ok(&self.buf)
        } else {
            Err(shape_err(
                kernel,
                format!(
                    "indices checked below {}, the table has {rows} rows",
                    self.bound
                ),
            ))
        }
    }
}

impl Gpu {
    /// `ops::rmsnorm::forward`: y, rstd from x `[rows, d]` and w `[d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_forward(
        &self,
        y: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        let k = "rmsnorm_forward";
        check_len(k, "x", x.len(), rows * d)?;
        check_len(k, "y", y.len(), rows * d)?;
        check_len(k, "rstd", rstd.len(), rows)?;
        check_len(k, "w", w.len(), d)?;
        let di = int(k, "d", d)?;
        if rows == 0 {
            return Ok(()); // a grid of no blocks is a launch error
        }
        let cfg = per_row(k, rows)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(y).arg(rstd).arg(x).arg(w).arg(&di).arg(&eps);
        // SAFETY: rmsnorm_forward takes (float* y, float* rstd, const float* x, const float* w,
        // int d, float eps); x and y hold rows·d, rstd rows, w d (checked); one block per row.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `ops::rmsnorm::backward_input`: dx (or dx +=, with `accumulate`).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let k = "rmsnorm_backward_input";
        for (what, len) in [("dx", dx.len()), ("dy", dy.len()), ("x", x.len())] {
            check_len(k, what, len, rows * d)?;
        }
        check_len(k, "rstd", rstd.len(), rows)?;
        check_len(k, "w", w.len(), d)?;
        let (di, acc) = (int(k, "d", d)?, i32::from(accumulate));
        if rows == 0 {
            return Ok(()); // a grid of no blocks is a launch error
        }
        let cfg = per_row(k, rows)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(dx).arg(dy).arg(x).arg(rstd).arg(w).arg(&di).arg(&acc);
        // SAFETY: rmsnorm_backward_input takes (float* dx, const float* dy, const float* x,
        // const float* rstd, const float* w, int d, int accumulate); dx, dy, x hold rows·d,
        // rstd rows, w d (checked); one block per row.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `ops::rmsnorm::backward_weight`: dw += Σ_rows dy·x·rstd.
    pub fn rmsnorm_backward_weight(
        &self,
        dw: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        d: usize,
    ) -> Result<(), GpuError> {
        let k = "rmsnorm_backward_weight";
        check_len(k, "dy", dy.len(), rows * d)?;
        check_len(k, "x", x.len(), rows * d)?;
        check_len(k, "rstd", rstd.len(), rows)?;
        check_len(k, "dw", dw.len(), d)?;
        let (ni, di) = (int(k, "rows", rows)?, int(k, "d", d)?);
        if d == 0 {
            return Ok(());
        }
        // RBW_COLS columns per block of RBW_THREADS (rmsnorm.cu)
        let cfg = config((grid_dim(k, d.div_ceil(32), GRID_X_MAX)?, 1), 256);
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(dw).arg(dy).arg(x).arg(rstd).arg(&ni).arg(&di);
        // SAFETY: rmsnorm_backward_weight takes (float* dw, const float* dy, const float* x,
        // const float* rstd, int n, int d); dy and x hold n·d, rstd n, dw d (checked); 32
        // columns per block of 256 threads, as its header states.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `ops::swiglu::forward`: h = silu(a)·b.
    pub fn swiglu_forward(
        &self,
        h: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        bv: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let k = "swiglu_forward";
        let n = h.len();
        check_len(k, "a", a.len(), n)?;
        check_len(k, "b", bv.len(), n)?;
        let nl = long(k, "n", n)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(h).arg(a).arg(bv).arg(&nl);
        // SAFETY: swiglu_forward takes (float* h, const float* a, const float* b, long long n);
        // all three hold n (checked); a grid-stride loop, any launch shape.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// `ops::swiglu::backward_input`: da, db from dh.
    pub fn swiglu_backward_input(
        &self,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        dh: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        bv: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let k = "swiglu_backward_input";
        let n = da.len();
        for (what, len) in [("db", db.len()), ("dh", dh.len()), ("a", a.len())] {
            check_len(k, what, len, n)?;
        }
        check_len(k, "b", bv.len(), n)?;
        let nl = long(k, "n", n)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(da).arg(db).arg(dh).arg(a).arg(bv).arg(&nl);
        // SAFETY: swiglu_backward_input takes (float* da, float* db, const float* dh,
        // const float* a, const float* b, long long n); all five hold n (checked); grid-stride.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// `ops::rope::forward` (`backward` false) or `backward_input` (true), in place on
    /// `x [rows, stride]`, columns `[offset, offset + 2·half)`, from the table's `cos`/`sin`
    /// `[positions, half]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        stride: usize,
        offset: usize,
        positions: &Indices,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        half: usize,
        backward: bool,
    ) -> Result<(), GpuError> {
        let k = if backward {
            "rope_backward_input"
        } else {
            "rope_forward"
        };
        let rows = positions.len();
        check_len(k, "x", x.len(), rows * stride)?;
        check_len(k, "sin", sin.len(), cos.len())?;
        if half == 0 || offset + 2 * half > stride || !cos.len().is_multiple_of(half) {
            return Err(shape_err(
                k,
                format!(
                    "offset {offset} + 2·half {half} must fit the stride {stride} and the table"
                ),
            ));
        }
        let pos = positions.fit(k, cos.len() / half)?;
        if rows == 0 {
            return Ok(());
        }
        let (s, o) = (int(k, "stride", stride)?, int(k, "offset", offset)?);
        let (h, r) = (int(k, "half", half)?, int(k, "rows", rows)?);
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(x)
            .arg(&s)
            .arg(&o)
            .arg(pos)
            .arg(cos)
            .arg(sin)
            .arg(&h)
            .arg(&r);
        // SAFETY: rope_forward and rope_backward_input take (float* x, int stride, int offset,
        // const u32* positions, const float* cos, const float* sin, int half, int rows); x holds
        // rows·stride, positions rows indices below the table's cos.len()/half rows, sin as
        // many as cos, offset + 2·half ≤ stride (all checked); grid-stride.
        unsafe { b.launch(grid_stride(rows * half)) }?;
        Ok(())
    }

    /// `ops::cross_entropy::forward`, in two launches: per-row losses into `loss [rows]`, then
    /// their f64 sum in row order into `total [1]`.
    pub fn cross_entropy_forward(
        &self,
        loss: &mut CudaSlice<f32>,
        total: &mut CudaSlice<f64>,
        logits: &CudaSlice<f32>,
        targets: &Indices,
        v: usize,
    ) -> Result<(), GpuError> {
        let k = "cross_entropy_forward_rows";
        let rows = targets.len();
        check_len(k, "logits", logits.len(), rows * v)?;
        check_len(k, "loss", loss.len(), rows)?;
        check_len(k, "total", total.len(), 1)?;
        let vi = int(k, "v", v)?;
        let t = targets.fit(k, v)?;
        if rows > 0 {
            let cfg = per_row(k, rows)?;
            let mut b = self.stream.launch_builder(self.function(k)?);
            b.arg(&mut *loss).arg(logits).arg(t).arg(&vi);
            // SAFETY: cross_entropy_forward_rows takes (float* loss, const float* logits,
            // const u32* targets, int v); logits hold rows·v, loss and targets rows (checked),
            // targets below v (checked); one block per row.
            unsafe { b.launch(cfg) }?;
        }
        let k = "cross_entropy_sum";
        let nl = long(k, "rows", rows)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(total).arg(&*loss).arg(&nl);
        // SAFETY: cross_entropy_sum takes (double* out, const float* loss, long long n); out
        // holds 1 and loss n (checked; n = 0 reads nothing); one block of 256 (CE_SUM_THREADS)
        // as it requires.
        unsafe { b.launch(config((1, 1), 256)) }?;
        Ok(())
    }

    /// `ops::cross_entropy::backward_input`: dlogits = scale·(softmax − onehot).
    pub fn cross_entropy_backward_input(
        &self,
        dlogits: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        targets: &Indices,
        v: usize,
        scale: f32,
    ) -> Result<(), GpuError> {
        let k = "cross_entropy_backward_input";
        let rows = targets.len();
        check_len(k, "logits", logits.len(), rows * v)?;
        check_len(k, "dlogits", dlogits.len(), rows * v)?;
        let t = targets.fit(k, v)?;
        if rows == 0 {
            return Ok(());
        }
        let vi = int(k, "v", v)?;
        let cfg = per_row(k, rows)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(dlogits).arg(logits).arg(t).arg(&vi).arg(&scale);
        // SAFETY: cross_entropy_backward_input takes (float* dlogits, const float* logits,
        // const u32* targets, int v, float scale); logits and dlogits hold rows·v, targets rows
        // below v (checked); one block per row.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Indices uploaded, each checked to be below `bound` (rope positions are `usize` on the
    /// CPU: convert with `u32::try_from`).
    pub fn upload_indices(&self, idx: &[u32], bound: usize) -> Result<Indices, GpuError> {
        let k = "upload_indices";
        if let Some(p) = idx.iter().position(|&i| i as usize >= bound) {
            let why = format!("index[{p}] = {} is not below {bound}", idx[p]);
            return Err(shape_err(k, why));
        }
        let buf = if idx.is_empty() {
            self.zeros(1)?
        } else {
            self.upload(idx)?
        };
        Ok(Indices {
            buf,
            bound,
            host: idx.to_vec(),
        })
    }

    /// `ops::embedding::forward`: out `[n, d]` = table rows by id.
    pub fn embedding_forward(
        &self,
        out: &mut CudaSlice<f32>,
        ids: &Indices,
        table: &CudaSlice<f32>,
        d: usize,
    ) -> Result<(), GpuError> {
        let k = "embedding_forward";
        let n = ids.len();
        check_len(k, "out", out.len(), n * d)?;
        if d == 0 || !table.len().is_multiple_of(d) {
            return Err(shape_err(
                k,
                format!("table of {} is not [vocab, {d}]", table.len()),
            ));
        }
        let id = ids.fit(k, table.len() / d)?;
        if n == 0 {
            return Ok(());
        }
        let (nl, di) = (long(k, "n", n)?, int(k, "d", d)?);
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(out).arg(id).arg(table).arg(&nl).arg(&di);
        // SAFETY: embedding_forward takes (float* out, const u32* ids, const float* table,
        // long long n, int d); out holds n·d, ids n indices below table.len()/d (checked);
        // grid-stride.
        unsafe { b.launch(grid_stride(n * d)) }?;
        Ok(())
    }

    /// `ops::embedding::backward_weight`: dtable rows by id += dout rows, in token order.
    pub fn embedding_backward_weight(
        &self,
        dtable: &mut CudaSlice<f32>,
        ids: &Indices,
        dout: &CudaSlice<f32>,
        d: usize,
    ) -> Result<(), GpuError> {
        let k = "embedding_backward_weight";
        let n = ids.len();
        check_len(k, "dout", dout.len(), n * d)?;
        if d == 0 || !dtable.len().is_multiple_of(d) {
            return Err(shape_err(
                k,
                format!("dtable of {} is not [vocab, {d}]", dtable.len()),
            ));
        }
        ids.fit(k, dtable.len() / d)?;
        if n == 0 {
            return Ok(());
        }
        let (order, starts, seg_ids) = crate::ops::embedding::rows_by_id(&ids.host);
        let (o, st, sid) = (
            self.upload(&order)?,
            self.upload(&starts)?,
            self.upload(&seg_ids)?,
        );
        let di = int(k, "d", d)?;
        let cfg = config(
            (
                grid_dim(k, seg_ids.len(), GRID_X_MAX)?,
                grid_dim(k, d.div_ceil(BLOCK as usize), GRID_Y_MAX)?,
            ),
            BLOCK,
        );
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(dtable).arg(&o).arg(&st).arg(&sid).arg(dout).arg(&di);
        // SAFETY: embedding_backward_weight takes (float* dtable, const u32* order,
        // const u32* starts, const u32* seg_ids, const float* dout, int d); `rows_by_id` gives
        // every row of dout ([n, d], checked) once in `order`, segment bounds in `starts` and
        // ids below dtable.len()/d (checked by `fit`) in `seg_ids`; one block per segment and
        // BLOCK columns. The uploads are freed stream-ordered, after the kernel.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

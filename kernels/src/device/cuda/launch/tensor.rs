//! Launch wrappers of the device step's layout, elementwise and MoE permutation kernels
//! (`tensor.cu`, `moe.cu`), and the row-major f32 GEMMs of a Linear through cuBLAS (TF32 off:
//! cuBLAS's default math mode keeps single precision in FP32). Shapes are checked here; index
//! arrays are checked on the host when a plan is uploaded (`MoePlan`). Never run on a GPU.

use super::shape_err;
use super::{
    BLOCK, GRID_X_MAX, GRID_Y_MAX, Gpu, GpuError, check_len, config, grid_dim, grid_stride, int,
    long,
};
use crate::device::backend::HostPlan;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// A MoE dispatch plan on the device (`HostPlan` uploaded, or built by `router.cu`): per row its
/// token and slot, per token its rows ascending, and the routing weights.
pub struct MoePlan {
    token: CudaSlice<u32>,
    slot: CudaSlice<u32>,
    rows_of_token: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    pub rows: usize,
    pub tokens: usize,
    pub k: usize,
}

/// Which GEMM of a Linear y = x·Wᵀ (W [dout, din]).
#[derive(Clone, Copy, Debug)]
pub enum LinearGemm {
    /// y[n, dout] = x[n, din]·Wᵀ
    Forward,
    /// dx[n, din] (+)= dy[n, dout]·W
    BackwardInput { acc: bool },
    /// dW[dout, din] += dy[n, dout]ᵀ·x[n, din]
    BackwardWeight,
}

impl MoePlan {
    /// A plan from device buffers the router filled (`launch::router`).
    pub(super) fn from_parts(
        token: CudaSlice<u32>,
        slot: CudaSlice<u32>,
        rows_of_token: CudaSlice<u32>,
        weights: CudaSlice<f32>,
        rows: usize,
        tokens: usize,
        k: usize,
    ) -> MoePlan {
        MoePlan {
            token,
            slot,
            rows_of_token,
            weights,
            rows,
            tokens,
            k,
        }
    }
}

impl Gpu {
    /// Uploads a host plan, checking every index against the row and token counts.
    pub fn upload_plan(&self, p: &HostPlan) -> Result<MoePlan, GpuError> {
        let k = "upload_plan";
        let (rows, tokens) = (p.plan.rows(), p.tokens());
        check_len(k, "slot", p.plan.slot.len(), rows)?;
        check_len(k, "rows_of_token", p.rows_of_token.len(), tokens * p.k)?;
        if rows != tokens * p.k {
            return Err(shape_err(
                k,
                format!("{rows} rows for {tokens} tokens × {}", p.k),
            ));
        }
        let bad = |what: &str, v: &[u32], bound: usize| {
            v.iter()
                .position(|&i| i as usize >= bound)
                .map(|at| shape_err(k, format!("{what}[{at}] = {} is not below {bound}", v[at])))
        };
        let first_bad = [
            bad("token", &p.plan.token, tokens),
            bad("slot", &p.plan.slot, p.k),
            bad("rows_of_token", &p.rows_of_token, rows),
        ]
        .into_iter()
        .flatten()
        .next();
        if let Some(e) = first_bad {
            return Err(e);
        }
        let up = |v: &[u32]| {
            if v.is_empty() {
                self.zeros(1)
            } else {
                self.upload(v)
            }
        };
        Ok(MoePlan {
            token: up(&p.plan.token)?,
            slot: up(&p.plan.slot)?,
            rows_of_token: up(&p.rows_of_token)?,
            weights: if p.weights.is_empty() {
                self.zeros(1)?
            } else {
                self.upload(&p.weights)?
            },
            rows,
            tokens,
            k: p.k,
        })
    }

    fn elementwise(
        &self,
        kn: &'static str,
        out: &mut CudaSlice<f32>,
        ins: &[&CudaSlice<f32>],
    ) -> Result<(), GpuError> {
        let n = out.len();
        for (i, x) in ins.iter().enumerate() {
            check_len(kn, &format!("input {i}"), x.len(), n)?;
        }
        let nl = long(kn, "n", n)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(out);
        for x in ins {
            b.arg(*x);
        }
        b.arg(&nl);
        // SAFETY: the kernel takes (float* out, const float* in…, long long n), every buffer
        // holding n (checked); grid-stride.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// out = a + b
    pub fn tensor_add(
        &self,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.elementwise("tensor_add", out, &[a, b])
    }

    pub fn sigmoid_forward(
        &self,
        s: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.elementwise("sigmoid_forward", s, &[x])
    }

    pub fn sigmoid_backward_input(
        &self,
        d: &mut CudaSlice<f32>,
        ds: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.elementwise("sigmoid_backward_input", d, &[ds, s])
    }

    /// x *= f
    pub fn tensor_scale(&self, x: &mut CudaSlice<f32>, f: f32) -> Result<(), GpuError> {
        let kn = "tensor_scale";
        let n = x.len();
        let nl = long(kn, "n", n)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(x).arg(&f).arg(&nl);
        // SAFETY: (float* x, float f, long long n), x holding n; grid-stride.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// out = x rounded to BF16 (nearest even), as bits.
    pub fn to_bf16(&self, out: &mut CudaSlice<u16>, x: &CudaSlice<f32>) -> Result<(), GpuError> {
        let kn = "tensor_to_bf16";
        let n = x.len();
        check_len(kn, "out", out.len(), n)?;
        let nl = long(kn, "n", n)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(out).arg(x).arg(&nl);
        // SAFETY: (u16* out, const float* x, long long n), both holding n (checked); grid-stride.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// `tensor_to_bf16_batched`: the buffers at the device addresses `xs` (each `n` f32, live for
    /// the launch) rounded to BF16 in one launch, buffer z's bits at `out[z·n..]`.
    pub fn to_bf16_batched(
        &self,
        out: &mut CudaSlice<u16>,
        xs: &[u64],
        n: usize,
    ) -> Result<(), GpuError> {
        let kn = "tensor_to_bf16_batched";
        check_len(kn, "out", out.len(), xs.len() * n)?;
        if n == 0 || xs.is_empty() {
            return Ok(());
        }
        let nl = long(kn, "n", n)?;
        let mut cfg = grid_stride(n);
        cfg.grid_dim.1 = grid_dim(kn, xs.len(), GRID_Y_MAX)?;
        let ptrs = self.upload(xs)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(out).arg(&ptrs).arg(&nl);
        // SAFETY: (u16* out, const u64* xs, long long n): each address in `xs` holds n f32 (the
        // caller's), out holds every buffer's (checked); the address list is freed
        // stream-ordered after the kernel.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// dst[dst_off..+n] (+)= src[src_off..+n]
    pub fn tensor_copy(
        &self,
        dst: &mut CudaSlice<f32>,
        dst_off: usize,
        src: &CudaSlice<f32>,
        src_off: usize,
        n: usize,
        acc: bool,
    ) -> Result<(), GpuError> {
        let kn = "tensor_copy";
        if dst_off + n > dst.len() || src_off + n > src.len() {
            let why = format!(
                "{n} elements at {dst_off} of {} / at {src_off} of {}",
                dst.len(),
                src.len()
            );
            return Err(shape_err(kn, why));
        }
        if n == 0 {
            return Ok(());
        }
        let (d0, s0, nl) = (
            long(kn, "dst_off", dst_off)?,
            long(kn, "src_off", src_off)?,
            long(kn, "n", n)?,
        );
        let a = i32::from(acc);
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(dst).arg(&d0).arg(src).arg(&s0).arg(&nl).arg(&a);
        // SAFETY: (float* dst, long long dst_off, const float* src, long long src_off,
        // long long n, int acc); both ranges lie inside their buffers (checked).
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// dst[r, dst_off..+width] (+)= src[r, src_off..+width]
    #[allow(clippy::too_many_arguments)]
    pub fn tensor_copy_cols(
        &self,
        dst: &mut CudaSlice<f32>,
        dst_w: usize,
        dst_off: usize,
        src: &CudaSlice<f32>,
        src_w: usize,
        src_off: usize,
        width: usize,
        acc: bool,
    ) -> Result<(), GpuError> {
        let kn = "tensor_copy_cols";
        if dst_w == 0 || dst_off + width > dst_w || src_off + width > src_w {
            let why =
                format!("columns {dst_off}+{width} of {dst_w} / {src_off}+{width} of {src_w}");
            return Err(shape_err(kn, why));
        }
        let rows = dst.len() / dst_w;
        check_len(kn, "dst", dst.len(), rows * dst_w)?;
        check_len(kn, "src", src.len(), rows * src_w)?;
        if rows * width == 0 {
            return Ok(());
        }
        let dims = [dst_w, dst_off, src_w, src_off, width].map(|v| int(kn, "a column count", v));
        let [dw, doff, sw, soff, wi] = dims;
        let (dw, doff, sw, soff, wi) = (dw?, doff?, sw?, soff?, wi?);
        let (rl, a) = (long(kn, "rows", rows)?, i32::from(acc));
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(dst)
            .arg(&dw)
            .arg(&doff)
            .arg(src)
            .arg(&sw)
            .arg(&soff)
            .arg(&wi);
        b.arg(&rl).arg(&a);
        // SAFETY: (float* dst, int dst_w, int dst_off, const float* src, int src_w, int src_off,
        // int width, long long rows, int acc); both hold rows of their widths and the column
        // ranges fit (checked).
        unsafe { b.launch(grid_stride(rows * width)) }?;
        Ok(())
    }

    /// The three head-layout kernels: `tensor_heads` (y and x both b·t·nh·w), and
    /// `tensor_broadcast_heads` / `tensor_sum_heads` (x b·t·w → y b·nh·t·w and back).
    #[allow(clippy::too_many_arguments)]
    pub fn tensor_heads_op(
        &self,
        kn: &'static str,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        dims: [usize; 4],
        inverse: bool,
    ) -> Result<(), GpuError> {
        let [bsz, t, nh, w] = dims;
        let full = bsz * t * nh * w;
        let (xl, yl) = match kn {
            "tensor_heads" => (full, full),
            "tensor_broadcast_heads" => (bsz * t * w, full),
            "tensor_sum_heads" => (full, bsz * t * w),
            _ => return Err(GpuError::Missing(kn)),
        };
        check_len(kn, "x", x.len(), xl)?;
        check_len(kn, "y", y.len(), yl)?;
        if full == 0 {
            return Ok(());
        }
        let (bi, ti, hi, wi) = (
            int(kn, "b", bsz)?,
            int(kn, "t", t)?,
            int(kn, "nh", nh)?,
            int(kn, "w", w)?,
        );
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(&mut *y).arg(x).arg(&bi).arg(&ti).arg(&hi).arg(&wi);
        let inv = i32::from(inverse);
        if kn == "tensor_heads" {
            b.arg(&inv);
        }
        // SAFETY: (float* y, const float* x, int b, int t, int nh, int w[, int inverse]); x and
        // y hold the element counts of their layouts (checked); grid-stride over y.
        unsafe { b.launch(grid_stride(yl)) }?;
        Ok(())
    }

    /// xe[r] = x[token[r]]
    pub fn moe_dispatch_forward(
        &self,
        xe: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> Result<(), GpuError> {
        let kn = "moe_dispatch_forward";
        check_len(kn, "xe", xe.len(), p.rows * d)?;
        check_len(kn, "x", x.len(), p.tokens * d)?;
        if p.rows * d == 0 {
            return Ok(());
        }
        let (rl, di) = (long(kn, "rows", p.rows)?, int(kn, "d", d)?);
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(xe).arg(x).arg(&p.token).arg(&rl).arg(&di);
        // SAFETY: tokens below p.tokens (checked at upload); sizes checked above.
        unsafe { b.launch(grid_stride(p.rows * d)) }?;
        Ok(())
    }

    /// dx[t] += its rows of dxe, ascending
    pub fn moe_dispatch_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dxe: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> Result<(), GpuError> {
        let kn = "moe_dispatch_backward_input";
        check_len(kn, "dx", dx.len(), p.tokens * d)?;
        check_len(kn, "dxe", dxe.len(), p.rows * d)?;
        if p.tokens * d == 0 {
            return Ok(());
        }
        let (tl, ki, di) = (
            long(kn, "tokens", p.tokens)?,
            int(kn, "k", p.k)?,
            int(kn, "d", d)?,
        );
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(dx)
            .arg(dxe)
            .arg(&p.rows_of_token)
            .arg(&tl)
            .arg(&ki)
            .arg(&di);
        // SAFETY: rows_of_token below p.rows (checked at upload); sizes checked above.
        unsafe { b.launch(grid_stride(p.tokens * d)) }?;
        Ok(())
    }

    /// out[t] += Σ weight·ye[row], rows ascending
    pub fn moe_combine_forward(
        &self,
        out: &mut CudaSlice<f32>,
        ye: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> Result<(), GpuError> {
        let kn = "moe_combine_forward";
        check_len(kn, "out", out.len(), p.tokens * d)?;
        check_len(kn, "ye", ye.len(), p.rows * d)?;
        if p.tokens * d == 0 {
            return Ok(());
        }
        let (tl, ki, di) = (
            long(kn, "tokens", p.tokens)?,
            int(kn, "k", p.k)?,
            int(kn, "d", d)?,
        );
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(out)
            .arg(ye)
            .arg(&p.weights)
            .arg(&p.slot)
            .arg(&p.rows_of_token);
        b.arg(&tl).arg(&ki).arg(&di);
        // SAFETY: slot below k, rows_of_token below p.rows (checked at upload); sizes above.
        unsafe { b.launch(grid_stride(p.tokens * d)) }?;
        Ok(())
    }

    /// dye[r] = w·dout[t]; dweights[t·k + s] = dout[t]·ye[r] (one block per row)
    pub fn moe_combine_backward_input(
        &self,
        dye: &mut CudaSlice<f32>,
        dweights: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        ye: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> Result<(), GpuError> {
        let kn = "moe_combine_backward_input";
        check_len(kn, "dye", dye.len(), p.rows * d)?;
        check_len(kn, "ye", ye.len(), p.rows * d)?;
        check_len(kn, "dout", dout.len(), p.tokens * d)?;
        check_len(kn, "dweights", dweights.len(), p.tokens * p.k)?;
        if p.rows == 0 {
            return Ok(());
        }
        let (ki, di) = (int(kn, "k", p.k)?, int(kn, "d", d)?);
        let cfg = config((grid_dim(kn, p.rows, GRID_X_MAX)?, 1), BLOCK);
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(dye).arg(dweights).arg(dout).arg(ye).arg(&p.weights);
        b.arg(&p.token).arg(&p.slot).arg(&ki).arg(&di);
        // SAFETY: one block per row below p.rows; token and slot checked at upload; sizes above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// The cuBLAS handle of one `Gpu`'s stream, for the Linear GEMMs.
pub struct Blas {
    pub(super) blas: CudaBlas,
    pub(super) stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

/// One Linear GEMM as column-major cuBLAS sees it: C = op(A)·op(B), A the `w_or_x` operand
/// (W, or x for the weight gradient) and B the other.
pub(super) struct Plan {
    pub(super) transa: cublasOperation_t,
    pub(super) transb: cublasOperation_t,
    pub(super) m: i32,
    pub(super) n: i32,
    pub(super) k: i32,
    pub(super) lda: i32,
    pub(super) ldb: i32,
    pub(super) ldc: i32,
    pub(super) beta: f32,
    pub(super) out_len: usize,
}

/// The GEMM of `which` for W [dout, din] and n rows, lengths checked: a row-major M[r, c] is the
/// column-major Mᵀ with leading dimension c.
pub(super) fn plan(
    which: LinearGemm,
    a_len: usize,
    b_len: usize,
    out_len: usize,
    n: usize,
    din: usize,
    dout: usize,
) -> Result<Plan, GpuError> {
    use cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
    let kn = "cublas gemm";
    let i = |what: &str, v: usize| int(kn, what, v);
    let p = match which {
        // yᵀ[dout, n] = W · xᵀ: A = W (col-major Wᵀ, op T), B = x (col-major xᵀ, op N)
        LinearGemm::Forward => {
            check_len(kn, "x", a_len, n * din)?;
            check_len(kn, "w", b_len, dout * din)?;
            Plan {
                transa: T,
                transb: N,
                m: i("dout", dout)?,
                n: i("n", n)?,
                k: i("din", din)?,
                lda: i("din", din)?,
                ldb: i("din", din)?,
                ldc: i("dout", dout)?,
                beta: 0.0,
                out_len: n * dout,
            }
        }
        // dxᵀ[din, n] = Wᵀ · dyᵀ: A = W (op N, lda din), B = dy (op N, ldb dout)
        LinearGemm::BackwardInput { acc } => {
            check_len(kn, "dy", a_len, n * dout)?;
            check_len(kn, "w", b_len, dout * din)?;
            Plan {
                transa: N,
                transb: N,
                m: i("din", din)?,
                n: i("n", n)?,
                k: i("dout", dout)?,
                lda: i("din", din)?,
                ldb: i("dout", dout)?,
                ldc: i("din", din)?,
                beta: if acc { 1.0 } else { 0.0 },
                out_len: n * din,
            }
        }
        // dWᵀ[din, dout] += xᵀ · dy: A = x (op N, lda din), B = dy (op T, ldb dout)
        LinearGemm::BackwardWeight => {
            check_len(kn, "dy", a_len, n * dout)?;
            check_len(kn, "x", b_len, n * din)?;
            Plan {
                transa: N,
                transb: T,
                m: i("din", din)?,
                n: i("dout", dout)?,
                k: i("n", n)?,
                lda: i("din", din)?,
                ldb: i("dout", dout)?,
                ldc: i("din", din)?,
                beta: 1.0,
                out_len: dout * din,
            }
        }
    };
    check_len(kn, "out", out_len, p.out_len)?;
    Ok(p)
}

pub(super) fn blas_err(e: cudarc::cublas::result::CublasError) -> GpuError {
    shape_err("cublas gemm", format!("{e:?}"))
}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Blas, GpuError> {
        let blas = CudaBlas::new(gpu.stream().clone())
            .map_err(|e| shape_err("cublas", format!("creating the handle: {e:?}")))?;
        Ok(Blas {
            blas,
            stream: gpu.stream().clone(),
        })
    }

    /// Makes the handle's context current on the calling thread: cuBLAS runs on whatever
    /// context is current, and the step's calls may come from any thread.
    pub(super) fn bind(&self) -> Result<(), GpuError> {
        Ok(self.stream.context().bind_to_thread()?)
    }

    /// One f32 GEMM of a Linear with W [dout, din] and n rows (SGEMM; cuBLAS's default math mode
    /// keeps FP32, TF32 off). `a` is x (forward) or dy (backward); `w_or_x` is W, or x for the
    /// weight gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        which: LinearGemm,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        w_or_x: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let p = plan(which, a.len(), w_or_x.len(), out.len(), n, din, dout)?;
        if p.out_len == 0 {
            return Ok(());
        }
        let (first, second) = (w_or_x, a);
        let cfg = GemmConfig {
            transa: p.transa,
            transb: p.transb,
            m: p.m,
            n: p.n,
            k: p.k,
            alpha: 1.0f32,
            lda: p.lda,
            ldb: p.ldb,
            beta: p.beta,
            ldc: p.ldc,
        };
        // SAFETY: every operand holds the elements its (m, n, k, ld) describe (checked by
        // `plan`), all on the handle's stream.
        unsafe { self.blas.gemm(cfg, first, second, out) }.map_err(blas_err)
    }

    /// The same GEMM with BF16 operands (bits as u16, rounded by `Gpu::to_bf16`), products summed
    /// in f32 into the f32 `out` (cublasGemmEx, CUBLAS_COMPUTE_32F).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_bf16(
        &self,
        which: LinearGemm,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<u16>,
        w_or_x: &CudaSlice<u16>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let p = plan(which, a.len(), w_or_x.len(), out.len(), n, din, dout)?;
        if p.out_len == 0 {
            return Ok(());
        }
        let stream = &self.stream;
        let (pa, _ra) = w_or_x.device_ptr(stream);
        let (pb, _rb) = a.device_ptr(stream);
        let (pc, _rc) = out.device_ptr_mut(stream);
        // SAFETY: W (or x) and `a` hold bf16 values and `out` f32 values in the counts (m, n, k,
        // ld) describe (checked by `plan`); the records keep the pointers alive until the call
        // is queued on the handle's stream.
        unsafe { self.gemm_ex(&p, (pa, pb, pc), true) }
    }

    /// One cublasGemmEx of a Linear's plan `p` on raw addresses (W or x, the `a` operand, the
    /// f32 output): BF16 or f32 operands, products summed in f32 (CUBLAS_COMPUTE_32F: TF32 off).
    ///
    /// # Safety
    /// Each address holds the values `p`'s (m, n, k, ld) describe, in buffers alive until the
    /// call is queued on the handle's stream.
    pub(super) unsafe fn gemm_ex(
        &self,
        p: &Plan,
        (w_or_x, a, out): (u64, u64, u64),
        bf16: bool,
    ) -> Result<(), GpuError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        let ab = if bf16 {
            cudaDataType::CUDA_R_16BF
        } else {
            cudaDataType::CUDA_R_32F
        };
        let (alpha, beta) = (1.0f32, p.beta);
        // SAFETY: the caller's promise on the addresses; alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F requires.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                p.transa,
                p.transb,
                p.m,
                p.n,
                p.k,
                (&alpha as *const f32).cast(),
                w_or_x as *const _,
                ab,
                p.lda,
                a as *const _,
                ab,
                p.ldb,
                (&beta as *const f32).cast(),
                out as *mut _,
                cudaDataType::CUDA_R_32F,
                p.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }

    /// A row-major strided-batched product on BF16 operands (bits as u16) with f32 sums into the
    /// f32 `out` (cublasGemmStridedBatchedEx, CUBLAS_COMPUTE_32F, overwritten): for each of
    /// `batch` blocks, out[m, n] = op(a)·op(b) with op(a) m×k (a stored k×m when `ta`) and op(b)
    /// k×n (b stored n×k when `tb`); blocks lie m·k, k·n and m·n elements apart.
    pub fn batched_bf16(
        &self,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<u16>,
        b: &CudaSlice<u16>,
        (m, n, k): (usize, usize, usize),
        (ta, tb): (bool, bool),
        batch: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        use cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let kn = "cublas batched gemm";
        check_len(kn, "a", a.len(), batch * m * k)?;
        check_len(kn, "b", b.len(), batch * k * n)?;
        check_len(kn, "out", out.len(), batch * m * n)?;
        if out.is_empty() {
            return Ok(());
        }
        let i = |what: &str, v: usize| int(kn, what, v);
        // row-major out = op(a)·op(b) is column-major outᵀ = op(b)ᵀ·op(a)ᵀ: b first, then a
        let (transa, lda) = if tb { (T, i("k", k)?) } else { (N, i("n", n)?) };
        let (transb, ldb) = if ta { (T, i("m", m)?) } else { (N, i("k", k)?) };
        let (sa, sb, sc) = (
            long(kn, "k·n", k * n)?,
            long(kn, "m·k", m * k)?,
            long(kn, "m·n", m * n)?,
        );
        let stream = &self.stream;
        let (pa, _ra) = b.device_ptr(stream);
        let (pb, _rb) = a.device_ptr(stream);
        let (pc, _rc) = out.device_ptr_mut(stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let bf = cudaDataType::CUDA_R_16BF;
        // SAFETY: a and b hold batch·m·k and batch·k·n bf16 values and out batch·m·n f32 values
        // (checked), which the (m, n, k, ld, stride) above describe; alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F requires; the records keep the pointers alive until the call is
        // queued on the handle's stream.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                transa,
                transb,
                i("n", n)?,
                i("m", m)?,
                i("k", k)?,
                (&alpha as *const f32).cast(),
                pa as *const _,
                bf,
                lda,
                sa,
                pb as *const _,
                bf,
                ldb,
                sb,
                (&beta as *const f32).cast(),
                pc as *mut _,
                cudaDataType::CUDA_R_32F,
                i("n", n)?,
                sc,
                i("batch", batch)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }
}

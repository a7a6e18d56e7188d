//! Launch wrappers of `attention.cu`, the fused causal attention (flash style, f32) that mirrors
//! `ops::attention::forward` and `backward_input` without a T×T matrix: the forward writes o and
//! the per-row log-sum-exp, the backward takes them back (with a `[bh, t]` scratch for
//! rowsum(dO ⊙ O)) and runs three deterministic kernels (the row dot, dK/dV per key tile, dQ per
//! query tile). Shapes are checked here, including the kernels' head-dim limit. Never run on a GPU.

use super::{BLOCK, GRID_X_MAX, GRID_Y_MAX, Gpu, GpuError, check_len, grid_dim, int, long};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// The largest dqk and dv the kernels hold (`MAX_HEAD_DIM` in attention.cu).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;
/// Query rows per tile (forward, dQ) and key rows per dK/dV tile (`TILE`, `KEY_TILE_DKV`).
const QUERY_TILE: usize = 64;
const KEY_TILE_DKV: usize = 32;

/// The shape of one attention call: `bh` (sequence, head) blocks of `t` positions, q and k with
/// `dqk` columns, v and o with `dv`, scores scaled by `scale` (as the CPU functions take them).
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub bh: usize,
    pub t: usize,
    pub dqk: usize,
    pub dv: usize,
    pub scale: f32,
}

/// The kernels' integer arguments, checked.
struct Dims {
    t: i32,
    dqk: i32,
    dv: i32,
}

impl AttentionShape {
    /// Ok when the kernels can take this shape: t ≥ 1, 1 ≤ dqk, dv ≤ 256, bh ≤ 65,535 (the
    /// grid's y), and every buffer index within a CUDA `long long`.
    fn check(&self, kernel: &'static str) -> Result<Dims, GpuError> {
        let err = |why: String| super::shape_err(kernel, why);
        for (what, d) in [("dqk", self.dqk), ("dv", self.dv)] {
            if d == 0 || d > ATTENTION_MAX_HEAD_DIM {
                return Err(err(format!(
                    "{what} = {d} is outside 1..={ATTENTION_MAX_HEAD_DIM}"
                )));
            }
        }
        if self.t == 0 || self.bh == 0 {
            return Err(err(format!("empty: bh {} t {}", self.bh, self.t)));
        }
        grid_dim(kernel, self.bh, GRID_Y_MAX)?;
        let widest = self.dqk.max(self.dv);
        let elems = self
            .bh
            .checked_mul(self.t)
            .and_then(|n| n.checked_mul(widest));
        long(kernel, "bh·t·d", elems.unwrap_or(usize::MAX))?;
        Ok(Dims {
            t: int(kernel, "t", self.t)?,
            dqk: int(kernel, "dqk", self.dqk)?,
            dv: int(kernel, "dv", self.dv)?,
        })
    }

    /// Elements of q, k (and dq, dk).
    fn qk_len(&self) -> usize {
        self.bh * self.t * self.dqk
    }

    /// Elements of v, o (and dv, do).
    fn v_len(&self) -> usize {
        self.bh * self.t * self.dv
    }

    /// A grid of (⌈t/rows⌉, bh) blocks of `BLOCK` (256) threads (static shared memory only).
    fn grid(&self, kernel: &'static str, rows: usize) -> Result<LaunchConfig, GpuError> {
        let x = grid_dim(kernel, self.t.div_ceil(rows), GRID_X_MAX)?;
        let y = grid_dim(kernel, self.bh, GRID_Y_MAX)?;
        Ok(LaunchConfig {
            grid_dim: (x, y, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }
}

impl Gpu {
    /// `ops::attention::forward` without the probabilities: o `[bh, t, dv]` and the per-row
    /// log-sum-exp of the scaled scores, lse `[bh, t]`, which the backward needs.
    pub fn attention_forward(
        &self,
        o: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttentionShape,
    ) -> Result<(), GpuError> {
        let kn = "attention_forward";
        let d = s.check(kn)?;
        check_len(kn, "q", q.len(), s.qk_len())?;
        check_len(kn, "k", k.len(), s.qk_len())?;
        check_len(kn, "v", v.len(), s.v_len())?;
        check_len(kn, "o", o.len(), s.v_len())?;
        check_len(kn, "lse", lse.len(), s.bh * s.t)?;
        let cfg = s.grid(kn, QUERY_TILE)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(o).arg(lse).arg(q).arg(k).arg(v);
        b.arg(&d.t).arg(&d.dqk).arg(&d.dv).arg(&s.scale);
        // SAFETY: attention_forward takes (float* o, float* lse, const float* q, const float* k,
        // const float* v, int t, int dqk, int dv, float scale); q and k hold bh·t·dqk, v and o
        // bh·t·dv, lse bh·t (checked), 1 ≤ dqk, dv ≤ 256 (checked); grid (⌈t/64⌉, bh) of 256
        // threads as it indexes, static shared memory.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `ops::attention::backward_input` from the forward's o and lse: dq, dk `[bh, t, dqk]` and
    /// dv `[bh, t, dv]` (overwritten). `delta` `[bh, t]` is scratch (rowsum(dO ⊙ O)).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward_input(
        &self,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        delta: &mut CudaSlice<f32>,
        d_o: &CudaSlice<f32>,
        o: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttentionShape,
    ) -> Result<(), GpuError> {
        let kn = "attention_backward_input";
        let d = s.check(kn)?;
        for (what, len) in [
            ("q", q.len()),
            ("k", k.len()),
            ("dq", dq.len()),
            ("dk", dk.len()),
        ] {
            check_len(kn, what, len, s.qk_len())?;
        }
        for (what, len) in [
            ("v", v.len()),
            ("o", o.len()),
            ("do", d_o.len()),
            ("dv", dv.len()),
        ] {
            check_len(kn, what, len, s.v_len())?;
        }
        check_len(kn, "lse", lse.len(), s.bh * s.t)?;
        check_len(kn, "delta", delta.len(), s.bh * s.t)?;

        let kn = "attention_backward_dot";
        let rows = long(kn, "rows", s.bh * s.t)?;
        let warps_per_block = (BLOCK / 32) as usize;
        let blocks = (s.bh * s.t).div_ceil(warps_per_block).clamp(1, 1 << 20) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(&mut *delta).arg(d_o).arg(o).arg(&rows).arg(&d.dv);
        // SAFETY: attention_backward_dot takes (float* delta, const float* d_o, const float* o,
        // long long rows, int dv); d_o and o hold rows·dv, delta rows (checked); a warp per row
        // in a grid-stride loop, any grid of 256-thread blocks.
        unsafe { b.launch(cfg) }?;

        let saved = Saved {
            d_o,
            lse,
            delta,
            q,
            k,
            v,
        };
        // attention_backward_dkdv(float* dk, float* dv, <tail>): dk holds bh·t·dqk, dv bh·t·dv
        // (checked); grid (⌈t/32⌉, bh)
        self.backward_tiles(
            "attention_backward_dkdv",
            KEY_TILE_DKV,
            [dk, dv],
            &saved,
            s,
            &d,
        )?;
        // attention_backward_dq(float* dq, <tail>): dq holds bh·t·dqk (checked); grid (⌈t/64⌉, bh)
        self.backward_tiles("attention_backward_dq", QUERY_TILE, [dq], &saved, s, &d)?;
        Ok(())
    }

    /// Launches a backward tile kernel `(outputs…, const float* d_o, const float* lse,
    /// const float* delta, const float* q, const float* k, const float* v, int t, int dqk,
    /// int dv, float scale)` on a grid of (⌈t/rows⌉, bh) blocks of 256 threads.
    fn backward_tiles<const N: usize>(
        &self,
        kn: &'static str,
        rows: usize,
        outs: [&mut CudaSlice<f32>; N],
        saved: &Saved<'_>,
        s: AttentionShape,
        d: &Dims,
    ) -> Result<(), GpuError> {
        let cfg = s.grid(kn, rows)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        for out in outs {
            b.arg(out);
        }
        let Saved {
            d_o,
            lse,
            delta,
            q,
            k,
            v,
        } = *saved;
        b.arg(d_o).arg(lse).arg(delta).arg(q).arg(k).arg(v);
        b.arg(&d.t).arg(&d.dqk).arg(&d.dv).arg(&s.scale);
        // SAFETY: the kernel takes the outputs, then the tail above; the caller checked the
        // outputs' lengths and `attention_backward_input` the tail's: q, k bh·t·dqk, d_o, v
        // bh·t·dv, lse and delta bh·t, 1 ≤ dqk, dv ≤ 256; the grid is the one the kernel's
        // header states for `rows`, static shared memory.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// The backward's inputs shared by its tile kernels.
struct Saved<'a> {
    d_o: &'a CudaSlice<f32>,
    lse: &'a CudaSlice<f32>,
    delta: &'a CudaSlice<f32>,
    q: &'a CudaSlice<f32>,
    k: &'a CudaSlice<f32>,
    v: &'a CudaSlice<f32>,
}

impl Gpu {
    /// `ops::attention::softmax_causal_rows` on `rows` rows of `t` scores in place (row r is
    /// position r mod t), and `p16` the probabilities in BF16: one block of 256 threads per row.
    pub fn attention_softmax_rows(
        &self,
        p: &mut CudaSlice<f32>,
        p16: &mut CudaSlice<u16>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<(), GpuError> {
        let kn = "attention_softmax_rows";
        check_len(kn, "p16", p16.len(), rows * t)?;
        let (cfg, rows_arg, t_arg) = row_grid(kn, p.len(), rows, t)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(p).arg(p16).arg(&rows_arg).arg(&t_arg).arg(&scale);
        // SAFETY: attention_softmax_rows takes (float* p, u16* p16, long long rows, int t, float
        // scale); p and p16 hold rows·t values (checked); one block of 256 threads per row, 32
        // floats of static shared memory.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `ops::attention::softmax_backward_rows` on `rows` rows of `t`, from dP and the forward's
    /// probabilities `p`: dS in BF16 into `ds16` (the operand of the dQ and dK products).
    pub fn attention_softmax_backward_rows(
        &self,
        ds16: &mut CudaSlice<u16>,
        dp: &CudaSlice<f32>,
        p: &CudaSlice<f32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<(), GpuError> {
        let kn = "attention_softmax_backward_rows";
        check_len(kn, "p", p.len(), rows * t)?;
        check_len(kn, "ds16", ds16.len(), rows * t)?;
        let (cfg, rows_arg, t_arg) = row_grid(kn, dp.len(), rows, t)?;
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(ds16)
            .arg(dp)
            .arg(p)
            .arg(&rows_arg)
            .arg(&t_arg)
            .arg(&scale);
        // SAFETY: attention_softmax_backward_rows takes (u16* ds16, const float* dp, const float*
        // p, long long rows, int t, float scale); all three hold rows·t values (checked); one
        // block of 256 threads per row.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// One block per row for the row kernels, with their integer arguments; `len` must be rows·t.
fn row_grid(
    kn: &'static str,
    len: usize,
    rows: usize,
    t: usize,
) -> Result<(LaunchConfig, i64, i32), GpuError> {
    check_len(kn, "scores", len, rows * t)?;
    let blocks = grid_dim(kn, rows.max(1), GRID_X_MAX)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((cfg, long(kn, "rows", rows)?, int(kn, "t", t)?))
}

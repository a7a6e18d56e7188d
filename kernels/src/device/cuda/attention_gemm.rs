//! Attention on the tensor cores for BF16 mixed precision (feature `cuda`): the six products of
//! `ops::attention` (S = Q·Kᵀ, O = P·V; dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q) as
//! strided-batched cuBLAS GEMMs on BF16 operands with f32 sums, and `attention_gemm.cu`'s row
//! kernels (the causal softmax, its backward) between them, which also write the BF16 operands
//! the next products read. The T×T probabilities are materialised (kept in f32 and BF16 for the
//! backward), so the path is taken only up to
//! [`GEMM_ATTENTION_MAX_SCORES`] elements of them; longer sequences, f32, and a device where the
//! check at open fails run the fused f32 kernel (`attention.cu`). The CPU backend emulates the
//! path (`ops::attention::forward_reading` on BF16-rounded operands). Never run on a GPU.

use super::backend::CudaBackend;
use super::launch::AttentionShape;
use crate::device::backend::{Backend, BackendError, BackendResult, GemmPrecision};
use cudarc::driver::CudaSlice;

/// The most probabilities (bh·t² f32 values, 4 GiB) a BF16 attention call materialises.
pub const GEMM_ATTENTION_MAX_SCORES: usize = 1 << 30;

/// What attention's forward keeps for its backward on CUDA.
pub enum CudaAttnAux {
    /// The fused kernel's per-row log-sum-exp [bh, t].
    Lse(CudaSlice<f32>),
    /// The tensor-core path's probabilities [bh, t, t], in f32 (the softmax's backward reads
    /// them) and in BF16 (the dV product does).
    Probs(CudaSlice<f32>, CudaSlice<u16>),
}

impl CudaBackend {
    /// Whether attention of this shape in precision `p` runs on the tensor cores.
    pub(super) fn gemm_attention(&self, p: GemmPrecision, bh: usize, t: usize) -> bool {
        p == GemmPrecision::Bf16
            && self.gemm_attention_off.is_none()
            && bh.saturating_mul(t).saturating_mul(t) <= GEMM_ATTENTION_MAX_SCORES
    }

    /// o [bh, t, dv] and the probabilities [bh, t, t] on the tensor cores.
    pub(super) fn attention_forward_gemm(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttentionShape,
    ) -> BackendResult<(CudaSlice<f32>, CudaAttnAux)> {
        let AttentionShape {
            bh,
            t,
            dqk,
            dv,
            scale,
        } = s;
        let (q16, k16, v16) = (self.bf16(q)?, self.bf16(k)?, self.bf16(v)?);
        let mut p = self.zeros(bh * t * t)?;
        self.blas
            .batched_bf16(&mut p, &q16, &k16, (t, t, dqk), (false, true), bh)?;
        let mut p16 = self.gpu.zeros::<u16>(bh * t * t)?;
        self.gpu
            .attention_softmax_rows(&mut p, &mut p16, bh * t, t, scale)?;
        let mut o = self.zeros(bh * t * dv)?;
        self.blas
            .batched_bf16(&mut o, &p16, &v16, (t, dv, t), (false, false), bh)?;
        Ok((o, CudaAttnAux::Probs(p, p16)))
    }

    /// (dq, dk, dv) on the tensor cores from d_o and the forward's probabilities.
    pub(super) fn attention_backward_gemm(
        &self,
        d_o: &CudaSlice<f32>,
        (p, p16): (&CudaSlice<f32>, &CudaSlice<u16>),
        (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        s: AttentionShape,
    ) -> BackendResult<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let AttentionShape {
            bh,
            t,
            dqk,
            dv,
            scale,
        } = s;
        if self.len(p) != bh * t * t {
            return Err(BackendError(format!(
                "attention backward: {} probabilities for bh {bh} × t {t}²",
                self.len(p)
            )));
        }
        let do16 = self.bf16(d_o)?;
        let mut dvv = self.zeros(bh * t * dv)?;
        self.blas
            .batched_bf16(&mut dvv, p16, &do16, (t, dv, t), (true, false), bh)?;
        let mut dp = self.zeros(bh * t * t)?;
        let v16 = self.bf16(v)?;
        self.blas
            .batched_bf16(&mut dp, &do16, &v16, (t, t, dv), (false, true), bh)?;
        let mut ds16 = self.gpu.zeros::<u16>(bh * t * t)?;
        self.gpu
            .attention_softmax_backward_rows(&mut ds16, &dp, p, bh * t, t, scale)?;
        drop(dp);
        let (q16, k16) = (self.bf16(q)?, self.bf16(k)?);
        let (mut dq, mut dk) = (self.zeros(bh * t * dqk)?, self.zeros(bh * t * dqk)?);
        self.blas
            .batched_bf16(&mut dq, &ds16, &k16, (t, dqk, t), (false, false), bh)?;
        self.blas
            .batched_bf16(&mut dk, &ds16, &q16, (t, dqk, t), (true, false), bh)?;
        Ok((dq, dk, dvv))
    }

    /// Why the tensor-core attention is off: `PHALANX_GEMM_ATTENTION=off`, or, at open, its
    /// forward and backward differ from the fused f32 kernel by more than BF16 rounding allows
    /// (1e-2 normwise on a small random case). None when it is on.
    pub(super) fn gemm_attention_check(&self) -> Option<String> {
        if std::env::var("PHALANX_GEMM_ATTENTION").is_ok_and(|v| v == "off") {
            return Some("PHALANX_GEMM_ATTENTION=off".into());
        }
        let run = || -> BackendResult<f64> {
            let s = AttentionShape {
                bh: 2,
                t: 80,
                dqk: 96,
                dv: 64,
                scale: 96f32.powf(-0.5),
            };
            let mut rng = crate::rng::Rng::new(0xa77e);
            let mut random = |n: usize| -> BackendResult<CudaSlice<f32>> {
                self.upload(&(0..n).map(|_| rng.normal()).collect::<Vec<f32>>())
            };
            let (nqk, nv) = (s.bh * s.t * s.dqk, s.bh * s.t * s.dv);
            let (q, k, v, d_o) = (random(nqk)?, random(nqk)?, random(nv)?, random(nv)?);
            let f32p = GemmPrecision::F32;
            let (bh, t, dqk, dv, scale) = (s.bh, s.t, s.dqk, s.dv, s.scale);
            let (o_ref, lse) = self.attention_forward(&q, &k, &v, bh, t, dqk, dv, scale, f32p)?;
            let want = self.attention_backward_input(
                &d_o, &o_ref, &lse, &q, &k, &v, bh, t, dqk, dv, scale, f32p,
            )?;
            let (o, aux) = self.attention_forward_gemm(&q, &k, &v, s)?;
            let CudaAttnAux::Probs(p, p16) = &aux else {
                unreachable!("the tensor-core forward keeps the probabilities")
            };
            let got = self.attention_backward_gemm(&d_o, (p, p16), (&q, &k, &v), s)?;
            let mut worst = 0f64;
            for (a, b) in [
                (&o, &o_ref),
                (&got.0, &want.0),
                (&got.1, &want.1),
                (&got.2, &want.2),
            ] {
                let e = crate::device::norm_rel_error(&self.download(a)?, &self.download(b)?);
                worst = worst.max(e);
            }
            Ok(worst)
        };
        match run() {
            Ok(w) if w <= 1e-2 => None,
            Ok(w) => Some(format!(
                "the tensor-core attention differs from the f32 kernel by {w:.1e}"
            )),
            Err(e) => Some(format!("the tensor-core attention failed at open: {e}")),
        }
    }
}

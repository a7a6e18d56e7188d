//! The device abstraction of issue 12: `Backend` is every primitive the DeepSeek-V3 training step
//! needs (GEMMs of a Linear, RMSNorm, SwiGLU, RoPE, fused causal attention, cross-entropy, the
//! embedding, the layout moves of MLA and MTP, the router's sigmoid, MoE dispatch and combine,
//! and the optimizer's grad norm and AdamW), on buffers that live on the device. The step itself
//! is written once against this trait (`device::model`) and runs on any backend: `Cpu` (the
//! `kernels::ops` functions on host vectors, the reference) and, with feature `cuda`,
//! `cuda::backend::CudaBackend` (cuBLAS and the NVRTC kernels).
//!
//! Routing (the group-limited top-k of `ops::moe_gate`, the dispatch plan) and the balance loss
//! are backend primitives too (`route`, `balance_loss`, `route_backward`): CUDA computes them on
//! the device and sends the host only the plan's expert offsets (which size the grouped expert
//! GEMMs) and the per-sequence losses. Every value that decides bits is computed without atomics.

mod cpu;
pub mod grouped;
pub mod weight_cache;

pub use cpu::{Cpu, CpuRoute};
pub use grouped::ExpertGemm;

use crate::ops::adamw::StepConsts;
use crate::ops::moe_dispatch::DispatchPlan;
use crate::ops::moe_gate::RouteRule;
use crate::ops::rope::RopeTable;

/// Why a backend call failed (a device error, a shape a kernel refused), as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

pub type BackendResult<T> = Result<T, BackendError>;

/// A tensor's AdamW moments on a backend: f32, or BF16 bits.
pub enum MomentsMut<'a, B: Backend + ?Sized> {
    F32(&'a mut B::Buf, &'a mut B::Buf),
    Bf16(&'a mut B::Half, &'a mut B::Half),
}

/// One tensor's AdamW update for [`Backend::adamw_steps`]: its values, its gradient (zeroed),
/// its moments and the step's constants for it.
pub struct AdamJob<'a, B: Backend + ?Sized> {
    pub p: &'a mut B::Buf,
    pub g: &'a mut B::Buf,
    pub moments: MomentsMut<'a, B>,
    pub c: StepConsts,
}

/// Ok when a buffer `what` of `who` holds `want` elements, else an error naming both.
pub(crate) fn check_len(who: &str, what: &str, len: usize, want: usize) -> BackendResult<()> {
    if len == want {
        Ok(())
    } else {
        Err(BackendError(format!(
            "{who}: {what} has {len} elements, want {want}"
        )))
    }
}

/// The precision of the Linear GEMMs: f32 (the reference), or BF16 mixed precision, where both
/// operands are rounded to BF16 (nearest even) and the products are summed in f32 into an f32
/// output; master weights, gradients and moments stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmPrecision {
    #[default]
    F32,
    Bf16,
}

impl GemmPrecision {
    /// The precision a device step under `--precision p` gives everything that is not an FP8
    /// Linear (the output head, MTP's projection, attention; the MoE gate stays f32 whatever
    /// this says): f32 → F32; bf16 → Bf16; fp8 → Bf16, DeepSeek-V3's own setup, where the FP8
    /// Linears run over a BF16 mixed-precision baseline. The CPU model has no BF16 mode, so
    /// `phalanx train --precision fp8` without a device keeps that rest in f32.
    pub fn device_baseline(p: crate::model::Precision) -> GemmPrecision {
        match p {
            crate::model::Precision::F32 => GemmPrecision::F32,
            crate::model::Precision::Bf16 | crate::model::Precision::Fp8 => GemmPrecision::Bf16,
        }
    }
}

/// A MoE layer's dispatch plan as the host built it (`DispatchPlan`), with the routing weights
/// and, for every token, its `k` rows in ascending row order (the order the CPU adds them in).
#[derive(Clone, Debug)]
pub struct HostPlan {
    pub plan: DispatchPlan,
    pub k: usize,
    /// [tokens, k] routing weights (`Routing::weights`).
    pub weights: Vec<f32>,
    /// [tokens, k] the dispatched rows of each token, ascending.
    pub rows_of_token: Vec<u32>,
}

impl HostPlan {
    pub fn new(plan: DispatchPlan, k: usize, weights: Vec<f32>) -> HostPlan {
        let tokens = weights.len() / k.max(1);
        let mut rows_of_token = vec![0u32; tokens * k];
        let mut fill = vec![0usize; tokens];
        // rows are visited in ascending order, so each token's list comes out sorted
        for (r, &t) in plan.token.iter().enumerate() {
            let t = t as usize;
            rows_of_token[t * k + fill[t]] = r as u32;
            fill[t] += 1;
        }
        HostPlan {
            plan,
            k,
            weights,
            rows_of_token,
        }
    }

    pub fn tokens(&self) -> usize {
        self.weights.len() / self.k.max(1)
    }
}

/// A [`Backend::hold_weights`] until dropped (also on an early return with an error).
pub struct WeightsHeld<'a, B: Backend>(&'a B);

impl<'a, B: Backend> WeightsHeld<'a, B> {
    /// Holds `b`'s weights when `on` (else a guard that holds nothing).
    pub fn new(b: &'a B, on: bool) -> Option<WeightsHeld<'a, B>> {
        on.then(|| {
            b.hold_weights();
            WeightsHeld(b)
        })
    }
}

impl<B: Backend> Drop for WeightsHeld<'_, B> {
    fn drop(&mut self) {
        self.0.release_weights();
    }
}

/// The primitives of a training step on one device. Shapes are row-major and explicit; a buffer
/// of `n` elements is `Buf` with `len(buf) == n`. `acc` arguments add into the output instead of
/// overwriting it. Each method mirrors the `kernels::ops` function it names, and on `Cpu` is
/// exactly that function.
pub trait Backend {
    /// f32 values on the device. Every handle may move between threads (a formation's stage
    /// copy runs its micro-batches on whichever blocking-pool thread is free).
    type Buf: Send;
    /// u32 indices on the device (token ids, targets, positions), checked below a bound.
    type Ids: Send;
    /// A RoPE table on the device.
    type Table: Send;
    /// A MoE dispatch plan on the device.
    type Plan: Send;
    /// A MoE layer's routing as the backend keeps it (`route`): its chosen experts, weights and
    /// dispatch plan, and the plan's expert offsets for the host (`route_offsets`).
    type Route: Send;
    /// A loss the device computed, read on the host later (`read_loss`): a MoE layer's balance
    /// loss is read once the step's forward has its cross-entropy, not when the layer ends.
    type Loss: Send;
    /// What attention's forward keeps for its backward (probabilities on the CPU, the row
    /// log-sum-exp on CUDA).
    type AttnAux: Send;
    /// BF16 values on the device (the AdamW moments of the FP8 recipe).
    type Half: Send;

    /// e.g. `cpu (2 threads)` or `cuda:0 NVIDIA H200 …`.
    fn describe(&self) -> String;
    fn len(&self, x: &Self::Buf) -> usize;
    fn upload(&self, x: &[f32]) -> BackendResult<Self::Buf>;
    fn download(&self, x: &Self::Buf) -> BackendResult<Vec<f32>>;
    fn zeros(&self, n: usize) -> BackendResult<Self::Buf>;
    /// A copy of `x` on the device (a deferred weight gradient keeps its inputs).
    fn copy(&self, x: &Self::Buf) -> BackendResult<Self::Buf>;
    /// A copy of `ids` on the device.
    fn copy_ids(&self, ids: &Self::Ids) -> BackendResult<Self::Ids>;
    /// Sets every element to zero.
    fn fill_zero(&self, x: &mut Self::Buf) -> BackendResult<()>;
    fn ids(&self, ids: &[u32], bound: usize) -> BackendResult<Self::Ids>;
    fn table(&self, t: &RopeTable) -> BackendResult<Self::Table>;
    fn plan(&self, p: &HostPlan) -> BackendResult<Self::Plan>;
    /// Waits for queued work (a no-op on the CPU).
    fn synchronize(&self) -> BackendResult<()>;
    /// Makes the device current on the calling thread, before a run of calls from a thread that
    /// may not have made any yet (a no-op on the CPU).
    fn enter(&self) -> BackendResult<()> {
        Ok(())
    }
    /// From here to the matching [`release_weights`](Self::release_weights) the caller neither
    /// writes nor frees a weight it hands the Linear and grouped GEMMs (their `w` and `params`),
    /// so the backend may keep each weight's BF16 rounding or FP8 quantisation and reuse it
    /// (`weight_cache`): the backward's input gradient and later micro-batches then prepare no W
    /// again. Holds nest; [`WeightsHeld`] pairs them. The default keeps nothing.
    fn hold_weights(&self) {}
    /// Ends a [`hold_weights`](Self::hold_weights); the kept weights go at the last.
    fn release_weights(&self) {}
    /// (weights reused, weights prepared and kept) since the backend was made.
    fn weight_reuse(&self) -> (u64, u64) {
        (0, 0)
    }

    /// y[n, dout] = x[n, din] · w[dout, din]ᵀ
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<Self::Buf>;
    /// dx[n, din] (+)= dy[n, dout] · w[dout, din]
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_input(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        din: usize,
        dout: usize,
        acc: bool,
        p: GemmPrecision,
    ) -> BackendResult<()>;
    /// dw[dout, din] += dy[n, dout]ᵀ · x[n, din]
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_weight(
        &self,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        n: usize,
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<()>;

    /// A Linear's backward in one call: dx (+)= dy·W, then dw += dyᵀ·x (a device may share work
    /// between the two, as CUDA shares dy's BF16 rounding). `shape` is (n, din, dout).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        w: &Self::Buf,
        x: &Self::Buf,
        (n, din, dout): (usize, usize, usize),
        acc: bool,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        self.linear_backward_input(dx, dy, w, n, din, dout, acc, p)?;
        self.linear_backward_weight(dw, dy, x, n, din, dout, p)
    }

    /// DeepSeek-V3's FP8 Fprop (`fp8::linear_fprop_fp8`): y = x·Wᵀ with x in 1×128 E4M3 tiles
    /// and W in 128×128 blocks, FP32 promotion per 128 of K.
    fn fp8_linear_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<Self::Buf>;
    /// FP8 Dgrad (`fp8::linear_dgrad_fp8`): dx = dy·W, dy in 1×128 tiles, W in 128×128 blocks.
    fn fp8_linear_backward_input(
        &self,
        dy: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<Self::Buf>;
    /// FP8 Wgrad as the CPU model's weight job: x quantised 1×128 (what Fprop consumed), then
    /// requantised 128×1; dy 128×1; dw += dyᵀ·x.
    #[allow(clippy::too_many_arguments)]
    fn fp8_linear_backward_weight(
        &self,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<()>;

    /// (y, rstd) of RMSNorm over rows of `d`.
    fn rmsnorm_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        d: usize,
        eps: f32,
    ) -> BackendResult<(Self::Buf, Self::Buf)>;
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward_input(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        rstd: &Self::Buf,
        w: &Self::Buf,
        d: usize,
        acc: bool,
    ) -> BackendResult<()>;
    /// dw[d] += Σ_rows dy ⊙ x·rstd
    fn rmsnorm_backward_weight(
        &self,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        rstd: &Self::Buf,
        d: usize,
    ) -> BackendResult<()>;

    /// h = SiLU(a) ⊙ b
    fn swiglu_forward(&self, a: &Self::Buf, b: &Self::Buf) -> BackendResult<Self::Buf>;
    /// (da, db)
    fn swiglu_backward_input(
        &self,
        dh: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
    ) -> BackendResult<(Self::Buf, Self::Buf)>;

    /// Rotates columns [offset, offset + table dim) of every row of x[rows, stride] in place
    /// (`backward`: by the negative angle, the input gradient).
    fn rope(
        &self,
        x: &mut Self::Buf,
        stride: usize,
        offset: usize,
        positions: &Self::Ids,
        table: &Self::Table,
        backward: bool,
    ) -> BackendResult<()>;

    /// Causal attention per (sequence, head) block: o[bh, t, dv] and what backward keeps. In
    /// `p` = BF16 the six products read BF16-rounded operands with f32 sums (a GPU's tensor-core
    /// attention; the softmax stays f32); f32 is the reference.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        bh: usize,
        t: usize,
        dqk: usize,
        dv: usize,
        scale: f32,
        p: GemmPrecision,
    ) -> BackendResult<(Self::Buf, Self::AttnAux)>;
    /// (dq, dk, dv) from d_o and the forward's output and aux (`p` as the forward's).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_input(
        &self,
        d_o: &Self::Buf,
        o: &Self::Buf,
        aux: &Self::AttnAux,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        bh: usize,
        t: usize,
        dqk: usize,
        dv: usize,
        scale: f32,
        p: GemmPrecision,
    ) -> BackendResult<(Self::Buf, Self::Buf, Self::Buf)>;

    /// Σ_rows −log softmax(logits)[target], in f64.
    fn cross_entropy_forward(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ids,
        v: usize,
    ) -> BackendResult<f64>;
    /// scale · (softmax − onehot)
    fn cross_entropy_backward_input(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ids,
        v: usize,
        scale: f32,
    ) -> BackendResult<Self::Buf>;

    /// Rows `ids` of table[vocab, d].
    fn embedding_forward(
        &self,
        ids: &Self::Ids,
        table: &Self::Buf,
        d: usize,
    ) -> BackendResult<Self::Buf>;
    /// dtable[ids] += dy, rows in id order.
    fn embedding_backward_weight(
        &self,
        dtable: &mut Self::Buf,
        ids: &Self::Ids,
        dy: &Self::Buf,
        d: usize,
    ) -> BackendResult<()>;

    /// a + b
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> BackendResult<Self::Buf>;
    /// dst += src
    fn add_into(&self, dst: &mut Self::Buf, src: &Self::Buf) -> BackendResult<()>;
    /// x *= f
    fn scale(&self, x: &mut Self::Buf, f: f32) -> BackendResult<()>;
    /// dst[r, dst_off..+width] (+)= src[r, src_off..+width] for r < rows (row strides `dst_w`,
    /// `src_w`): slicing and concatenating columns.
    #[allow(clippy::too_many_arguments)]
    fn copy_cols(
        &self,
        dst: &mut Self::Buf,
        dst_w: usize,
        dst_off: usize,
        src: &Self::Buf,
        src_w: usize,
        src_off: usize,
        width: usize,
        acc: bool,
    ) -> BackendResult<()>;
    /// [b, t, nh, w] → [b, nh, t, w] (`inverse`: back).
    #[allow(clippy::too_many_arguments)]
    fn heads(
        &self,
        x: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
        inverse: bool,
    ) -> BackendResult<Self::Buf>;
    /// x[b·t, w] repeated for every head: [b, nh, t, w].
    fn broadcast_heads(
        &self,
        x: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
    ) -> BackendResult<Self::Buf>;
    /// [b, nh, t, w] summed over heads in head order into [b·t, w] (broadcast's gradient).
    fn sum_heads(
        &self,
        x: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
    ) -> BackendResult<Self::Buf>;

    /// s = sigmoid(x)
    fn sigmoid_forward(&self, x: &Self::Buf) -> BackendResult<Self::Buf>;
    /// ds ⊙ s(1 − s)
    fn sigmoid_backward_input(&self, ds: &Self::Buf, s: &Self::Buf) -> BackendResult<Self::Buf>;

    /// xe[rows, d]: the tokens' rows in plan order.
    fn dispatch_forward(&self, x: &Self::Buf, p: &Self::Plan, d: usize)
    -> BackendResult<Self::Buf>;
    /// dx[token] += its rows of dxe, in ascending row order.
    fn dispatch_backward_input(
        &self,
        dx: &mut Self::Buf,
        dxe: &Self::Buf,
        p: &Self::Plan,
        d: usize,
    ) -> BackendResult<()>;
    /// out[token] += Σ weight · ye[row], rows ascending.
    fn combine_forward(
        &self,
        out: &mut Self::Buf,
        ye: &Self::Buf,
        p: &Self::Plan,
        d: usize,
    ) -> BackendResult<()>;
    /// (dye, dweights[tokens, k]).
    fn combine_backward_input(
        &self,
        dout: &Self::Buf,
        ye: &Self::Buf,
        p: &Self::Plan,
        d: usize,
    ) -> BackendResult<(Self::Buf, Self::Buf)>;
    /// Routes a MoE layer's `s.len() / e` tokens from their sigmoid affinities s [n, e] and the
    /// selection bias [e]: `ops::moe_gate::forward` (group-limited top-k), then the dispatch plan
    /// (`DispatchPlan`, `HostPlan`'s rows per token).
    fn route(
        &self,
        s: &Self::Buf,
        bias: &Self::Buf,
        rule: &RouteRule,
        e: usize,
    ) -> BackendResult<Self::Route>;
    /// The route's dispatch plan.
    fn route_plan<'r>(&self, r: &'r Self::Route) -> &'r Self::Plan;
    /// The route's expert offsets (E + 1): expert i's rows are `offsets[i]..offsets[i + 1]`. On a
    /// device the first call waits for them (not for the work queued after the routing), so a
    /// caller queues what does not need them first.
    fn route_offsets<'r>(&self, r: &'r Self::Route) -> BackendResult<&'r [usize]>;
    /// The layer's balance loss over `batch` sequences of `seq` tokens
    /// (`ops::balance::batch_loss_forward`), to be read by `read_loss`.
    fn balance_loss(
        &self,
        s: &Self::Buf,
        r: &Self::Route,
        seq_batch: (usize, usize),
        alpha: f32,
    ) -> BackendResult<Self::Loss>;
    /// A loss's value (on a device, once its copy to the host has finished).
    fn read_loss(&self, l: Self::Loss) -> BackendResult<f64>;
    /// ds [n, e]: the router's gradient from dweights [n, k] (`moe_gate::backward_input`), plus
    /// the balance loss's (`balance::batch_loss_backward_input`) when `alpha > 0`.
    fn route_backward(
        &self,
        dweights: &Self::Buf,
        s: &Self::Buf,
        r: &Self::Route,
        rule: &RouteRule,
        seq_batch: (usize, usize),
        alpha: f32,
    ) -> BackendResult<Self::Buf>;
    /// Rows [lo, hi) of x[rows, d] as a buffer of their own.
    fn rows(&self, x: &Self::Buf, lo: usize, hi: usize, d: usize) -> BackendResult<Self::Buf>;
    /// dst rows [at, at + rows of src) (+)= src.
    fn put_rows(
        &self,
        dst: &mut Self::Buf,
        at: usize,
        src: &Self::Buf,
        d: usize,
        acc: bool,
    ) -> BackendResult<()>;

    /// The routed experts' Linear forward (`grouped`): y[rows, dout], segment e of x[rows, din]
    /// times `params[ids[e]]`ᵀ.
    #[allow(clippy::too_many_arguments)]
    fn grouped_linear_forward(
        &self,
        x: &Self::Buf,
        params: &[Self::Buf],
        ids: &[usize],
        offsets: &[usize],
        din: usize,
        dout: usize,
        kind: ExpertGemm,
    ) -> BackendResult<Self::Buf>
    where
        Self: Sized,
    {
        grouped::forward_per_segment(self, x, params, ids, offsets, din, dout, kind)
    }
    /// dx[rows, din] (+)= segment e of dy[rows, dout] times `params[ids[e]]`.
    #[allow(clippy::too_many_arguments)]
    fn grouped_linear_backward_input(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        params: &[Self::Buf],
        ids: &[usize],
        offsets: &[usize],
        din: usize,
        dout: usize,
        acc: bool,
        kind: ExpertGemm,
    ) -> BackendResult<()>
    where
        Self: Sized,
    {
        grouped::backward_input_per_segment(
            self, dx, dy, params, ids, offsets, din, dout, acc, kind,
        )
    }
    /// grads[ids[e]] += (segment e of dy)ᵀ · (segment e of x).
    #[allow(clippy::too_many_arguments)]
    fn grouped_linear_backward_weight(
        &self,
        grads: &mut [Self::Buf],
        ids: &[usize],
        dy: &Self::Buf,
        x: &Self::Buf,
        offsets: &[usize],
        din: usize,
        dout: usize,
        kind: ExpertGemm,
    ) -> BackendResult<()>
    where
        Self: Sized,
    {
        grouped::backward_weight_per_segment(self, grads, ids, dy, x, offsets, din, dout, kind)
    }

    /// The L2 norm of all `grads` together in f64, `ops::adamw::global_norm`'s fixed order.
    fn global_norm(&self, grads: &[&Self::Buf]) -> BackendResult<f64>;
    fn zeros_half(&self, n: usize) -> BackendResult<Self::Half>;
    /// BF16 values as their bits.
    fn upload_half(&self, bits: &[u16]) -> BackendResult<Self::Half>;
    fn download_half(&self, x: &Self::Half) -> BackendResult<Vec<u16>>;
    /// One AdamW update with BF16 moments (`ops::adamw::step_bf16`); zeroes `g`.
    fn adamw_step_bf16(
        &self,
        p: &mut Self::Buf,
        g: &mut Self::Buf,
        m: &mut Self::Half,
        v: &mut Self::Half,
        grad_scale: f32,
        c: &StepConsts,
    ) -> BackendResult<()>;
    /// One AdamW update with f32 moments from `g · grad_scale`; zeroes `g`.
    fn adamw_step(
        &self,
        p: &mut Self::Buf,
        g: &mut Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        grad_scale: f32,
        c: &StepConsts,
    ) -> BackendResult<()>;
    /// The updates of many tensors from `g · grad_scale`, each as [`adamw_step`](Self::adamw_step)
    /// or [`adamw_step_bf16`](Self::adamw_step_bf16) makes it (a device may launch them
    /// together); zeroes every `g`. The default runs them in turn.
    fn adamw_steps(&self, jobs: Vec<AdamJob<'_, Self>>, grad_scale: f32) -> BackendResult<()> {
        for j in jobs {
            match j.moments {
                MomentsMut::F32(m, v) => self.adamw_step(j.p, j.g, m, v, grad_scale, &j.c)?,
                MomentsMut::Bf16(m, v) => self.adamw_step_bf16(j.p, j.g, m, v, grad_scale, &j.c)?,
            }
        }
        Ok(())
    }
}

//! The CUDA backend (feature `cuda`): `Backend` on one device, every primitive a launch of an
//! NVRTC kernel of this folder or a cuBLAS SGEMM, all on the `Gpu`'s one stream, so the step's
//! order is the stream's order. Buffers come from the device's stream-ordered memory pool
//! (`cuMemAllocAsync`), whose release threshold is raised to keep freed memory in the pool: a
//! step's buffers are reused by the next step instead of going back to the driver.
//!
//! **Compile-checked only: this backend has never run on a GPU.** Its composition is the one the
//! CPU backend runs bit for bit (`kernels/tests/device_model.rs`); each primitive is compared
//! with its CPU twin by `gpu_parity.rs` (on a GPU) and `cuda_emulation.rs` (on the CPU).

use super::attention_gemm::CudaAttnAux;
use super::fp8_linear::{Fp8Linear, Quantised};
use super::launch::{AttentionShape, Blas, Gpu, GpuError, Indices, LinearGemm, MoePlan, Refusals};
use super::route::{CudaLoss, CudaRoute};
use crate::device::backend::weight_cache::WeightCache;
use crate::device::backend::{
    AdamJob, Backend, BackendError, BackendResult, ExpertGemm, GemmPrecision, HostPlan, MomentsMut,
};
use crate::ops::adamw::StepConsts;
use crate::ops::moe_gate::RouteRule;
use crate::ops::rope::RopeTable;
use cudarc::driver::CudaSlice;

impl From<GpuError> for BackendError {
    fn from(e: GpuError) -> BackendError {
        BackendError(e.to_string())
    }
}

/// A RoPE table on the device.
pub struct CudaTable {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    half: usize,
}

/// One CUDA device as a `Backend`.
pub struct CudaBackend {
    pub gpu: Gpu,
    pub(super) blas: Blas,
    /// The FP8 Linear's GEMM engine (tensor cores through cuBLASLt, or the CUDA-core kernel).
    pub fp8: Fp8Linear,
    /// Grouped expert GEMMs cuBLAS refused (then run expert by expert).
    pub grouped_refused: Refusals,
    /// Why the grouped expert GEMMs are off (`PHALANX_GROUPED_GEMM=off`, or the check at open
    /// failed), or None when they are on.
    pub grouped_off: Option<String>,
    /// FP8 experts in one launch per GEMM (`fp8_grouped.rs`): Ok(their agreement with the
    /// expert-by-expert loop at open), or why they go expert by expert.
    pub fp8_grouped: Result<f64, String>,
    /// MoE layers route on the host (`PHALANX_DEVICE_ROUTER=off`) instead of with `router.cu`.
    pub host_routing: bool,
    /// cuBLAS refused a grouped call on BF16 operands: BF16 expert GEMMs go one cublasGemmEx
    /// per expert on the grouped call's addresses (`launch::grouped`).
    pub grouped_bf16_refused: std::cell::Cell<bool>,
    /// Why BF16 attention runs the fused f32 kernel instead of the tensor cores
    /// (`attention_gemm.rs`: `PHALANX_GEMM_ATTENTION=off`, or its check at open failed).
    pub gemm_attention_off: Option<String>,
    /// The checks at open were not run again: an earlier open of this device in the process
    /// decided the fast paths above.
    pub checks_reused: bool,
    /// Whether weights are kept while held (`PHALANX_WEIGHT_REUSE=off`: prepared at every use).
    pub reuse_weights: bool,
    /// Weights' BF16 roundings, kept while the model holds its weights (`backend::weight_cache`).
    pub(super) bf16_weights: WeightCache<CudaSlice<u16>>,
    /// Weights' 128×128 FP8 quantisations (one W, or every expert's of a MoE projection), kept
    /// while held.
    pub(super) fp8_weights: WeightCache<Quantised>,
}

impl CudaBackend {
    /// A zeroed f32 buffer of `n` from the pool.
    pub(super) fn buf(&self, n: usize) -> BackendResult<CudaSlice<f32>> {
        Ok(self.gpu.zeros(n)?)
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Ids = Indices;
    type Table = CudaTable;
    type Plan = MoePlan;
    type Route = CudaRoute;
    type Loss = CudaLoss;
    type AttnAux = CudaAttnAux;
    type Half = CudaSlice<u16>;

    fn describe(&self) -> String {
        self.description()
    }

    fn len(&self, x: &CudaSlice<f32>) -> usize {
        x.len()
    }

    fn upload(&self, x: &[f32]) -> BackendResult<CudaSlice<f32>> {
        if x.is_empty() {
            return self.buf(0);
        }
        Ok(self.gpu.upload(x)?)
    }

    fn download(&self, x: &CudaSlice<f32>) -> BackendResult<Vec<f32>> {
        Ok(self.gpu.download(x)?)
    }

    fn zeros(&self, n: usize) -> BackendResult<CudaSlice<f32>> {
        self.buf(n)
    }

    fn copy(&self, x: &CudaSlice<f32>) -> BackendResult<CudaSlice<f32>> {
        Ok(x.try_clone().map_err(GpuError::from)?)
    }

    fn copy_ids(&self, ids: &Indices) -> BackendResult<Indices> {
        Ok(ids.try_clone()?)
    }

    fn fill_zero(&self, x: &mut CudaSlice<f32>) -> BackendResult<()> {
        self.gpu
            .stream()
            .memset_zeros(x)
            .map_err(|e| BackendError(format!("memset: {e}")))
    }

    fn ids(&self, ids: &[u32], bound: usize) -> BackendResult<Indices> {
        Ok(self.gpu.upload_indices(ids, bound)?)
    }

    fn table(&self, t: &RopeTable) -> BackendResult<CudaTable> {
        Ok(CudaTable {
            cos: self.gpu.upload(&t.cos)?,
            sin: self.gpu.upload(&t.sin)?,
            half: t.half,
        })
    }

    fn plan(&self, p: &HostPlan) -> BackendResult<MoePlan> {
        Ok(self.gpu.upload_plan(p)?)
    }

    fn synchronize(&self) -> BackendResult<()> {
        Ok(self.gpu.synchronize()?)
    }

    fn hold_weights(&self) {
        if self.reuse_weights {
            self.bf16_weights.hold();
            self.fp8_weights.hold();
        }
    }

    fn release_weights(&self) {
        if self.reuse_weights {
            self.bf16_weights.release();
            self.fp8_weights.release();
        }
    }

    fn weight_reuse(&self) -> (u64, u64) {
        let ((a, b), (c, d)) = (self.bf16_weights.counts(), self.fp8_weights.counts());
        (a + c, b + d)
    }

    fn enter(&self) -> BackendResult<()> {
        Ok(self
            .gpu
            .context()
            .bind_to_thread()
            .map_err(GpuError::from)?)
    }

    fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut y = self.buf(n * dout)?;
        self.gemm(LinearGemm::Forward, &mut y, x, w, n, din, dout, p)?;
        Ok(y)
    }

    fn linear_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
        acc: bool,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        let which = LinearGemm::BackwardInput { acc };
        self.gemm(which, dx, dy, w, n, din, dout, p)
    }

    fn linear_backward_weight(
        &self,
        dw: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        self.gemm(LinearGemm::BackwardWeight, dw, dy, x, n, din, dout, p)
    }

    fn linear_backward(
        &self,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        (n, din, dout): (usize, usize, usize),
        acc: bool,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        self.linear_backward_shared_dy(dx, dw, dy, w, x, (n, din, dout), acc, p)
    }

    fn fp8_linear_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<CudaSlice<f32>> {
        let wq = self.fp8_weight(w, dout, din)?;
        Ok(self.fp8.forward(&self.gpu, x, &wq, n, din, dout)?)
    }

    fn fp8_linear_backward_input(
        &self,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<CudaSlice<f32>> {
        let wq = self.fp8_weight(w, dout, din)?;
        Ok(self.fp8.backward_input(&self.gpu, dy, &wq, n, din, dout)?)
    }

    fn fp8_linear_backward_weight(
        &self,
        dw: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<()> {
        let g = self.fp8.backward_weight(&self.gpu, dy, x, n, din, dout)?;
        self.add_into(dw, &g)
    }

    fn grouped_linear_forward(
        &self,
        x: &CudaSlice<f32>,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        offsets: &[usize],
        din: usize,
        dout: usize,
        kind: ExpertGemm,
    ) -> BackendResult<CudaSlice<f32>> {
        self.grouped_forward(x, params, ids, offsets, (din, dout), kind)
    }

    fn grouped_linear_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        offsets: &[usize],
        din: usize,
        dout: usize,
        acc: bool,
        kind: ExpertGemm,
    ) -> BackendResult<()> {
        self.grouped_backward_input(dx, dy, params, ids, offsets, (din, dout), acc, kind)
    }

    fn grouped_linear_backward_weight(
        &self,
        grads: &mut [CudaSlice<f32>],
        ids: &[usize],
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        offsets: &[usize],
        din: usize,
        dout: usize,
        kind: ExpertGemm,
    ) -> BackendResult<()> {
        self.grouped_backward_weight(grads, ids, dy, x, offsets, (din, dout), kind)
    }

    fn rmsnorm_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        d: usize,
        eps: f32,
    ) -> BackendResult<(CudaSlice<f32>, CudaSlice<f32>)> {
        let rows = x.len() / d;
        let (mut y, mut rstd) = (self.buf(x.len())?, self.buf(rows)?);
        self.gpu
            .rmsnorm_forward(&mut y, &mut rstd, x, w, rows, d, eps)?;
        Ok((y, rstd))
    }

    fn rmsnorm_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        d: usize,
        acc: bool,
    ) -> BackendResult<()> {
        let rows = x.len() / d;
        Ok(self
            .gpu
            .rmsnorm_backward_input(dx, dy, x, rstd, w, rows, d, acc)?)
    }

    fn rmsnorm_backward_weight(
        &self,
        dw: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        d: usize,
    ) -> BackendResult<()> {
        let rows = x.len() / d;
        Ok(self.gpu.rmsnorm_backward_weight(dw, dy, x, rstd, rows, d)?)
    }

    fn swiglu_forward(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut h = self.buf(a.len())?;
        self.gpu.swiglu_forward(&mut h, a, b)?;
        Ok(h)
    }

    fn swiglu_backward_input(
        &self,
        dh: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
    ) -> BackendResult<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (mut da, mut db) = (self.buf(dh.len())?, self.buf(dh.len())?);
        self.gpu.swiglu_backward_input(&mut da, &mut db, dh, a, b)?;
        Ok((da, db))
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        stride: usize,
        offset: usize,
        positions: &Indices,
        table: &CudaTable,
        backward: bool,
    ) -> BackendResult<()> {
        Ok(self.gpu.rope(
            x, stride, offset, positions, &table.cos, &table.sin, table.half, backward,
        )?)
    }

    fn attention_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        bh: usize,
        t: usize,
        dqk: usize,
        dv: usize,
        scale: f32,
        p: GemmPrecision,
    ) -> BackendResult<(CudaSlice<f32>, CudaAttnAux)> {
        let s = AttentionShape {
            bh,
            t,
            dqk,
            dv,
            scale,
        };
        if self.gemm_attention(p, bh, t) {
            return self.attention_forward_gemm(q, k, v, s);
        }
        let (mut o, mut lse) = (self.buf(bh * t * dv)?, self.buf(bh * t)?);
        self.gpu.attention_forward(&mut o, &mut lse, q, k, v, s)?;
        Ok((o, CudaAttnAux::Lse(lse)))
    }

    fn attention_backward_input(
        &self,
        d_o: &CudaSlice<f32>,
        o: &CudaSlice<f32>,
        aux: &CudaAttnAux,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        bh: usize,
        t: usize,
        dqk: usize,
        dv: usize,
        scale: f32,
        _: GemmPrecision,
    ) -> BackendResult<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let s = AttentionShape {
            bh,
            t,
            dqk,
            dv,
            scale,
        };
        // the forward chose the path: its aux says which
        let lse = match aux {
            CudaAttnAux::Probs(p, p16) => {
                return self.attention_backward_gemm(d_o, (p, p16), (q, k, v), s);
            }
            CudaAttnAux::Lse(lse) => lse,
        };
        let (mut dq, mut dk) = (self.buf(bh * t * dqk)?, self.buf(bh * t * dqk)?);
        let (mut dvv, mut delta) = (self.buf(bh * t * dv)?, self.buf(bh * t)?);
        self.gpu.attention_backward_input(
            &mut dq, &mut dk, &mut dvv, &mut delta, d_o, o, lse, q, k, v, s,
        )?;
        Ok((dq, dk, dvv))
    }

    fn cross_entropy_forward(
        &self,
        logits: &CudaSlice<f32>,
        targets: &Indices,
        v: usize,
    ) -> BackendResult<f64> {
        let mut loss = self.buf(targets.len())?;
        let mut total = self.gpu.zeros::<f64>(1)?;
        self.gpu
            .cross_entropy_forward(&mut loss, &mut total, logits, targets, v)?;
        Ok(self.gpu.download(&total)?[0])
    }

    fn cross_entropy_backward_input(
        &self,
        logits: &CudaSlice<f32>,
        targets: &Indices,
        v: usize,
        scale: f32,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut d = self.buf(logits.len())?;
        self.gpu
            .cross_entropy_backward_input(&mut d, logits, targets, v, scale)?;
        Ok(d)
    }

    fn embedding_forward(
        &self,
        ids: &Indices,
        table: &CudaSlice<f32>,
        d: usize,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut out = self.buf(ids.len() * d)?;
        self.gpu.embedding_forward(&mut out, ids, table, d)?;
        Ok(out)
    }

    fn embedding_backward_weight(
        &self,
        dtable: &mut CudaSlice<f32>,
        ids: &Indices,
        dy: &CudaSlice<f32>,
        d: usize,
    ) -> BackendResult<()> {
        Ok(self.gpu.embedding_backward_weight(dtable, ids, dy, d)?)
    }

    fn add(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> BackendResult<CudaSlice<f32>> {
        let mut out = self.buf(a.len())?;
        self.gpu.tensor_add(&mut out, a, b)?;
        Ok(out)
    }

    fn add_into(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> BackendResult<()> {
        if src.len() != dst.len() {
            return Err(BackendError(format!(
                "add_into: {} elements into {}",
                src.len(),
                dst.len()
            )));
        }
        let n = dst.len();
        Ok(self.gpu.tensor_copy(dst, 0, src, 0, n, true)?)
    }

    fn scale(&self, x: &mut CudaSlice<f32>, f: f32) -> BackendResult<()> {
        Ok(self.gpu.tensor_scale(x, f)?)
    }

    fn copy_cols(
        &self,
        dst: &mut CudaSlice<f32>,
        dst_w: usize,
        dst_off: usize,
        src: &CudaSlice<f32>,
        src_w: usize,
        src_off: usize,
        width: usize,
        acc: bool,
    ) -> BackendResult<()> {
        Ok(self
            .gpu
            .tensor_copy_cols(dst, dst_w, dst_off, src, src_w, src_off, width, acc)?)
    }

    fn heads(
        &self,
        x: &CudaSlice<f32>,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
        inverse: bool,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut y = self.buf(x.len())?;
        self.gpu
            .tensor_heads_op("tensor_heads", &mut y, x, [b, t, nh, w], inverse)?;
        Ok(y)
    }

    fn broadcast_heads(
        &self,
        x: &CudaSlice<f32>,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut y = self.buf(b * nh * t * w)?;
        let kn = "tensor_broadcast_heads";
        self.gpu
            .tensor_heads_op(kn, &mut y, x, [b, t, nh, w], false)?;
        Ok(y)
    }

    fn sum_heads(
        &self,
        x: &CudaSlice<f32>,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut y = self.buf(b * t * w)?;
        let kn = "tensor_sum_heads";
        self.gpu
            .tensor_heads_op(kn, &mut y, x, [b, t, nh, w], false)?;
        Ok(y)
    }

    fn sigmoid_forward(&self, x: &CudaSlice<f32>) -> BackendResult<CudaSlice<f32>> {
        let mut s = self.buf(x.len())?;
        self.gpu.sigmoid_forward(&mut s, x)?;
        Ok(s)
    }

    fn sigmoid_backward_input(
        &self,
        ds: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut d = self.buf(ds.len())?;
        self.gpu.sigmoid_backward_input(&mut d, ds, s)?;
        Ok(d)
    }

    fn dispatch_forward(
        &self,
        x: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> BackendResult<CudaSlice<f32>> {
        let mut xe = self.buf(p.rows * d)?;
        self.gpu.moe_dispatch_forward(&mut xe, x, p, d)?;
        Ok(xe)
    }

    fn dispatch_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dxe: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> BackendResult<()> {
        Ok(self.gpu.moe_dispatch_backward_input(dx, dxe, p, d)?)
    }

    fn combine_forward(
        &self,
        out: &mut CudaSlice<f32>,
        ye: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> BackendResult<()> {
        Ok(self.gpu.moe_combine_forward(out, ye, p, d)?)
    }

    fn combine_backward_input(
        &self,
        dout: &CudaSlice<f32>,
        ye: &CudaSlice<f32>,
        p: &MoePlan,
        d: usize,
    ) -> BackendResult<(CudaSlice<f32>, CudaSlice<f32>)> {
        let mut dye = self.buf(p.rows * d)?;
        let mut dw = self.buf(p.tokens * p.k)?;
        self.gpu
            .moe_combine_backward_input(&mut dye, &mut dw, dout, ye, p, d)?;
        Ok((dye, dw))
    }

    fn route(
        &self,
        s: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        rule: &RouteRule,
        e: usize,
    ) -> BackendResult<CudaRoute> {
        self.route_on(s, bias, rule, e)
    }

    fn route_plan<'r>(&self, r: &'r CudaRoute) -> &'r MoePlan {
        r.plan()
    }

    fn route_offsets<'r>(&self, r: &'r CudaRoute) -> BackendResult<&'r [usize]> {
        r.offsets(&self.gpu)
    }

    fn balance_loss(
        &self,
        s: &CudaSlice<f32>,
        r: &CudaRoute,
        seq_batch: (usize, usize),
        alpha: f32,
    ) -> BackendResult<CudaLoss> {
        self.balance_on(s, r, seq_batch, alpha)
    }

    fn read_loss(&self, l: CudaLoss) -> BackendResult<f64> {
        self.read_loss_on(l)
    }

    fn route_backward(
        &self,
        dweights: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
        r: &CudaRoute,
        rule: &RouteRule,
        seq_batch: (usize, usize),
        alpha: f32,
    ) -> BackendResult<CudaSlice<f32>> {
        self.route_backward_on(dweights, s, r, rule, seq_batch, alpha)
    }

    fn rows(
        &self,
        x: &CudaSlice<f32>,
        lo: usize,
        hi: usize,
        d: usize,
    ) -> BackendResult<CudaSlice<f32>> {
        if lo > hi {
            return Err(BackendError(format!("rows {lo}..{hi}")));
        }
        let n = (hi - lo) * d;
        let mut y = self.buf(n)?;
        self.gpu.tensor_copy(&mut y, 0, x, lo * d, n, false)?;
        Ok(y)
    }

    fn put_rows(
        &self,
        dst: &mut CudaSlice<f32>,
        at: usize,
        src: &CudaSlice<f32>,
        d: usize,
        acc: bool,
    ) -> BackendResult<()> {
        let n = src.len();
        Ok(self.gpu.tensor_copy(dst, at * d, src, 0, n, acc)?)
    }

    fn global_norm(&self, grads: &[&CudaSlice<f32>]) -> BackendResult<f64> {
        let live: Vec<&CudaSlice<f32>> = grads.iter().copied().filter(|g| !g.is_empty()).collect();
        Ok(self.gpu.grad_norm_dev(&live)?)
    }

    fn zeros_half(&self, n: usize) -> BackendResult<CudaSlice<u16>> {
        Ok(self.gpu.zeros::<u16>(n)?)
    }

    fn upload_half(&self, bits: &[u16]) -> BackendResult<CudaSlice<u16>> {
        if bits.is_empty() {
            return self.zeros_half(0);
        }
        Ok(self.gpu.upload(bits)?)
    }

    fn download_half(&self, x: &CudaSlice<u16>) -> BackendResult<Vec<u16>> {
        Ok(self.gpu.download(x)?)
    }

    fn adamw_step_bf16(
        &self,
        p: &mut CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        m: &mut CudaSlice<u16>,
        v: &mut CudaSlice<u16>,
        grad_scale: f32,
        c: &StepConsts,
    ) -> BackendResult<()> {
        Ok(self.gpu.adamw_step_dev(p, g, m, v, grad_scale, c)?)
    }

    fn adamw_step(
        &self,
        p: &mut CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        grad_scale: f32,
        c: &StepConsts,
    ) -> BackendResult<()> {
        Ok(self.gpu.adamw_step_dev(p, g, m, v, grad_scale, c)?)
    }

    fn adamw_steps(&self, jobs: Vec<AdamJob<'_, Self>>, grad_scale: f32) -> BackendResult<()> {
        let (mut f32s, mut bf16s) = (Vec::new(), Vec::new());
        for j in jobs {
            match j.moments {
                MomentsMut::F32(m, v) => f32s.push((j.p, j.g, m, v, j.c)),
                MomentsMut::Bf16(m, v) => bf16s.push((j.p, j.g, m, v, j.c)),
            }
        }
        self.gpu.adamw_many_dev(f32s, grad_scale)?;
        Ok(self.gpu.adamw_many_dev(bf16s, grad_scale)?)
    }
}

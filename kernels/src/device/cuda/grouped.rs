//! The CUDA backend's routed-expert GEMMs (feature `cuda`): every expert's Linear in one
//! `cublasGemmGroupedBatchedEx` call (`launch::grouped`) on the dispatched rows in place, no row
//! copies; BF16 rounds the shared operand once and every expert's weight in one launch per call
//! (`tensor_to_bf16_batched`; once per step while the model holds its weights,
//! `backend::weight_cache`). FP8
//! experts run `fp8_grouped.rs` (one launch per GEMM) when its check at open passed; otherwise,
//! and for any call refused (counted in `CudaBackend::grouped_refused`), the reference loop of
//! `backend::grouped`, one Linear per expert; after a BF16 grouped call is refused (cuBLAS may not
//! take BF16 operands with an f32 output), BF16 calls go one `cublasGemmEx` per expert on the
//! same addresses. The grouped calls are on only
//! when, at open, they agree with that loop on random experts (`CudaBackend::grouped_check`;
//! `PHALANX_GROUPED_GEMM=off` turns them off). Never run on a GPU.

use super::backend::CudaBackend;
use super::launch::{Group, LinearGemm};
use crate::device::backend::grouped::{self, ExpertGemm, segments};
use crate::device::backend::weight_cache::{Form, Storage};
use crate::device::backend::{Backend, BackendError, BackendResult, GemmPrecision};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// The bytes of one operand element: BF16 bits or f32.
fn elem(p: GemmPrecision) -> u64 {
    match p {
        GemmPrecision::F32 => 4,
        GemmPrecision::Bf16 => 2,
    }
}

fn check(what: &str, len: usize, want: usize) -> BackendResult<()> {
    crate::device::backend::check_len("grouped gemm", what, len, want)
}

/// The fast paths of the experts' GEMMs that a check at open compares with the expert loop.
#[derive(Clone, Copy, Debug)]
pub(super) enum FastExperts {
    /// One `cublasGemmGroupedBatchedEx` per projection on f32 operands.
    CublasGrouped,
    /// The same on BF16 operands (or, once cuBLAS refused those, one `cublasGemmEx` per expert).
    CublasGroupedBf16,
    /// FP8 experts in one launch of `fp8_grouped.cu` per GEMM.
    Fp8OneLaunch,
}

/// An operand as the GEMM reads it: the f32 buffer, or its BF16 rounding.
enum Operand<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(Arc<CudaSlice<u16>>),
}

/// What each expert brings to a grouped GEMM besides its rows of the shared operand.
#[derive(Clone, Copy)]
enum PerExpert<'a> {
    /// Its weight `params[ids[e]]` (`[dout, din]`; in BF16 every expert's rounded in one launch).
    Weights(&'a [CudaSlice<f32>], &'a [usize]),
    /// Its rows of this operand, `width` values each (the weight gradient's x).
    Rows(&'a CudaSlice<f32>, usize),
}

impl CudaBackend {
    /// Rows `x` as the GEMM reads them: as is, or rounded to BF16 for this call.
    fn operand<'a>(&self, x: &'a CudaSlice<f32>, p: GemmPrecision) -> BackendResult<Operand<'a>> {
        Ok(match p {
            GemmPrecision::F32 => Operand::F32(x),
            GemmPrecision::Bf16 => Operand::Bf16(Arc::new(self.bf16(x)?)),
        })
    }

    /// Every expert's weight (`params[ids[e]]`, `len` values each) rounded to BF16 in one launch,
    /// expert e's bits at `e·len`: kept while the weights are held.
    fn bf16_expert_weights(
        &self,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        len: usize,
    ) -> BackendResult<Arc<CudaSlice<u16>>> {
        let stream = self.gpu.stream();
        let xs: Vec<u64> = ids
            .iter()
            .map(|&id| params[id].device_ptr(stream).0)
            .collect();
        let at = Storage {
            addrs: xs.clone(),
            len,
        };
        self.bf16_weights.get(Form::Bf16, at, || {
            let mut out = self.gpu.zeros::<u16>(xs.len() * len)?;
            self.gpu.to_bf16_batched(&mut out, &xs, len)?;
            Ok::<_, BackendError>(out)
        })
    }

    /// The GEMM `which` for every segment: `shared` is the operand whose rows the segments split
    /// (x or dy), `second` what each expert brings (its W, or for the weight gradient its x rows),
    /// `outs` the output address of each segment.
    #[allow(clippy::too_many_arguments)]
    fn grouped_call(
        &self,
        which: LinearGemm,
        offsets: &[usize],
        shared: (&CudaSlice<f32>, usize),
        second: PerExpert<'_>,
        outs: &[u64],
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        let stream = self.gpu.stream();
        let e = elem(p);
        let ptr = |o: &Operand<'_>| match o {
            Operand::F32(x) => x.device_ptr(stream).0,
            Operand::Bf16(x) => x.device_ptr(stream).0,
        };
        let a = self.operand(shared.0, p)?;
        // each segment's second operand, and what holds it until the call is queued
        let (seconds, held): (Vec<u64>, Option<Operand<'_>>) = match (second, p) {
            (PerExpert::Rows(x, width), _) => {
                let o = self.operand(x, p)?;
                let base = ptr(&o);
                let at = segments(offsets).map(|(_, lo, _)| base + (lo * width) as u64 * e);
                (at.collect(), Some(o))
            }
            (PerExpert::Weights(params, ids), GemmPrecision::F32) => {
                let at = segments(offsets).map(|(x, _, _)| params[ids[x]].device_ptr(stream).0);
                (at.collect(), None)
            }
            (PerExpert::Weights(params, ids), GemmPrecision::Bf16) => {
                let o = Operand::Bf16(self.bf16_expert_weights(params, ids, din * dout)?);
                let base = ptr(&o);
                let at = segments(offsets).map(|(x, _, _)| base + (x * din * dout) as u64 * e);
                (at.collect(), Some(o))
            }
        };
        let a0 = ptr(&a);
        let groups: Vec<Group> = segments(offsets)
            .zip(seconds.iter().zip(outs))
            .map(|((_, lo, hi), (&w_or_x, &out))| Group {
                n: hi - lo,
                a: a0 + (lo * shared.1) as u64 * e,
                w_or_x,
                out,
            })
            .collect();
        let bf16 = p == GemmPrecision::Bf16;
        let one_call = !(bf16 && self.grouped_bf16_refused.get());
        self.blas
            .linear_grouped(&self.gpu, which, &groups, din, dout, (bf16, one_call))
            .map_err(|e| BackendError(e.to_string()))?;
        // the operands' BF16 copies are freed stream-ordered, after the call
        drop((a, held));
        Ok(())
    }

    /// A refused grouped call: counted, and for BF16 operands remembered (cuBLAS may not take
    /// BF16 inputs with an f32 output; later BF16 calls then go one cublasGemmEx per expert on
    /// the same addresses, `launch::grouped`).
    fn refuse_grouped(&self, p: GemmPrecision, e: &BackendError) {
        self.grouped_refused.note(e);
        if p == GemmPrecision::Bf16 {
            self.grouped_bf16_refused.set(true);
        }
    }

    /// FP8 experts whose GEMMs run in one launch each (`fp8_grouped.rs`, on since its check at
    /// open passed).
    fn fp8_in_one_launch(&self, kind: ExpertGemm) -> bool {
        kind == ExpertGemm::Fp8 && self.fp8_grouped.is_ok()
    }

    /// The precision of a grouped call for `kind`, or None when the experts go through the
    /// reference loop: FP8 experts, or the grouped calls off.
    fn grouped_precision(&self, kind: ExpertGemm) -> Option<GemmPrecision> {
        let ExpertGemm::Plain(p) = kind else {
            return None;
        };
        self.grouped_off.is_none().then_some(p)
    }

    /// None when the grouped calls may be used: not turned off by `PHALANX_GROUPED_GEMM=off`,
    /// and on random experts the three GEMMs agree with the expert-by-expert loop normwise, f32
    /// to 1e-5 and BF16 to 1e-4 (`loop_agreement`; a wrong address or leading dimension is off by
    /// O(1); the loop rounds the same operands, so only the order of f32 sums differs). Else why
    /// not. A BF16 grouped call cuBLAS refuses is remembered during the first BF16 pass (whose
    /// forward then runs the loop itself), so a second pass checks the per-expert calls that
    /// replace it.
    pub(super) fn grouped_check(&self) -> Option<String> {
        if std::env::var("PHALANX_GROUPED_GEMM").is_ok_and(|v| v == "off") {
            return Some("PHALANX_GROUPED_GEMM=off".into());
        }
        // runs at open, before `grouped_off` is set: the grouped calls are really made
        let offsets = [0usize, 5, 5, 70, 128];
        match self.loop_agreement(FastExperts::CublasGrouped, (96, 64), &offsets, 0x6e0b) {
            Ok(w) if w <= 1e-5 => {}
            Ok(w) => {
                return Some(format!(
                    "the grouped call differs from the expert loop by {w:.1e}"
                ));
            }
            Err(e) => return Some(format!("the grouped call failed its check: {e}")),
        }
        for _ in 0..2 {
            let bf16 = FastExperts::CublasGroupedBf16;
            match self.loop_agreement(bf16, (96, 64), &offsets, 0xbf16) {
                Ok(w) if w <= 1e-4 => {}
                Ok(w) => {
                    return Some(format!(
                        "on bf16 operands the grouped call differs from the expert loop by {w:.1e}"
                    ));
                }
                Err(e) => {
                    return Some(format!(
                        "on bf16 operands the grouped call failed its check: {e}"
                    ));
                }
            }
            if !self.grouped_bf16_refused.get() {
                break;
            }
        }
        None
    }

    /// The worst normwise difference between `fast` and the expert-by-expert loop
    /// (`backend::grouped`'s reference) on random experts over `offsets` (their weights in reverse
    /// order): the forward, the input gradient added to a prior, and every weight gradient.
    pub(super) fn loop_agreement(
        &self,
        fast: FastExperts,
        (din, dout): (usize, usize),
        offsets: &[usize],
        seed: u64,
    ) -> BackendResult<f64> {
        let rows = offsets.last().copied().unwrap_or(0);
        let mut rng = crate::rng::Rng::new(seed);
        let mut random = |n: usize| -> BackendResult<CudaSlice<f32>> {
            self.upload(&(0..n).map(|_| rng.normal()).collect::<Vec<f32>>())
        };
        let experts = offsets.len() - 1;
        let params = (0..experts)
            .map(|_| random(dout * din))
            .collect::<BackendResult<Vec<_>>>()?;
        let (x, dy, prior) = (
            random(rows * din)?,
            random(rows * dout)?,
            random(rows * din)?,
        );
        let ids: Vec<usize> = (0..experts).rev().collect();
        let shape = (din, dout);
        let kind = match fast {
            FastExperts::CublasGrouped => ExpertGemm::Plain(GemmPrecision::F32),
            FastExperts::CublasGroupedBf16 => ExpertGemm::Plain(GemmPrecision::Bf16),
            FastExperts::Fp8OneLaunch => ExpertGemm::Fp8,
        };
        let mut worst = 0f64;
        let mut judge = |got: &CudaSlice<f32>, want: &CudaSlice<f32>| -> BackendResult<()> {
            let (g, w) = (self.download(got)?, self.download(want)?);
            worst = worst.max(crate::device::norm_rel_error(&g, &w));
            Ok(())
        };
        let y = match fast {
            FastExperts::CublasGrouped | FastExperts::CublasGroupedBf16 => {
                self.grouped_forward(&x, &params, &ids, offsets, shape, kind)?
            }
            FastExperts::Fp8OneLaunch => {
                self.fp8_grouped_forward(&x, &params, &ids, offsets, shape)?
            }
        };
        let want = grouped::forward_per_segment(self, &x, &params, &ids, offsets, din, dout, kind)?;
        judge(&y, &want)?;
        let (mut dx, mut want) = (self.copy(&prior)?, self.copy(&prior)?);
        match fast {
            FastExperts::CublasGrouped | FastExperts::CublasGroupedBf16 => self
                .grouped_backward_input(&mut dx, &dy, &params, &ids, offsets, shape, true, kind)?,
            FastExperts::Fp8OneLaunch => {
                self.fp8_grouped_backward_input(&mut dx, &dy, &params, &ids, offsets, shape, true)?
            }
        }
        grouped::backward_input_per_segment(
            self, &mut want, &dy, &params, &ids, offsets, din, dout, true, kind,
        )?;
        judge(&dx, &want)?;
        let zeros = || {
            (0..experts)
                .map(|_| self.zeros(dout * din))
                .collect::<BackendResult<Vec<_>>>()
        };
        let (mut g, mut h) = (zeros()?, zeros()?);
        match fast {
            FastExperts::CublasGrouped | FastExperts::CublasGroupedBf16 => {
                self.grouped_backward_weight(&mut g, &ids, &dy, &x, offsets, shape, kind)?
            }
            FastExperts::Fp8OneLaunch => {
                self.fp8_grouped_backward_weight(&mut g, &ids, &dy, &x, offsets, shape)?
            }
        }
        grouped::backward_weight_per_segment(
            self, &mut h, &ids, &dy, &x, offsets, din, dout, kind,
        )?;
        for (a, b) in g.iter().zip(&h) {
            judge(a, b)?;
        }
        Ok(worst)
    }

    pub(super) fn grouped_forward(
        &self,
        x: &CudaSlice<f32>,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        offsets: &[usize],
        (din, dout): (usize, usize),
        kind: ExpertGemm,
    ) -> BackendResult<CudaSlice<f32>> {
        if self.fp8_in_one_launch(kind) {
            match self.fp8_grouped_forward(x, params, ids, offsets, (din, dout)) {
                Ok(y) => return Ok(y),
                Err(e) => self.grouped_refused.note(&e),
            }
        }
        let Some(p) = self.grouped_precision(kind) else {
            return grouped::forward_per_segment(self, x, params, ids, offsets, din, dout, kind);
        };
        let rows = offsets.last().copied().unwrap_or(0);
        check("x", x.len(), rows * din)?;
        for &id in ids {
            check("W", params[id].len(), dout * din)?;
        }
        let mut y = self.zeros(rows * dout)?;
        let outs: Vec<u64> = {
            let (y0, _r) = y.device_ptr_mut(self.gpu.stream());
            segments(offsets)
                .map(|(_, lo, _)| y0 + (lo * dout * 4) as u64)
                .collect()
        };
        let call = self.grouped_call(
            LinearGemm::Forward,
            offsets,
            (x, din),
            PerExpert::Weights(params, ids),
            &outs,
            din,
            dout,
            p,
        );
        match call {
            Ok(()) => Ok(y),
            Err(e) => {
                self.refuse_grouped(p, &e);
                grouped::forward_per_segment(self, x, params, ids, offsets, din, dout, kind)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn grouped_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        offsets: &[usize],
        (din, dout): (usize, usize),
        acc: bool,
        kind: ExpertGemm,
    ) -> BackendResult<()> {
        let per_segment = |b: &Self, dx: &mut CudaSlice<f32>| {
            grouped::backward_input_per_segment(
                b, dx, dy, params, ids, offsets, din, dout, acc, kind,
            )
        };
        if self.fp8_in_one_launch(kind) {
            let shape = (din, dout);
            match self.fp8_grouped_backward_input(dx, dy, params, ids, offsets, shape, acc) {
                Ok(()) => return Ok(()),
                Err(e) => self.grouped_refused.note(&e),
            }
        }
        let Some(p) = self.grouped_precision(kind) else {
            return per_segment(self, dx);
        };
        let rows = offsets.last().copied().unwrap_or(0);
        check("dy", dy.len(), rows * dout)?;
        check("dx", dx.len(), rows * din)?;
        for &id in ids {
            check("W", params[id].len(), dout * din)?;
        }
        let outs: Vec<u64> = {
            let (d0, _r) = dx.device_ptr_mut(self.gpu.stream());
            segments(offsets)
                .map(|(_, lo, _)| d0 + (lo * din * 4) as u64)
                .collect()
        };
        let which = LinearGemm::BackwardInput { acc };
        let w = PerExpert::Weights(params, ids);
        match self.grouped_call(which, offsets, (dy, dout), w, &outs, din, dout, p) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.refuse_grouped(p, &e);
                per_segment(self, dx)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn grouped_backward_weight(
        &self,
        grads: &mut [CudaSlice<f32>],
        ids: &[usize],
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        offsets: &[usize],
        (din, dout): (usize, usize),
        kind: ExpertGemm,
    ) -> BackendResult<()> {
        if self.fp8_in_one_launch(kind) {
            match self.fp8_grouped_backward_weight(grads, ids, dy, x, offsets, (din, dout)) {
                Ok(()) => return Ok(()),
                Err(e) => self.grouped_refused.note(&e),
            }
        }
        let Some(p) = self.grouped_precision(kind) else {
            return grouped::backward_weight_per_segment(
                self, grads, ids, dy, x, offsets, din, dout, kind,
            );
        };
        let rows = offsets.last().copied().unwrap_or(0);
        check("dy", dy.len(), rows * dout)?;
        check("x", x.len(), rows * din)?;
        let targets: Vec<usize> = segments(offsets).map(|(e, _, _)| ids[e]).collect();
        // every segment's gradient must exist: an output address left null would be written
        if let Some(id) = targets.iter().find(|&&id| id >= grads.len()) {
            return Err(BackendError(format!("grouped gemm: no gradient {id}")));
        }
        let mut outs = vec![0u64; targets.len()];
        {
            let stream = self.gpu.stream();
            let mut records = Vec::new();
            for (i, g) in grads.iter_mut().enumerate() {
                let at: Vec<usize> = (0..targets.len()).filter(|&s| targets[s] == i).collect();
                if at.is_empty() {
                    continue;
                }
                if at.len() > 1 {
                    return Err(BackendError(format!(
                        "grouped gemm: tensor {i} is two experts' weight"
                    )));
                }
                check("dW", g.len(), dout * din)?;
                let (ptr, r) = g.device_ptr_mut(stream);
                records.push(r);
                outs[at[0]] = ptr;
            }
        }
        let which = LinearGemm::BackwardWeight;
        match self.grouped_call(
            which,
            offsets,
            (dy, dout),
            PerExpert::Rows(x, din),
            &outs,
            din,
            dout,
            p,
        ) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.refuse_grouped(p, &e);
                grouped::backward_weight_per_segment(
                    self, grads, ids, dy, x, offsets, din, dout, kind,
                )
            }
        }
    }
}

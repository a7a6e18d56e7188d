//! The routed experts' FP8 Linears in a few launches per GEMM, whatever the number of experts
//! (feature `cuda`): `fp8_grouped.cu` on the tensor cores over every expert with rows, the
//! problems laid out by `fp8::grouped`. The quantisation is the CPU recipe's, as `Fp8Linear` runs
//! it per expert, done for all experts at once:
//! - x and dy in 1×128 tiles over all rows (a row's tiles do not depend on the other rows, so the
//!   codes are each expert's);
//! - every expert's W in 128×128 blocks in one launch (`fp8_quantize_128x128_batched`), kept for
//!   the input gradient and later micro-batches while the model holds its weights;
//! - for Wgrad, dy and the requantised x in 128×1 tiles over each expert's own rows, in one
//!   launch (`fp8_quantize_128x1_segmented`).
//!
//! Used only when, at open, it agrees with the expert-by-expert loop (`backend::grouped`'s
//! reference through `Fp8Linear`) to `fp8_linear::AGREE` on random experts
//! (`fp8_grouped_check`; `PHALANX_FP8_GROUPED=off` turns it off); a call it refuses runs that
//! loop. Never run on a GPU.

use super::backend::CudaBackend;
use super::fp8_linear::{AGREE, Quantised, quantize};
use super::grouped::FastExperts;
use crate::device::backend::grouped::segments;
use crate::device::backend::weight_cache::{Form, Storage};
use crate::device::backend::{BackendError, BackendResult};
use crate::fp8::grouped::{self as layout, Bases, Problem};
use crate::fp8::{ScaleFormat, ScaleLayout};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// A non-empty segment of the dispatched rows: (expert, lo, hi).
type Segment = (usize, usize, usize);

/// A buffer as the kernel sees it: its device address and length in elements.
type Span = (u64, usize);

/// One expert's GEMM and the buffers it reads and writes.
struct Call {
    problem: Problem,
    a: (Span, Span),
    b: (Span, Span),
    out: Span,
}

fn check(what: &str, len: usize, want: usize) -> BackendResult<()> {
    crate::device::backend::check_len("fp8 grouped gemm", what, len, want)
}

impl CudaBackend {
    /// The device addresses and lengths of a quantised operand.
    fn spans(&self, q: &Quantised) -> (Span, Span) {
        let stream = self.gpu.stream();
        (
            (q.0.device_ptr(stream).0, q.0.len()),
            (q.1.device_ptr(stream).0, q.1.len()),
        )
    }

    /// Every call in one launch, after checking that each problem reads and writes inside its
    /// buffers (the kernel does not check).
    fn launch_calls(&self, calls: &[Call]) -> BackendResult<()> {
        let mut fields = Vec::with_capacity(calls.len() * layout::FIELDS);
        let mut problems = Vec::with_capacity(calls.len());
        for c in calls {
            let Some(ext) = c.problem.extents() else {
                continue;
            };
            let lens = [c.a.0.1, c.a.1.1, c.b.0.1, c.b.1.1, c.out.1];
            let names = ["A codes", "A scales", "B codes", "B scales", "out"];
            for ((e, l), n) in ext.iter().zip(lens).zip(names) {
                if *e > l {
                    return Err(BackendError(format!(
                        "fp8 grouped gemm: {n} reaches {e} of {l} elements"
                    )));
                }
            }
            let at = Bases {
                a_codes: c.a.0.0,
                a_scales: c.a.1.0,
                b_codes: c.b.0.0,
                b_scales: c.b.1.0,
                out: c.out.0,
            };
            fields.extend(c.problem.fields(at));
            problems.push(c.problem);
        }
        Ok(self
            .gpu
            .fp8_grouped_gemm(&fields, &layout::tiles(&problems))?)
    }

    /// Every expert's W (`params[ids[e]]`, e in 0..E) quantised in 128×128 blocks in one launch
    /// (expert e's codes and scales at e·dout·din and e·⌈dout/128⌉·⌈din/128⌉ of the buffers), kept
    /// while the weights are held (the forward's serve the input gradient), with each non-empty
    /// segment (e, lo, hi). Experts without rows are quantised too: one launch and one key for
    /// the projection whichever experts a batch reaches.
    fn weights_128x128(
        &self,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        offsets: &[usize],
        (din, dout): (usize, usize),
    ) -> BackendResult<(Arc<Quantised>, Vec<Segment>)> {
        let stream = self.gpu.stream();
        let mut xs = Vec::with_capacity(ids.len());
        for &id in ids {
            let w = &params[id];
            check("W", w.len(), dout * din)?;
            xs.push(w.device_ptr(stream).0);
        }
        let at = Storage {
            addrs: xs.clone(),
            len: dout * din,
        };
        let q = self
            .fp8_weights
            .get(Form::Fp8Blocks { dout, din }, at, || {
                let per_scales = ScaleLayout::Block128x128.num_scales(dout, din);
                let mut codes = self.gpu.zeros::<u8>(xs.len() * dout * din)?;
                let mut scales = self.gpu.zeros::<f32>(xs.len() * per_scales)?;
                self.gpu.fp8_quantize_128x128_batched(
                    &xs,
                    &mut codes,
                    &mut scales,
                    dout,
                    din,
                    ScaleFormat::F32,
                )?;
                Ok::<_, BackendError>((codes, scales))
            })?;
        Ok((q, segments(offsets).collect()))
    }

    /// y `[rows, dout]`: every expert's rows times its W, one launch.
    pub(super) fn fp8_grouped_forward(
        &self,
        x: &CudaSlice<f32>,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        offsets: &[usize],
        (din, dout): (usize, usize),
    ) -> BackendResult<CudaSlice<f32>> {
        let rows = offsets.last().copied().unwrap_or(0);
        check("x", x.len(), rows * din)?;
        let mut y = self.buf(rows * dout)?;
        if rows == 0 {
            return Ok(y);
        }
        let xq = quantize(&self.gpu, x, rows, din, ScaleLayout::Tile1x128)?;
        let (w, segs) = self.weights_128x128(params, ids, offsets, (din, dout))?;
        let (a, b) = (self.spans(&xq), self.spans(&w));
        let len = y.len();
        let out = (y.device_ptr_mut(self.gpu.stream()).0, len);
        let calls: Vec<Call> = segs
            .iter()
            .map(|&(e, lo, hi)| Call {
                problem: layout::in_weight_batch(layout::fprop(lo, hi, din, dout), e, din, dout),
                a,
                b,
                out,
            })
            .collect();
        self.launch_calls(&calls)?;
        Ok(y)
    }

    /// dx (+)= every expert's dy rows times its W, one launch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_grouped_backward_input(
        &self,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        params: &[CudaSlice<f32>],
        ids: &[usize],
        offsets: &[usize],
        (din, dout): (usize, usize),
        acc: bool,
    ) -> BackendResult<()> {
        let rows = offsets.last().copied().unwrap_or(0);
        check("dy", dy.len(), rows * dout)?;
        check("dx", dx.len(), rows * din)?;
        if rows == 0 {
            return Ok(());
        }
        let gq = quantize(&self.gpu, dy, rows, dout, ScaleLayout::Tile1x128)?;
        let (w, segs) = self.weights_128x128(params, ids, offsets, (din, dout))?;
        let (a, b) = (self.spans(&gq), self.spans(&w));
        let len = dx.len();
        let out = (dx.device_ptr_mut(self.gpu.stream()).0, len);
        let calls: Vec<Call> = segs
            .iter()
            .map(|&(e, lo, hi)| Call {
                problem: layout::in_weight_batch(
                    layout::dgrad(lo, hi, din, dout, acc),
                    e,
                    din,
                    dout,
                ),
                a,
                b,
                out,
            })
            .collect();
        self.launch_calls(&calls)
    }

    /// grads[ids[e]] += (expert e's dy rows)ᵀ · (its x rows), one launch: x as Fprop consumed it
    /// (1×128), dequantised and requantised in 128×1 tiles over the expert's rows, as
    /// `Fp8Linear::backward_weight` does for one expert.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_grouped_backward_weight(
        &self,
        grads: &mut [CudaSlice<f32>],
        ids: &[usize],
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        offsets: &[usize],
        (din, dout): (usize, usize),
    ) -> BackendResult<()> {
        let rows = offsets.last().copied().unwrap_or(0);
        check("dy", dy.len(), rows * dout)?;
        check("x", x.len(), rows * din)?;
        if rows == 0 {
            return Ok(());
        }
        let (xc, xs) = quantize(&self.gpu, x, rows, din, ScaleLayout::Tile1x128)?;
        let mut xd = self.buf(rows * din)?;
        self.gpu
            .fp8_dequantize_dev(&xc, &xs, &mut xd, rows, din, ScaleLayout::Tile1x128)?;
        // each expert's rows quantised 128×1 on their own, every expert in one launch
        let (bands, first) = layout::row_bands(offsets);
        let in_bands = |v: &CudaSlice<f32>, w: usize| -> BackendResult<Quantised> {
            let mut codes = self.gpu.zeros::<u8>(rows * w)?;
            let mut scales = self.gpu.zeros::<f32>(bands.len() / 2 * w)?;
            let f = ScaleFormat::F32;
            self.gpu.fp8_quantize_128x1_segmented(
                v,
                &mut codes,
                &mut scales,
                &bands,
                rows,
                w,
                f,
            )?;
            Ok((codes, scales))
        };
        let (gt, xt) = (in_bands(dy, dout)?, in_bands(&xd, din)?);
        let (a, b) = (self.spans(&gt), self.spans(&xt));
        let mut outs: Vec<Option<Span>> = vec![None; grads.len()];
        let mut calls = Vec::new();
        for (e, lo, hi) in segments(offsets) {
            let id = ids[e];
            let g = grads
                .get_mut(id)
                .ok_or_else(|| BackendError(format!("fp8 grouped gemm: no gradient {id}")))?;
            if outs[id].is_some() {
                return Err(BackendError(format!(
                    "fp8 grouped gemm: tensor {id} is two experts' weight"
                )));
            }
            check("dW", g.len(), dout * din)?;
            let len = g.len();
            let out = (g.device_ptr_mut(self.gpu.stream()).0, len);
            outs[id] = Some(out);
            calls.push(Call {
                problem: layout::wgrad_in_place(lo, hi, first[e], din, dout),
                a,
                b,
                out,
            });
        }
        self.launch_calls(&calls)
    }

    /// Ok(the worst normwise difference) when the one-launch FP8 expert GEMMs may be used: on
    /// random experts (one of them empty, one past 128 rows) the three GEMMs agree with the
    /// expert-by-expert loop to `AGREE` (`loop_agreement`; a wrong fragment layout or address is
    /// off by O(1)); else why not.
    pub(super) fn fp8_grouped_check(&self) -> Result<f64, String> {
        if std::env::var("PHALANX_FP8_GROUPED").is_ok_and(|v| v == "off") {
            return Err("PHALANX_FP8_GROUPED=off".into());
        }
        let offsets = [0usize, 5, 5, 140, 200];
        match self.loop_agreement(FastExperts::Fp8OneLaunch, (256, 192), &offsets, 0xf89e0b) {
            Ok(w) if w <= AGREE => Ok(w),
            Ok(w) => Err(format!(
                "one launch differs from the expert loop by {w:.1e} (> {AGREE:.0e})"
            )),
            Err(e) => Err(format!("its check failed: {e}")),
        }
    }
}

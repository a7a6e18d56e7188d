//! The routed experts of a device MoE layer when they run elsewhere (`--ep`: expert groups behind
//! a `model::layers::ExpertCompute`): the dispatched rows go to the host as `(expert, rows)` blocks
//! in ascending expert order, the answers come back and are uploaded in plan order, and each
//! expert's three weight gradients (computed from zero by its group) are added as dense jobs,
//! exactly as the CPU stage's `Moe::forward_with` / `backward_with` do with the same blocks, so on
//! the CPU backend a device stage with expert groups keeps the CPU formation's bits.

use super::super::backend::grouped::segments;
use super::super::backend::{Backend, BackendError, BackendResult};
use super::layers::Ctx;
use super::weight::{WeightJob, weight_owned};
use crate::model::layers::{ExpertCompute, ExpertSite, Moe};
use std::cell::RefCell;

/// The expert groups a stage's MoE layers hand their routed experts to, for micro-batch `mb`.
pub(crate) struct Remote<'a> {
    pub experts: RefCell<&'a mut dyn ExpertCompute>,
    pub mb: usize,
}

impl<'a> Remote<'a> {
    pub fn new(experts: &'a mut dyn ExpertCompute, mb: usize) -> Self {
        Remote {
            experts: RefCell::new(experts),
            mb,
        }
    }

    /// The site of MoE layer `layer` (decoder layers, then MTP's from `num_hidden_layers`).
    pub fn site(&self, layer: usize) -> ExpertSite {
        ExpertSite { layer, mb: self.mb }
    }
}

/// The `(expert, rows)` blocks of `x` (`[rows, d]` on the device, sorted by expert) over the
/// non-empty segments of `offsets`, on the host.
fn blocks<B: Backend>(
    b: &B,
    x: &B::Buf,
    offsets: &[usize],
    d: usize,
) -> BackendResult<Vec<(usize, Vec<f32>)>> {
    let x = b.download(x)?;
    Ok(segments(offsets)
        .map(|(e, lo, hi)| (e, x[lo * d..hi * d].to_vec()))
        .collect())
}

/// Checks that one answer came back per block, each of `(hi - lo)·d` values.
fn check_answers(what: &str, lens: &[usize], offsets: &[usize], d: usize) -> BackendResult<()> {
    let want: Vec<usize> = segments(offsets).map(|(_, lo, hi)| (hi - lo) * d).collect();
    if lens != want {
        return Err(BackendError(format!(
            "the expert groups answered {what} of lengths {lens:?}, want {want:?}"
        )));
    }
    Ok(())
}

/// The routed experts' output `ye [rows, d]` for the dispatched rows `xe`.
pub(crate) fn forward<B: Backend>(
    c: &Ctx<'_, B>,
    remote: &Remote<'_>,
    layer: usize,
    xe: &B::Buf,
    offsets: &[usize],
    d: usize,
) -> BackendResult<B::Buf> {
    let blocks = blocks(c.b, xe, offsets, d)?;
    let ys = remote
        .experts
        .borrow_mut()
        .forward(remote.site(layer), blocks);
    let lens: Vec<usize> = ys.iter().map(Vec::len).collect();
    check_answers("outputs", &lens, offsets, d)?;
    c.b.upload(&ys.concat())
}

/// The gradient of the dispatched rows from the gradient of the experts' output `dye`; every
/// expert's weight gradients (down, gate, up, the CPU stage's order) go to the context as dense
/// jobs.
pub(crate) fn backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    remote: &Remote<'_>,
    m: &Moe,
    layer: usize,
    dye: &B::Buf,
    offsets: &[usize],
    d: usize,
) -> BackendResult<B::Buf> {
    let blocks = blocks(c.b, dye, offsets, d)?;
    let gs = remote
        .experts
        .borrow_mut()
        .backward(remote.site(layer), blocks);
    let lens: Vec<usize> = gs.iter().map(|g| g.dx.len()).collect();
    check_answers("input gradients", &lens, offsets, d)?;
    let mut dxe = Vec::with_capacity(offsets.last().copied().unwrap_or(0) * d);
    for ((e, _, _), g) in segments(offsets).zip(gs) {
        dxe.extend_from_slice(&g.dx);
        let x = &m.experts[e];
        for (l, grad) in [(&x.down, &g.ddown), (&x.gate, &g.dgate), (&x.up, &g.dup)] {
            if grad.len() != l.d_in * l.d_out {
                return Err(BackendError(format!(
                    "expert {e} of layer {layer}: a weight gradient of {} values, want {}×{}",
                    grad.len(),
                    l.d_out,
                    l.d_in
                )));
            }
            let g = c.b.upload(grad)?;
            weight_owned(c, WeightJob::Dense { w: l.w.0, g })?;
        }
    }
    c.b.upload(&dxe)
}

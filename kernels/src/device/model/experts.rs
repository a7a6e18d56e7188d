//! One expert group on a `Backend` (`--ep` with the formation on devices): `BackendExperts` runs
//! the blocks an `ExpertGroup` is handed as one batch of rows, each block an expert's segment,
//! through the backend's grouped Linears (one grouped GEMM per projection, SwiGLU over every row
//! at once; the CPU backend's grouped ops are the per-expert Linears), every expert's weight
//! gradients from zero as the CPU group's are, so on the CPU backend the answers are the CPU
//! group's bits.

use crate::device::backend::{Backend, BackendError, BackendResult, ExpertGemm, GemmPrecision};
use crate::model::experts::{DeviceExperts, ExpertGroup};
use crate::model::layers::{ExpertGrads, ExpertSite, SwiGlu};
use std::collections::BTreeMap;

use super::layers::upload_params;

/// What a site's forward keeps for its backward: the experts of its blocks, their segments of
/// the rows, the rows and SwiGLU's activations over all of them.
struct Kept<B: Backend> {
    experts: Vec<usize>,
    offsets: Vec<usize>,
    x: B::Buf,
    a: B::Buf,
    bv: B::Buf,
    h: B::Buf,
}

/// An expert group's parameters and kept activations on backend `B`.
pub struct BackendExperts<B: Backend> {
    backend: B,
    /// By the group's local tensor id.
    params: Vec<B::Buf>,
    gemm: GemmPrecision,
    kept: BTreeMap<ExpertSite, Kept<B>>,
}

impl<B: Backend> std::fmt::Debug for BackendExperts<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BackendExperts({}, {} kept)",
            self.backend.describe(),
            self.kept.len()
        )
    }
}

impl<B: Backend> Drop for BackendExperts<B> {
    /// Buffers are freed on whatever thread drops the group: the device is made current first.
    fn drop(&mut self) {
        let _ = self.backend.enter();
    }
}

/// The experts of `experts` at `layer`: their (gate, up, down) local ids, how they multiply, and
/// (d, inter).
fn expert_ids(
    group: &ExpertGroup,
    layer: usize,
    experts: &[usize],
    gemm: GemmPrecision,
) -> ([Vec<usize>; 3], ExpertGemm, (usize, usize)) {
    let sws: Vec<&SwiGlu> = experts.iter().map(|&i| group.expert(layer, i)).collect();
    let ids = |f: fn(&SwiGlu) -> usize| sws.iter().map(|s| f(s)).collect::<Vec<_>>();
    let kind = match sws.first() {
        Some(s) if s.gate.fp8 => ExpertGemm::Fp8,
        _ => ExpertGemm::Plain(gemm),
    };
    let shape = sws.first().map_or((0, 0), |s| (s.gate.d_in, s.gate.d_out));
    let all = [ids(|s| s.gate.w.0), ids(|s| s.up.w.0), ids(|s| s.down.w.0)];
    (all, kind, shape)
}

/// The blocks' rows as one buffer's values, the segment offsets and the experts, checking that
/// each block holds whole rows of `width`.
fn concat(
    blocks: Vec<(usize, Vec<f32>)>,
    width: usize,
) -> BackendResult<(Vec<f32>, Vec<usize>, Vec<usize>)> {
    let mut offsets = vec![0];
    let (mut experts, mut rows) = (Vec::with_capacity(blocks.len()), Vec::new());
    for (i, v) in blocks {
        if width == 0 || !v.len().is_multiple_of(width) {
            return Err(BackendError(format!(
                "expert {i}: a block of {} values is not rows of {width}",
                v.len()
            )));
        }
        offsets.push(offsets.last().copied().unwrap_or(0) + v.len() / width);
        experts.push(i);
        rows.extend_from_slice(&v);
    }
    Ok((rows, offsets, experts))
}

/// `y` split into the blocks' rows of `width`.
fn split(y: Vec<f32>, offsets: &[usize], width: usize) -> Vec<Vec<f32>> {
    offsets
        .windows(2)
        .map(|w| y[w[0] * width..w[1] * width].to_vec())
        .collect()
}

impl<B: Backend> BackendExperts<B> {
    /// An expert group on `backend`, its Linears' GEMMs in `gemm` (FP8 Linears follow the
    /// group's own precision); parameters come with [`DeviceExperts::load`].
    pub fn new(backend: B, gemm: GemmPrecision) -> Self {
        BackendExperts {
            backend,
            params: Vec::new(),
            gemm,
            kept: BTreeMap::new(),
        }
    }

    fn forward_in(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> BackendResult<Vec<Vec<f32>>> {
        if self.kept.contains_key(&site) {
            return Err(BackendError(format!("{site:?}: forward ran twice")));
        }
        if blocks.is_empty() {
            // no rows for this group at this site: nothing to run or keep
            return Ok(Vec::new());
        }
        let experts: Vec<usize> = blocks.iter().map(|b| b.0).collect();
        let ([gate, up, down], kind, (d, inter)) =
            expert_ids(group, site.layer, &experts, self.gemm);
        let (rows, offsets, experts) = concat(blocks, d)?;
        let b = &self.backend;
        b.enter()?;
        let p = &self.params;
        let x = b.upload(&rows)?;
        let a = b.grouped_linear_forward(&x, p, &gate, &offsets, d, inter, kind)?;
        let bv = b.grouped_linear_forward(&x, p, &up, &offsets, d, inter, kind)?;
        let h = b.swiglu_forward(&a, &bv)?;
        let y = b.grouped_linear_forward(&h, p, &down, &offsets, inter, d, kind)?;
        let outs = split(b.download(&y)?, &offsets, d);
        let kept = Kept {
            experts,
            offsets,
            x,
            a,
            bv,
            h,
        };
        self.kept.insert(site, kept);
        Ok(outs)
    }

    fn backward_in(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> BackendResult<Vec<ExpertGrads>> {
        if blocks.is_empty() && !self.kept.contains_key(&site) {
            return Ok(Vec::new());
        }
        let Some(k) = self.kept.remove(&site) else {
            return Err(BackendError(format!(
                "{site:?}: backward before its forward"
            )));
        };
        let ([gate, up, down], kind, (d, inter)) =
            expert_ids(group, site.layer, &k.experts, self.gemm);
        let (rows, offsets, experts) = concat(blocks, d)?;
        if experts != k.experts || offsets != k.offsets {
            return Err(BackendError(format!(
                "{site:?}: backward of experts {experts:?} (offsets {offsets:?}), forward of {:?} ({:?})",
                k.experts, k.offsets
            )));
        }
        let b = &self.backend;
        b.enter()?;
        let p = &self.params;
        let dy = b.upload(&rows)?;
        // each expert's weight gradients from zero, one buffer per (block, projection)
        let zeros = |dout: usize, din: usize| {
            (0..experts.len())
                .map(|_| b.zeros(dout * din))
                .collect::<BackendResult<Vec<_>>>()
        };
        let (mut dgate, mut dup, mut ddown) =
            (zeros(inter, d)?, zeros(inter, d)?, zeros(d, inter)?);
        let each: Vec<usize> = (0..experts.len()).collect();
        // SwiGLU's backward as the in-stage experts': down, SwiGLU, gate, then up
        let mut dh = b.zeros(b.len(&k.a))?;
        b.grouped_linear_backward_input(&mut dh, &dy, p, &down, &offsets, inter, d, false, kind)?;
        b.grouped_linear_backward_weight(&mut ddown, &each, &dy, &k.h, &offsets, inter, d, kind)?;
        let (da, db) = b.swiglu_backward_input(&dh, &k.a, &k.bv)?;
        let mut dx = b.zeros(b.len(&k.x))?;
        b.grouped_linear_backward_input(&mut dx, &da, p, &gate, &offsets, d, inter, false, kind)?;
        b.grouped_linear_backward_weight(&mut dgate, &each, &da, &k.x, &offsets, d, inter, kind)?;
        b.grouped_linear_backward_input(&mut dx, &db, p, &up, &offsets, d, inter, true, kind)?;
        b.grouped_linear_backward_weight(&mut dup, &each, &db, &k.x, &offsets, d, inter, kind)?;
        let dxs = split(b.download(&dx)?, &offsets, d);
        dxs.into_iter()
            .enumerate()
            .map(|(j, dx)| {
                Ok(ExpertGrads {
                    dx,
                    dgate: b.download(&dgate[j])?,
                    dup: b.download(&dup[j])?,
                    ddown: b.download(&ddown[j])?,
                })
            })
            .collect()
    }
}

impl<B: Backend + Send> DeviceExperts for BackendExperts<B> {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn forward(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> Result<Vec<Vec<f32>>, String> {
        self.forward_in(group, site, blocks).map_err(|e| e.0)
    }

    fn backward(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> Result<Vec<ExpertGrads>, String> {
        self.backward_in(group, site, blocks).map_err(|e| e.0)
    }

    fn stashed(&self) -> usize {
        self.kept.len()
    }

    fn reset(&mut self) {
        let _ = self.backend.enter();
        self.kept.clear();
    }

    fn load(&mut self, group: &ExpertGroup) -> Result<(), String> {
        self.params = upload_params(&self.backend, &group.params)
            .map_err(|e| format!("uploading the expert group's parameters: {e}"))?;
        Ok(())
    }
}

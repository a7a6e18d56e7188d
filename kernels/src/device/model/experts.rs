//! One expert group on a `Backend` (`--ep` with the formation on devices): `BackendExperts` runs
//! an `ExpertGroup`'s blocks with the device step's SwiGLU, each expert on its own three weights
//! (the group keeps them as consecutive local tensors, so an expert's `Ctx` is a three-tensor
//! window of the group's), its weight gradients from zero as the CPU group's are, so on the CPU
//! backend the answers are the CPU group's bits.

use super::layers::{Ctx, SwiSt, swiglu_backward, swiglu_forward, upload_params};
use crate::device::backend::{Backend, BackendError, BackendResult, GemmPrecision};
use crate::model::experts::{DeviceExperts, ExpertGroup};
use crate::model::layers::{ExpertGrads, ExpertSite, Linear, SwiGlu};
use crate::model::params::ParamId;
use crate::ops::rope::RopeTable;
use std::collections::BTreeMap;

/// What a block's forward keeps for its backward: the input rows and SwiGLU's activations.
struct Kept<B: Backend> {
    x: B::Buf,
    st: SwiSt<B>,
}

/// An expert group's parameters and kept activations on backend `B`.
pub struct BackendExperts<B: Backend> {
    backend: B,
    /// By the group's local tensor id.
    params: Vec<B::Buf>,
    gemm: GemmPrecision,
    /// A one-position RoPE table: a `Ctx` needs one, SwiGLU never reads it.
    table: B::Table,
    kept: BTreeMap<(ExpertSite, usize), Kept<B>>,
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

/// Expert `sw` with its ids moved into the window of its three tensors (gate, up, down from
/// `sw.gate.w`), and the window's start.
fn windowed(sw: &SwiGlu) -> BackendResult<(SwiGlu, usize)> {
    let base = sw.gate.w.0;
    if sw.up.w.0 != base + 1 || sw.down.w.0 != base + 2 {
        return Err(BackendError(format!(
            "an expert's weights are not consecutive tensors ({}, {}, {})",
            base, sw.up.w.0, sw.down.w.0
        )));
    }
    let at = |l: &Linear, i: usize| Linear {
        w: ParamId(i),
        ..l.clone()
    };
    let local = SwiGlu {
        gate: at(&sw.gate, 0),
        up: at(&sw.up, 1),
        down: at(&sw.down, 2),
    };
    Ok((local, base))
}

impl<B: Backend> BackendExperts<B> {
    /// An expert group on `backend`, its Linears' GEMMs in `gemm` (FP8 Linears follow the
    /// group's own precision); parameters come with [`DeviceExperts::load`].
    pub fn new(backend: B, gemm: GemmPrecision) -> BackendResult<Self> {
        let one = RopeTable {
            half: 1,
            cos: vec![1.0],
            sin: vec![0.0],
        };
        let table = backend.table(&one)?;
        Ok(BackendExperts {
            backend,
            params: Vec::new(),
            gemm,
            table,
            kept: BTreeMap::new(),
        })
    }

    fn window(&self, base: usize) -> BackendResult<&[B::Buf]> {
        self.params
            .get(base..base + 3)
            .ok_or_else(|| BackendError(format!("no parameters at local tensor {base}")))
    }

    fn forward_in(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> BackendResult<Vec<Vec<f32>>> {
        self.backend.enter()?;
        let mut outs = Vec::with_capacity(blocks.len());
        for (i, rows) in blocks {
            if self.kept.contains_key(&(site, i)) {
                return Err(BackendError(format!(
                    "expert {i} at {site:?}: forward ran twice"
                )));
            }
            let (sw, base) = windowed(group.expert(site.layer, i))?;
            let b = &self.backend;
            let c = Ctx::forward_only(b, self.window(base)?, &self.table, self.gemm);
            let x = b.upload(&rows)?;
            let (y, st) = swiglu_forward(&c, &sw, &x)?;
            outs.push(b.download(&y)?);
            self.kept.insert((site, i), Kept { x, st });
        }
        Ok(outs)
    }

    fn backward_in(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> BackendResult<Vec<ExpertGrads>> {
        self.backend.enter()?;
        let mut grads = Vec::with_capacity(blocks.len());
        for (i, dy) in blocks {
            let Some(Kept { x, st }) = self.kept.remove(&(site, i)) else {
                return Err(BackendError(format!(
                    "expert {i} at {site:?}: backward before its forward"
                )));
            };
            let (sw, base) = windowed(group.expert(site.layer, i))?;
            let b = &self.backend;
            let p = self.window(base)?;
            let mut g = p
                .iter()
                .map(|w| b.zeros(b.len(w)))
                .collect::<BackendResult<Vec<_>>>()?;
            let dyb = b.upload(&dy)?;
            let mut dx = b.zeros(b.len(&x))?;
            let mut c = Ctx::forward_only(b, p, &self.table, self.gemm);
            c.g = &mut g;
            swiglu_backward(&mut c, &sw, &dyb, st, &x, &mut dx, false)?;
            grads.push(ExpertGrads {
                dx: b.download(&dx)?,
                dgate: b.download(&g[0])?,
                dup: b.download(&g[1])?,
                ddown: b.download(&g[2])?,
            });
        }
        Ok(grads)
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

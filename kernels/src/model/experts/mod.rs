//! Expert parallelism, compute side: an [`ExpertGroup`] holds the routed experts
//! `[g·E/G, (g+1)·E/G)` of a range of decoder layers in its own parameter store, runs their
//! forward and backward on the rows dispatched to it, keeps their activations between the two and
//! returns each expert's weight gradients of a micro-batch (run from zero buffers, exactly as a
//! stage runs them into its per-micro-batch buffers, so the f32 result is bit-identical).
//! [`LocalExpertGroups`] is the in-process [`ExpertCompute`] over `G` groups. A group's forward
//! and backward run on the CPU model, or on a device ([`DeviceExperts`], `device.rs`).

mod device;

pub use device::DeviceExperts;

use super::deepseek::DeepSeekV3;
use super::layers::{ExpertCompute, ExpertGrads, ExpertSite, Ffn, Linear, SwiGlu, SwiGluStash};
use super::params::{Init, ParamId, ParamStore, TensorSource, WeightGradQueue};
use super::stage::{lock, or_panic, unlocked};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

/// The group that owns routed expert `expert` of `n_experts` split over `groups`.
pub fn group_of(expert: usize, n_experts: usize, groups: usize) -> usize {
    expert / (n_experts / groups)
}

/// One expert group: its experts of every MoE decoder layer in `layers` (and of the MTP modules'
/// MoE layers, numbered from `num_hidden_layers`, when `layers` ends at the last decoder layer).
#[derive(Debug)]
pub struct ExpertGroup {
    pub index: usize,
    pub groups: usize,
    pub params: ParamStore,
    /// `global[local.0]` is the id of the same tensor in the whole model.
    pub global: Vec<ParamId>,
    experts: BTreeMap<(usize, usize), SwiGlu>,
    stashes: BTreeMap<(ExpertSite, usize), SwiGluStash>,
    /// The device the forward and backward run on when not on the CPU model (then `stashes`
    /// stays empty). In a mutex so that the group is `Sync` though a device is only `Send`.
    device: Option<std::sync::Mutex<Box<dyn DeviceExperts>>>,
}

impl ExpertGroup {
    /// Group `index` of `groups` over the decoder layers `layers` of `model` (values copied).
    pub fn new(model: &DeepSeekV3, layers: Range<usize>, index: usize, groups: usize) -> Self {
        let e = model.cfg.n_routed_experts;
        assert!(
            groups >= 1 && e.is_multiple_of(groups) && index < groups,
            "expert group {index} of {groups} over {e} experts"
        );
        let per = e / groups;
        let mut params = ParamStore::default();
        let mut global = Vec::new();
        let mut experts = BTreeMap::new();
        let full = &model.params;
        let mut take = |l: &Linear| -> Linear {
            let t = &full.tensors[l.w.0];
            let id = params.add(
                full.names[l.w.0].clone(),
                &t.shape,
                Init::Zeros,
                full.trainable[l.w.0],
                0,
            );
            params.tensors[id.0].data.copy_from_slice(&t.data);
            global.push(l.w);
            Linear { w: id, ..l.clone() }
        };
        // the last stage also runs the MTP modules: their MoE layers are layers n, n+1, …
        let n = model.cfg.num_hidden_layers;
        let mtp_blocks = model
            .tail
            .mtp
            .iter()
            .enumerate()
            .map(|(k, m)| (n + k, &m.block));
        let blocks = layers.clone().map(|l| (l, &model.blocks[l]));
        let blocks: Vec<_> = if layers.end == n {
            blocks.chain(mtp_blocks).collect()
        } else {
            blocks.collect()
        };
        for (l, block) in blocks {
            if let Ffn::Moe(m) = &block.ffn {
                for i in index * per..(index + 1) * per {
                    let x = &m.experts[i];
                    let sw = SwiGlu {
                        gate: take(&x.gate),
                        up: take(&x.up),
                        down: take(&x.down),
                    };
                    experts.insert((l, i), sw);
                }
            }
        }
        ExpertGroup {
            index,
            groups,
            params,
            global,
            experts,
            stashes: BTreeMap::new(),
            device: None,
        }
    }

    /// Runs the forward and backward on `device` from now on, with the current values.
    pub fn set_device(&mut self, mut device: Box<dyn DeviceExperts>) -> Result<(), String> {
        device.load(self)?;
        self.device = Some(std::sync::Mutex::new(device));
        Ok(())
    }

    /// Where the experts compute: the device's description, or None on the CPU model.
    pub fn device(&self) -> Option<String> {
        self.device.as_ref().map(|d| lock(d).describe())
    }

    /// The device's result, or a panic naming the group and its device (a failure the group's
    /// supervisor heals).
    fn on_device<T>(&self, r: Result<T, String>) -> T {
        or_panic(r, &format!("expert group {}", self.index), self.device())
    }

    /// Copies this group's tensors from a whole-model store (and onto its device).
    pub fn load_from(&mut self, full: &dyn TensorSource) {
        for (local, g) in self.params.tensors.iter_mut().zip(&self.global) {
            local.data.copy_from_slice(&full.tensor(g.0).data);
        }
        if let Some(d) = &self.device {
            let r = lock(d).load(self);
            self.on_device(r);
        }
    }

    /// Drops every kept activation (an aborted step).
    pub fn reset(&mut self) {
        self.stashes.clear();
        if let Some(d) = &mut self.device {
            unlocked(d).reset();
        }
    }

    /// Activations kept for backward (blocks on the CPU model, sites on a device; zero when
    /// every forward's backward ran).
    pub fn stashed(&self) -> usize {
        match &self.device {
            Some(d) => lock(d).stashed(),
            None => self.stashes.len(),
        }
    }

    /// Expert `i` of MoE layer `layer`, by its local tensor ids.
    pub fn expert(&self, layer: usize, i: usize) -> &SwiGlu {
        self.experts.get(&(layer, i)).unwrap_or_else(|| {
            panic!(
                "expert group {} has no expert {i} of layer {layer}",
                self.index
            )
        })
    }

    /// Forward of the dispatched `(expert, rows)` blocks; outputs in the same order.
    pub fn forward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>> {
        if let Some(d) = &self.device {
            let r = lock(d).forward(self, site, blocks);
            return self.on_device(r);
        }
        let outs: Vec<(usize, Vec<f32>, SwiGluStash)> = blocks
            .into_par_iter()
            .map(|(i, x)| {
                let (y, st) = self
                    .expert(site.layer, i)
                    .forward(&self.params, Arc::new(x));
                (i, y, st)
            })
            .collect();
        outs.into_iter()
            .map(|(i, y, st)| {
                let old = self.stashes.insert((site, i), st);
                assert!(old.is_none(), "expert {i} at {site:?}: forward ran twice");
                y
            })
            .collect()
    }

    /// Backward of the `(expert, dy)` blocks: input gradients and weight gradients.
    pub fn backward(
        &mut self,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> Vec<ExpertGrads> {
        if let Some(d) = &self.device {
            let r = lock(d).backward(self, site, blocks);
            return self.on_device(r);
        }
        let work: Vec<(usize, Vec<f32>, SwiGluStash)> = blocks
            .into_iter()
            .map(|(i, dy)| {
                let st = self.stashes.remove(&(site, i)).unwrap_or_else(|| {
                    panic!("expert {i} at {site:?}: backward before its forward")
                });
                (i, dy, st)
            })
            .collect();
        let p = &self.params;
        work.into_par_iter()
            .map(|(i, dy, st)| {
                let x = self.expert(site.layer, i);
                let n = dy.len() / x.down.d_out;
                let mut dx = vec![0.0; n * x.gate.d_in];
                let mut q = WeightGradQueue::default();
                x.backward(p, dy, st, &mut dx, false, &mut q);
                let mut g = ExpertGrads {
                    dx,
                    dgate: vec![0.0; p.tensors[x.gate.w.0].data.len()],
                    dup: vec![0.0; p.tensors[x.up.w.0].data.len()],
                    ddown: vec![0.0; p.tensors[x.down.w.0].data.len()],
                };
                for job in q.jobs {
                    let w = job.param();
                    let dst = if w == x.gate.w {
                        &mut g.dgate
                    } else if w == x.up.w {
                        &mut g.dup
                    } else {
                        assert_eq!(w, x.down.w, "an expert queues only its own weights");
                        &mut g.ddown
                    };
                    job.run_into(p, dst);
                }
                g
            })
            .collect()
    }
}

/// `G` expert groups in this process, as the [`ExpertCompute`] of one stage.
#[derive(Debug)]
pub struct LocalExpertGroups {
    pub groups: Vec<ExpertGroup>,
    n_experts: usize,
}

impl LocalExpertGroups {
    pub fn new(model: &DeepSeekV3, layers: Range<usize>, groups: usize) -> Self {
        LocalExpertGroups {
            groups: (0..groups)
                .map(|g| ExpertGroup::new(model, layers.clone(), g, groups))
                .collect(),
            n_experts: model.cfg.n_routed_experts,
        }
    }

    /// Splits `(expert, payload)` blocks by owning group, remembering their positions.
    pub fn split<T>(
        n_experts: usize,
        groups: usize,
        blocks: Vec<(usize, T)>,
    ) -> Vec<Vec<(usize, usize, T)>> {
        let mut per: Vec<Vec<(usize, usize, T)>> = (0..groups).map(|_| Vec::new()).collect();
        for (pos, (i, x)) in blocks.into_iter().enumerate() {
            per[group_of(i, n_experts, groups)].push((pos, i, x));
        }
        per
    }
}

/// Puts per-group answers back in block order: `parts[g]` = (positions, answers).
pub fn gather<T>(n: usize, parts: Vec<(Vec<usize>, Vec<T>)>) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for (pos, vals) in parts {
        assert_eq!(pos.len(), vals.len(), "one answer per block");
        for (p, v) in pos.into_iter().zip(vals) {
            out[p] = Some(v);
        }
    }
    out.into_iter()
        .map(|v| v.expect("every block answered"))
        .collect()
}

impl LocalExpertGroups {
    /// Hands each group its blocks (expert, rows) and puts the answers back in block order.
    fn each_group<T>(
        &mut self,
        blocks: Vec<(usize, Vec<f32>)>,
        mut run: impl FnMut(&mut ExpertGroup, Vec<(usize, Vec<f32>)>) -> Vec<T>,
    ) -> Vec<T> {
        let n = blocks.len();
        let per = Self::split(self.n_experts, self.groups.len(), blocks);
        let parts = per
            .into_iter()
            .zip(&mut self.groups)
            .map(|(b, g)| {
                let pos = b.iter().map(|t| t.0).collect();
                (pos, run(g, b.into_iter().map(|t| (t.1, t.2)).collect()))
            })
            .collect();
        gather(n, parts)
    }
}

impl ExpertCompute for LocalExpertGroups {
    fn forward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>> {
        self.each_group(blocks, |g, b| g.forward(site, b))
    }

    fn backward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<ExpertGrads> {
        self.each_group(blocks, |g, b| g.backward(site, b))
    }

    fn reset(&mut self) {
        self.groups.iter_mut().for_each(ExpertGroup::reset);
    }

    fn load_from(&mut self, full: &dyn TensorSource) {
        self.groups.iter_mut().for_each(|g| g.load_from(full));
    }
}

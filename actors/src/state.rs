//! What a run is and what a step changes: the options `phalanx train` decides before the first
//! step, where and how often it checkpoints, and the training state (model, AdamW moments,
//! gradients, step) with the optimizer step itself. The trainer and the checkpoint code both use
//! these; neither imports the other for them.

use crate::core::monitor::MonitorState;
use kernels::model::{DeepSeekV3, Precision, RunConfig};
use kernels::ops::adamw::{self, AdamW, Moments};
use kernels::ops::balance;
use kernels::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;
use storage::dataset::DataFormat;

/// Everything `phalanx train` decides before the first step.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub config: RunConfig,
    pub config_path: String,
    pub seed: u64,
    pub data: Option<PathBuf>,
    pub data_format: DataFormat,
    pub out_dir: PathBuf,
    pub init_from_hf: Option<PathBuf>,
    pub precision: Precision,
    /// Checkpoints to an object store (none: the run keeps no state beyond its metrics).
    pub checkpoints: Option<CheckpointPlan>,
    /// Injected store outages (`--inject`'s `store_outage`): at the start of step `.0`, every
    /// request to the checkpoint store fails for `.1` milliseconds.
    pub store_outages: Vec<(u64, u64)>,
}

/// Where `run` checkpoints, how often, and whether it continues from the newest checkpoint.
#[derive(Clone, Debug)]
pub struct CheckpointPlan {
    /// Object store URL (`file://DIR`, a directory, `memory://`).
    pub store: String,
    /// Checkpoint every this many steps (0: only after the last step, which always is).
    pub every: u64,
    /// Start from the store's newest committed checkpoint instead of step 0.
    pub resume: bool,
    /// The run to resume (its name in the store); default: the newest run with a checkpoint.
    pub run: Option<String>,
}

/// One optimizer update's settings: AdamW at `lr`, clipping at `clip`, the bias update with γ
/// from the step's expert `loads`.
#[derive(Clone, Copy)]
pub struct Update<'a> {
    pub opt: &'a AdamW,
    pub lr: f32,
    pub clip: f32,
    pub gamma: f32,
    pub loads: &'a [Vec<u32>],
}

/// Model plus optimizer state: what a step changes.
#[derive(Clone)]
pub struct TrainState {
    pub model: DeepSeekV3,
    pub moments: Vec<Option<Moments>>,
    pub grads: Vec<Tensor>,
    pub step: u64,
    /// The store run this state was restored from (its checkpoints continue there).
    pub restored_from: Option<String>,
    /// The loss monitor's memory as of `step` (travels with checkpoints, so that a resumed run
    /// judges its steps as the uninterrupted one would).
    pub monitor: MonitorState,
}

impl TrainState {
    pub fn new(model: DeepSeekV3) -> TrainState {
        let moments = model
            .params
            .tensors
            .iter()
            .zip(&model.params.trainable)
            .map(|(t, &tr)| tr.then(|| Moments::zeros(t.numel())))
            .collect();
        let grads = model.params.zeros_like();
        TrainState {
            model,
            moments,
            grads,
            step: 0,
            restored_from: None,
            monitor: MonitorState::default(),
        }
    }

    /// Clips the accumulated gradients, applies AdamW at `lr` and the bias update with γ; zeroes
    /// the gradients. Returns the pre-clip global gradient norm.
    pub fn apply(
        &mut self,
        opt: &AdamW,
        lr: f32,
        clip: f32,
        gamma: f32,
        loads: &[Vec<u32>],
    ) -> f64 {
        let norm = self.grad_norm();
        let u = Update {
            opt,
            lr,
            clip,
            gamma,
            loads,
        };
        self.apply_with_norm(norm, &u);
        norm
    }

    /// The pre-clip global norm of the accumulated gradients (trainable tensors, in order).
    pub fn grad_norm(&self) -> f64 {
        grad_norm(&self.grads, &self.model.params.trainable)
    }

    /// [`TrainState::apply`] with the norm already computed by [`TrainState::grad_norm`].
    pub fn apply_with_norm(&mut self, norm: f64, u: &Update<'_>) {
        self.step += 1;
        let p = &mut self.model.params;
        let factor = adamw::clip_factor(norm, u.clip);
        for i in 0..p.len() {
            let t = &mut p.tensors[i];
            update_tensor(
                u.opt,
                t,
                &mut self.grads[i],
                self.moments[i].as_mut(),
                factor,
                u.lr,
                self.step,
            );
        }
        bias_update(&mut self.model, u.loads, u.gamma);
    }

    /// A copy without gradient buffers (for the rollback ring, or a refused step's result).
    pub fn copy_without_grads(&self) -> TrainState {
        TrainState {
            model: self.model.clone(),
            moments: self.moments.clone(),
            grads: Vec::new(),
            step: self.step,
            restored_from: self.restored_from.clone(),
            monitor: self.monitor.clone(),
        }
    }

    /// [`TrainState::copy_without_grads`] into `spare`'s buffers (a rollback ring's oldest
    /// entry, from the same run) when its tensors have this state's sizes: a copy into pages
    /// already mapped, on every core. A new copy otherwise.
    pub fn copy_without_grads_into(&self, spare: Option<TrainState>) -> TrainState {
        let Some(mut dst) = spare else {
            return self.copy_without_grads();
        };
        let src = state_bytes(&self.model.params.tensors, &self.moments);
        let to = state_bytes_mut(&mut dst.model.params.tensors, &mut dst.moments);
        if to.len() != src.len() || to.iter().zip(&src).any(|(d, s)| d.len() != s.len()) {
            return self.copy_without_grads();
        }
        parallel_copy(to.into_iter().zip(src).collect());
        dst.grads = Vec::new();
        dst.step = self.step;
        dst.restored_from = self.restored_from.clone();
        dst.monitor = self.monitor.clone();
        dst
    }

    /// The state after a step whose update was refused, beside this one: a copy with the step
    /// counted.
    pub fn refused(&self) -> TrainState {
        let mut same = self.copy_without_grads();
        same.step += 1;
        same
    }

    /// A step whose update was refused: the step is counted (its data is consumed), the
    /// parameters and moments stay as they are, the gradients are zeroed.
    pub fn skip(&mut self) {
        self.step += 1;
        self.grads.iter_mut().for_each(|g| g.zero_());
    }

    /// The state one optimizer step after this one, on `grads`, with this one left as it is (the
    /// committed state a failed step replays from). Exactly [`TrainState::apply`]'s arithmetic,
    /// built a tensor at a time with each gradient dropped once used: at its peak it holds this
    /// state and the new one, never a third copy. The new state has no gradient buffers.
    pub fn advanced(&self, grads: Vec<Tensor>, norm: f64, u: &Update<'_>) -> TrainState {
        assert_eq!(
            grads.len(),
            self.model.params.len(),
            "one gradient per parameter"
        );
        let factor = adamw::clip_factor(norm, u.clip);
        let updates = self.update_tensors(grads.into_iter().enumerate().collect(), factor, u);
        self.assemble(updates).expect("every tensor has its update")
    }

    /// The new values and moments of the tensors `grads` names (whole-model ids), one optimizer
    /// step after this state, left as it is: AdamW with the clip `factor`, then the bias update of
    /// a MoE layer's routing bias with its layer's loads. A pipeline stage updates its own tensors
    /// with it; [`TrainState::assemble`] puts every stage's updates together. Each gradient is
    /// dropped once used.
    pub fn update_tensors(
        &self,
        grads: Vec<(usize, Tensor)>,
        factor: f32,
        u: &Update<'_>,
    ) -> TensorUpdates {
        let step = self.step + 1;
        let p = &self.model.params;
        let biases = self.model.moe_biases();
        grads
            .into_iter()
            .map(|(i, mut g)| {
                let mut t = p.tensors[i].clone();
                let mut m = self.moments[i].clone();
                update_tensor(u.opt, &mut t, &mut g, m.as_mut(), factor, u.lr, step);
                drop(g);
                let layer = biases.iter().position(|b| b.0 == i);
                if let Some(loads) = layer.and_then(|k| u.loads.get(k)) {
                    balance::bias_update(&mut t.data, loads, u.gamma);
                }
                (i, t, m)
            })
            .collect()
    }

    /// The state one step after this one from the updates of every tensor (moved in, no copy);
    /// an update missing or given twice is refused naming the tensor.
    pub fn assemble(
        &self,
        updates: impl IntoIterator<Item = (usize, Tensor, Option<Moments>)>,
    ) -> Result<TrainState, String> {
        let p = &self.model.params;
        let mut tensors: Vec<Option<Tensor>> = (0..p.len()).map(|_| None).collect();
        let mut moments: Vec<Option<Option<Moments>>> = (0..p.len()).map(|_| None).collect();
        for (i, t, m) in updates {
            let name = p.names.get(i).ok_or(format!("an update of tensor {i}"))?;
            if tensors[i].replace(t).is_some() {
                return Err(format!("tensor {name} was updated twice"));
            }
            moments[i] = Some(m);
        }
        let mut done = Vec::with_capacity(p.len());
        for (i, (t, m)) in tensors.into_iter().zip(moments).enumerate() {
            match (t, m) {
                (Some(t), Some(m)) => done.push((t, m)),
                _ => return Err(format!("tensor {} has no update", p.names[i])),
            }
        }
        let (tensors, moments): (Vec<Tensor>, Vec<Option<Moments>>) = done.into_iter().unzip();
        Ok(TrainState {
            model: DeepSeekV3 {
                cfg: self.model.cfg.clone(),
                params: p.with_tensors(tensors),
                embed: self.model.embed,
                blocks: self.model.blocks.clone(),
                tail: self.model.tail.clone(),
            },
            moments,
            grads: Vec::new(),
            step: self.step + 1,
            restored_from: self.restored_from.clone(),
            monitor: self.monitor.clone(),
        })
    }
}

/// New values of some tensors one optimizer step on: (whole-model id, values, AdamW moments).
pub type TensorUpdates = Vec<(usize, Tensor, Option<Moments>)>;

/// The new values in `parts` by whole-model id: what an install reads (a `TensorSource`).
pub fn updates_by_id(parts: &[std::sync::Arc<TensorUpdates>]) -> BTreeMap<usize, &Tensor> {
    parts
        .iter()
        .flat_map(|p| p.iter().map(|(g, t, _)| (*g, t)))
        .collect()
}

/// The bytes of the parameters, then of each parameter's moments (m, v), in tensor order.
fn state_bytes<'a>(tensors: &'a [Tensor], moments: &'a [Option<Moments>]) -> Vec<&'a [u8]> {
    let mut out: Vec<&[u8]> = tensors
        .iter()
        .map(|t| bytemuck::cast_slice(&t.data))
        .collect();
    for m in moments.iter().flatten() {
        match m {
            Moments::F32 { m, v } => out.extend([bytemuck::cast_slice(m), bytemuck::cast_slice(v)]),
            Moments::Bf16 { m, v } => {
                out.extend([bytemuck::cast_slice(m), bytemuck::cast_slice(v)])
            }
        }
    }
    out
}

/// [`state_bytes`], writable.
fn state_bytes_mut<'a>(
    tensors: &'a mut [Tensor],
    moments: &'a mut [Option<Moments>],
) -> Vec<&'a mut [u8]> {
    let mut out: Vec<&mut [u8]> = tensors
        .iter_mut()
        .map(|t| bytemuck::cast_slice_mut(&mut t.data))
        .collect();
    for m in moments.iter_mut().flatten() {
        match m {
            Moments::F32 { m, v } => {
                out.extend([bytemuck::cast_slice_mut(m), bytemuck::cast_slice_mut(v)])
            }
            Moments::Bf16 { m, v } => {
                out.extend([bytemuck::cast_slice_mut(m), bytemuck::cast_slice_mut(v)])
            }
        }
    }
    out
}

/// Copies each source into its destination (same lengths), in 4 MiB chunks spread over the
/// rayon pool: what a snapshot or a ring entry costs the step loop.
pub fn parallel_copy(pairs: Vec<(&mut [u8], &[u8])>) {
    use rayon::prelude::*;
    const CHUNK: usize = 4 << 20;
    let chunks: Vec<(&mut [u8], &[u8])> = pairs
        .into_iter()
        .flat_map(|(d, s)| {
            assert_eq!(d.len(), s.len(), "a copy between buffers of one size");
            d.chunks_mut(CHUNK).zip(s.chunks(CHUNK))
        })
        .collect();
    chunks
        .into_par_iter()
        .for_each(|(d, s)| kernels::copy::stream_copy(d, s));
}

/// The pre-clip global norm over the trainable tensors' gradients, in tensor order.
pub fn grad_norm(grads: &[Tensor], trainable: &[bool]) -> f64 {
    adamw::global_norm(
        grads
            .iter()
            .zip(trainable)
            .filter(|(_, t)| **t)
            .map(|(g, _)| g.data.as_slice()),
    )
}

/// AdamW on one tensor (weight decay on matrices only); a tensor without moments (a buffer)
/// only has its gradient zeroed.
fn update_tensor(
    opt: &AdamW,
    t: &mut Tensor,
    g: &mut Tensor,
    m: Option<&mut Moments>,
    factor: f32,
    lr: f32,
    step: u64,
) {
    match m {
        Some(m) => {
            let decay = t.shape.len() >= 2;
            opt.step(&mut t.data, &mut g.data, factor, m, lr, step, decay);
        }
        None => g.zero_(),
    }
}

/// The auxiliary-loss-free bias update of every MoE layer from the step's expert loads.
fn bias_update(model: &mut DeepSeekV3, loads: &[Vec<u32>], gamma: f32) {
    for (bias, l) in model.moe_biases().into_iter().zip(loads) {
        balance::bias_update(&mut model.params.tensors[bias.0].data, l, gamma);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micro_state() -> TrainState {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/micro.toml");
        let cfg = RunConfig::load(std::path::Path::new(path)).expect("micro config");
        TrainState::new(DeepSeekV3::new(&cfg.model, 0.02, 7))
    }

    /// Updates made part by part (as stage owners make them, in any order) assemble into exactly
    /// the state `advanced` builds in one go, which is the in-place step's; a missing or doubled
    /// update is refused by name.
    #[test]
    fn updates_by_parts_assemble_into_the_advanced_state() {
        let state = micro_state();
        let n = state.model.params.len();
        let grads: Vec<Tensor> = state
            .model
            .params
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let data = (0..t.numel()).map(|k| ((i * 31 + k) % 17) as f32 * 1e-3 - 8e-3);
                Tensor::from_vec(&t.shape, data.collect())
            })
            .collect();
        let opt = AdamW::deepseek_v3(false);
        let loads: Vec<Vec<u32>> = state
            .model
            .moe_biases()
            .iter()
            .map(|b| (0..state.model.params.tensors[b.0].numel() as u32).collect())
            .collect();
        let u = Update {
            opt: &opt,
            lr: 1e-3,
            clip: 0.5,
            gamma: 1e-3,
            loads: &loads,
        };
        let norm = grad_norm(&grads, &state.model.params.trainable);
        let whole = state.advanced(grads.clone(), norm, &u);
        // the same step in place (the plain loop's path)
        let mut in_place = state.clone();
        in_place.grads = grads.clone();
        in_place.apply_with_norm(norm, &u);
        assert_eq!(in_place.model.params.sha256(), whole.model.params.sha256());
        assert_eq!(in_place.moments, whole.moments);
        let factor = adamw::clip_factor(norm, u.clip);
        // two "stages": the odd tensors first, then the even ones
        let (odd, even): (Vec<_>, Vec<_>) =
            grads.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);
        let mut parts = state.update_tensors(odd, factor, &u);
        parts.extend(state.update_tensors(even, factor, &u));
        let doubled = parts[0].clone();
        let mut missing = parts.clone();
        let gone = missing.pop().expect("a part");
        let by_parts = state.assemble(parts.clone()).expect("every tensor updated");
        assert_eq!(by_parts.model.params.sha256(), whole.model.params.sha256());
        assert_eq!(by_parts.moments, whole.moments);
        assert_eq!(by_parts.step, state.step + 1);
        assert_ne!(whole.model.params.sha256(), state.model.params.sha256());
        let name = |i: usize| state.model.params.names[i].clone();
        assert_eq!(
            state.assemble(missing).err(),
            Some(format!("tensor {} has no update", name(gone.0)))
        );
        parts.push(doubled.clone());
        assert_eq!(
            state.assemble(parts).err(),
            Some(format!("tensor {} was updated twice", name(doubled.0)))
        );
        assert!(n > 2);
    }
}

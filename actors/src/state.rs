//! What a run is and what a step changes: the options `phalanx train` decides before the first
//! step, where and how often it checkpoints, and the training state (model, AdamW moments,
//! gradients, step) with the optimizer step itself. The trainer and the checkpoint code both use
//! these; neither imports the other for them.

use kernels::model::{DeepSeekV3, Precision, RunConfig};
use kernels::ops::adamw::{self, AdamW, Moments};
use kernels::ops::balance;
use kernels::tensor::Tensor;
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

/// Model plus optimizer state: what a step changes.
#[derive(Clone)]
pub struct TrainState {
    pub model: DeepSeekV3,
    pub moments: Vec<Option<Moments>>,
    pub grads: Vec<Tensor>,
    pub step: u64,
    /// The store run this state was restored from (its checkpoints continue there).
    pub restored_from: Option<String>,
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
        self.step += 1;
        let p = &mut self.model.params;
        let norm = adamw::global_norm(
            self.grads
                .iter()
                .zip(&p.trainable)
                .filter(|(_, t)| **t)
                .map(|(g, _)| g.data.as_slice()),
        );
        let factor = adamw::clip_factor(norm, clip);
        for i in 0..p.len() {
            if let Some(m) = self.moments[i].as_mut() {
                let decay = p.tensors[i].shape.len() >= 2;
                let g = &mut self.grads[i].data;
                opt.step(&mut p.tensors[i].data, g, factor, m, lr, self.step, decay);
            } else {
                self.grads[i].zero_();
            }
        }
        for (bias, l) in self.model.moe_biases().into_iter().zip(loads) {
            balance::bias_update(&mut self.model.params.tensors[bias.0].data, l, gamma);
        }
        norm
    }
}

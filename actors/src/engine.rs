//! Step engines: how one training step's gradients are computed and applied. The trainer's loop
//! (`trainer::run`) is the same around each: `Sequential` (the single-process CPU step),
//! `DeviceEngine` (the whole step on a `kernels::device` backend: the CPU backend, or a CUDA GPU
//! with feature `cuda`), the thread pipeline and the actor formation (`formation`).

use crate::state::TrainState;
use crate::trainer::{StepHyper, StepOutput, finish_step, judge, microbatches};
use anyhow::{Result, anyhow};
use kernels::device::backend::{Backend, GemmPrecision};
use kernels::device::model::DeviceModel;
use kernels::model::stage::{
    combine_microbatch_stats, forward_backward_microbatches, scale_for_microbatches,
};
use std::sync::Arc;
use storage::dataset::Dataset;

/// How a step's gradients are computed and applied: the single-process loop, the thread
/// pipeline, or the actor formation. The training loop around it is the same.
pub trait StepEngine {
    /// Runs step `step` (1-based) on `state`: gradients of its batch, clipping, AdamW and the
    /// bias update. The state goes in and comes back (an actor engine moves it to its coordinator).
    fn step(
        &mut self,
        state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)>;
    /// Actor restarts so far.
    fn restarts(&self) -> u64 {
        0
    }
    /// The pipeline stages the model is cut into (1: not pipelined); a checkpoint writes a
    /// shard per stage.
    fn model_stages(&self) -> usize {
        1
    }
    /// Steps that were replayed at least once so far.
    fn replayed_steps(&self) -> u64 {
        0
    }
    /// The run went back to an older committed state (a loss-spike rollback past the step
    /// before the spike): copies of the parameters the engine keeps must be replaced by
    /// `state`'s before the next step.
    fn reload(&mut self, _state: &TrainState) -> Result<()> {
        Ok(())
    }
    /// Brings `state`'s parameters and moments up to date with the engine's, before the loop
    /// reads them (evaluation, a checkpoint, the rollback ring, the summary). An engine whose
    /// parameters live on a device copies them back here; the others keep `state` current.
    fn sync_host(&mut self, _state: &mut TrainState) -> Result<()> {
        Ok(())
    }
}

/// The single-process engine: micro-batches one at a time in order (one micro-batch is the
/// classic whole-batch step), gradients summed in micro-batch order, then averaged.
pub struct Sequential {
    pub data: Arc<Dataset>,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
    pub microbatches: usize,
}

impl StepEngine for Sequential {
    fn step(
        &mut self,
        mut state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        let batches = microbatches(
            &self.data,
            self.seed,
            step,
            self.batch,
            self.seq,
            self.microbatches,
        )?;
        let stats = if batches.len() == 1 {
            state
                .model
                .forward_backward(&batches[0], h.mtp_weight, &mut state.grads)
        } else {
            let per = forward_backward_microbatches(
                &state.model,
                &batches,
                h.mtp_weight,
                &mut state.grads,
            );
            scale_for_microbatches(&mut state.grads, batches.len());
            combine_microbatch_stats(per)
        };
        let out = finish_step(&mut state, stats, h)?;
        Ok((state, out))
    }
}

/// The whole step on a device: the parameters, gradients and moments live in a `DeviceModel`,
/// the loss-spike gate judges the device's norm, and `state` (the loop's committed state) is
/// brought back to the host only when the loop reads it ([`StepEngine::sync_host`]). One batch
/// per step, or micro-batches accumulated as `Sequential` does; f32, BF16 GEMMs or the FP8
/// recipe (with its BF16 moments).
pub struct DeviceEngine<B: Backend> {
    pub data: Arc<Dataset>,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
    /// Micro-batches per step (gradient accumulation, `Sequential`'s arithmetic).
    pub microbatches: usize,
    model: DeviceModel<B>,
    /// The device holds updates `state` does not have yet.
    dirty: bool,
}

fn on_device<T>(r: kernels::device::backend::BackendResult<T>) -> Result<T> {
    r.map_err(|e| anyhow!("device step: {e}"))
}

impl<B: Backend> DeviceEngine<B> {
    /// Uploads `state`'s parameters and moments to `backend`.
    pub fn new(
        backend: B,
        state: &TrainState,
        data: Arc<Dataset>,
        seed: u64,
        batch: usize,
        seq: usize,
    ) -> Result<DeviceEngine<B>> {
        Ok(DeviceEngine {
            model: upload(backend, state)?,
            data,
            seed,
            batch,
            seq,
            microbatches: 1,
            dirty: false,
        })
    }

    pub fn describe(&self) -> String {
        self.model.backend.describe()
    }
}

/// A device model holding `state`'s parameters and moments.
fn upload<B: Backend>(backend: B, state: &TrainState) -> Result<DeviceModel<B>> {
    let mut m = on_device(DeviceModel::new(backend, state.model.clone()))?;
    load_moments(&mut m, state)?;
    Ok(m)
}

/// `state`'s moments onto the device (none before the first step: they start at zero there, in
/// the optimizer's format).
fn load_moments<B: Backend>(m: &mut DeviceModel<B>, state: &TrainState) -> Result<()> {
    if state.step == 0 {
        return Ok(());
    }
    for (i, mo) in state.moments.iter().enumerate() {
        if let Some(mo) = mo {
            on_device(m.load_moments(i, mo))?;
        }
    }
    Ok(())
}

impl<B: Backend> StepEngine for DeviceEngine<B> {
    fn step(
        &mut self,
        mut state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        let mb = self.microbatches;
        let batches = microbatches(&self.data, self.seed, step, self.batch, self.seq, mb)?;
        let per = on_device(
            self.model
                .forward_backward_microbatches(&batches, h.mtp_weight),
        )?;
        let stats = combine_microbatch_stats(per);
        let grad_norm = on_device(self.model.grad_norm())?;
        let rejected = judge(&stats, grad_norm, h);
        match rejected {
            Some(_) => {
                on_device(self.model.discard_grads())?;
                state.skip();
            }
            None => {
                let u = h.update(&stats.loads);
                let t = state.step + 1;
                on_device(
                    self.model
                        .apply_with_norm(grad_norm, u.opt, u.lr, u.clip, u.gamma, u.loads, t),
                )?;
                state.step = t;
                self.dirty = true;
            }
        }
        let out = StepOutput {
            stats,
            grad_norm,
            rejected,
        };
        Ok((state, out))
    }

    fn reload(&mut self, state: &TrainState) -> Result<()> {
        on_device(self.model.replace(state.model.clone()))?;
        load_moments(&mut self.model, state)?;
        self.dirty = false;
        Ok(())
    }

    fn sync_host(&mut self, state: &mut TrainState) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        state.model.params = on_device(self.model.to_host())?.params;
        for (i, mo) in state.moments.iter_mut().enumerate() {
            if mo.is_some()
                && let Some(device) = on_device(self.model.moments(i))?
            {
                *mo = Some(device);
            }
        }
        self.dirty = false;
        Ok(())
    }
}

/// A whole training job with every step on `backend` ([`DeviceEngine`]): the plain loop's data,
/// schedule, evaluation, checkpoints and summary around the device step. What is not an FP8
/// Linear runs in [`GemmPrecision::device_baseline`] of `opts.precision` (fp8: over BF16).
pub fn train_on_device<B: Backend>(
    opts: &crate::trainer::TrainOptions,
    backend: B,
    microbatches: usize,
    on_step: impl FnMut(&crate::trainer::StepRecord, u64),
) -> Result<crate::trainer::TrainSummary> {
    let baseline = GemmPrecision::device_baseline(opts.precision);
    train_on_device_over(opts, backend, microbatches, baseline, on_step)
}

/// [`train_on_device`] with the GEMMs that are not FP8 Linears in `baseline` (F32 under
/// `--precision fp8` is the CPU model's recipe, bit for bit on the CPU backend).
pub fn train_on_device_over<B: Backend>(
    opts: &crate::trainer::TrainOptions,
    backend: B,
    microbatches: usize,
    baseline: GemmPrecision,
    on_step: impl FnMut(&crate::trainer::StepRecord, u64),
) -> Result<crate::trainer::TrainSummary> {
    let data = Arc::new(crate::trainer::open_data(opts)?);
    let state = crate::trainer::build_state(opts)?;
    let t = &opts.config.training;
    let mut engine = DeviceEngine::new(
        backend,
        &state,
        data.clone(),
        opts.seed,
        t.batch_size,
        t.seq_len,
    )?;
    engine.model.set_gemm_precision(baseline);
    engine.microbatches = microbatches.max(1);
    tracing::info!(
        device = %engine.describe(),
        precision = %opts.precision,
        baseline = ?baseline,
        "training on the device step"
    );
    crate::trainer::run(opts, &data, state, &mut engine, on_step)
}

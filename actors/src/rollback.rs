//! What the training loop does about loss spikes besides judging them (the rules and the
//! verdicts are `core::monitor`'s): the rules read from the config, the rollback to an older
//! committed state from the in-memory ring or the store, and an injected learning-rate spike.

use crate::core::monitor::SpikeRules;
use crate::state::{TrainOptions, TrainState};
use crate::trainer::{StepEngine, StepHyper, StepOutput};
use anyhow::{Context, Result};

/// The loss monitor's rules from the config's `[training]` table.
pub fn spike_rules(t: &kernels::model::TrainingConfig) -> SpikeRules {
    SpikeRules {
        loss_factor: t.spike_loss_factor,
        window: t.spike_window,
        zscore: t.spike_zscore,
        ema_decay: t.spike_ema_decay,
        grad_factor: t.spike_grad_factor,
        min_history: t.spike_min_history,
        skip_steps: t.rollback_skip_steps,
        lr_factor: t.rollback_lr_factor,
        lr_steps: t.rollback_lr_steps,
        max_consecutive: t.max_consecutive_rollbacks,
    }
}

/// A rejected step `spike_step` left the state at `spike_step − 1` (its update was never
/// applied). When the rules ask to go back further, to `to_step`, the newest committed state at
/// or before it comes from the ring, else from the store; the steps after it are skipped (the
/// state's step becomes `spike_step`, so the data goes on after the spike). Returns the step
/// the run went back to.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rollback(
    opts: &TrainOptions,
    state: &mut TrainState,
    ring: &mut std::collections::VecDeque<TrainState>,
    uploader: Option<&crate::checkpoint::Uploader>,
    ckpt_run: &str,
    spike_step: u64,
    to_step: u64,
    engine: &mut dyn StepEngine,
) -> Result<u64> {
    if to_step + 1 >= spike_step {
        return Ok(spike_step - 1);
    }
    let mut older = None;
    while let Some(s) = ring.pop_back() {
        if s.step <= to_step {
            older = Some((s, "memory"));
            break;
        }
    }
    if older.is_none()
        && let (Some(up), Some(plan)) = (uploader, opts.checkpoints.as_ref())
    {
        up.wait_idle();
        if let Some(loaded) = crate::checkpoint::load_at_or_before(&plan.store, ckpt_run, to_step)?
        {
            let mut s = state.copy_without_grads();
            let at = loaded.manifest.step;
            crate::checkpoint::restore(&mut s, loaded.tensors, &loaded.manifest.run, at)
                .with_context(|| format!("{}: checkpoint of step {at}", plan.store))?;
            older = Some((s, "the store"));
        }
    }
    let Some((mut back, from)) = older else {
        tracing::warn!(
            to_step,
            "no committed state at or before the rollback target in memory or in the store: only the spike step is skipped"
        );
        return Ok(spike_step - 1);
    };
    let at = back.step;
    tracing::info!(step = at, from, "rolled back to a committed state");
    back.step = spike_step;
    back.restored_from = state.restored_from.clone();
    back.grads = if state.grads.is_empty() {
        Vec::new()
    } else {
        back.model.params.zeros_like()
    };
    *state = back;
    engine.reload(state)?;
    Ok(at)
}

/// An engine whose learning rate is multiplied by a factor at some steps (`--inject`'s
/// `loss_spike` with a `factor`): a damaging update, whose effect the next step's loss shows.
pub struct LrSpikes<'a> {
    pub inner: &'a mut dyn StepEngine,
    /// Step → LR factor.
    pub at: std::collections::BTreeMap<u64, f32>,
}

impl StepEngine for LrSpikes<'_> {
    fn step(
        &mut self,
        state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        let mut h = *h;
        if let Some(f) = self.at.get(&step) {
            tracing::warn!(
                step,
                factor = f,
                "injected loss spike: the learning rate is multiplied"
            );
            h.lr *= f;
        }
        self.inner.step(state, step, &h)
    }
    fn restarts(&self) -> u64 {
        self.inner.restarts()
    }
    fn model_stages(&self) -> usize {
        self.inner.model_stages()
    }
    fn replayed_steps(&self) -> u64 {
        self.inner.replayed_steps()
    }
    fn reload(&mut self, state: &TrainState) -> Result<()> {
        self.inner.reload(state)
    }
}

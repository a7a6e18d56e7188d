//! The single-process training loop: data → forward/backward → clip → AdamW → bias update → eval,
//! writing metrics and a summary. The actor formation drives the same pieces step by step.

use crate::core::monitor::{Spike, SpikeGate};
use crate::core::run::{RunCommand, RunController, RunEvent, RunPlan};
pub use crate::engine::{Sequential, StepEngine};
pub use crate::state::{CheckpointPlan, TrainOptions, TrainState};
use anyhow::{Context, Result, bail};
use kernels::model::stage::split_batch;
use kernels::model::{Batch, DeepSeekV3, Precision, StepStats};
use kernels::ops::adamw::{AdamW, LrSchedule};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
use storage::dataset::{DataFormat, Dataset};
use storage::journal::{Journal, RunEntry};
use storage::metrics::MetricsLog;

/// One finished step, as logged to metrics.jsonl and shown on the progress bar.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub mtp_loss: f64,
    pub balance_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    pub lr: f32,
    pub grad_norm: f64,
    pub expert_load_max_over_mean: f64,
    pub tokens_per_s: f64,
    /// Why the loss monitor rejected this step (its update was discarded), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// The committed step the run went back to after rejecting this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<u64>,
    /// Actor restarts so far in this process (cumulative; `phalanx report` marks the steps
    /// where it grows).
    #[serde(default)]
    pub restarts: u64,
}

/// The end-of-run summary (`--summary-json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub final_loss_avg10: f64,
    pub initial_eval_loss: f64,
    pub eval_loss: f64,
    /// Tokens over the wall time of the step loop (evaluations and checkpoints included).
    pub tokens_per_s: f64,
    /// Steady-state throughput: tokens over the time spent inside steps only.
    #[serde(default)]
    pub train_tokens_per_s: f64,
    /// Whole-run throughput: the first evaluation, evaluations, checkpoints and the final
    /// uploads included.
    #[serde(default)]
    pub wall_tokens_per_s: f64,
    pub params_sha256: String,
    pub parameters: usize,
    pub expert_load_max_over_mean: f64,
    pub seed: u64,
    pub config: String,
    pub data: String,
    pub wall_seconds: f64,
    pub metrics: String,
    /// Actor restarts during the run (the formation with faults; 0 otherwise).
    #[serde(default)]
    pub restarts: u64,
    /// Steps replayed at least once after a failure.
    #[serde(default)]
    pub replayed_steps: u64,
    /// Injected faults that fired, by kind (`--inject`; empty otherwise).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub faults_fired: std::collections::BTreeMap<String, u64>,
    /// Coordinators replaced (each a whole formation rebuilt from the committed state).
    #[serde(default)]
    pub coordinator_restarts: u64,
    /// For each actor the failure detector declared dead: ms from its last sign of life.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detections_ms: Vec<u64>,
    /// Stragglers the failure detector reported (slow, so not restarted).
    #[serde(default)]
    pub stragglers: u64,
    /// Worker processes started to replace dead ones (`phalanx launch`).
    #[serde(default)]
    pub processes_restarted: u64,
    /// Per replaced process: ms from its death being declared to the step reopened with its
    /// replacement (`phalanx launch`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovery_ms: Vec<u64>,
    /// Checkpoints committed to the store during this run.
    #[serde(default)]
    pub checkpoints: u64,
    /// Checkpoints given up after every upload try failed (the run went on).
    #[serde(default)]
    pub checkpoints_missed: u64,
    /// The checkpoint step this run continued from (absent for a fresh run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
    /// Steps rejected by the loss monitor over the whole run (a resumed run counts those
    /// before its checkpoint too), and the steps whose data those rollbacks skipped.
    #[serde(default)]
    pub rollbacks: u64,
    #[serde(default)]
    pub skipped_steps: u64,
}

/// Mean held-out main loss over up to `batches` eval batches.
pub fn evaluate(
    model: &DeepSeekV3,
    data: &Dataset,
    batches: usize,
    batch: usize,
    seq: usize,
) -> Result<f64> {
    let mut total = 0.0;
    let mut n = 0;
    for i in 0..batches {
        let Some(w) = data.eval_batch(i, batch, seq) else {
            break;
        };
        total += model.eval_loss(&Batch::from_windows(&w, batch, seq));
        n += 1;
    }
    if n == 0 {
        bail!(
            "the held-out split ({} tokens) is shorter than one eval batch of {batch}×{}",
            data.eval_len(),
            seq + 1
        );
    }
    Ok(total / n as f64)
}

/// Opens the data the options name (the synthetic corpus when none).
/// The mean main-head cross-entropy of `model` over the non-overlapping windows of
/// `seq_len + 1` tokens of a u32 token file (the last partial window dropped): (windows, loss).
pub fn eval_token_file(
    model: &DeepSeekV3,
    path: &std::path::Path,
    seq_len: usize,
) -> Result<(usize, f64)> {
    if seq_len == 0 {
        bail!("--seq-len must be at least 1");
    }
    let data = Dataset::open(path, DataFormat::U32, model.cfg.vocab_size)?;
    let tokens = data.all_tokens();
    let w = seq_len + 1;
    let windows = tokens.len() / w;
    if windows == 0 {
        bail!(
            "{}: {} tokens is shorter than one window of {w}",
            path.display(),
            tokens.len()
        );
    }
    let mut total = 0.0;
    for chunk in tokens[..windows * w].chunks_exact(w) {
        total += model.eval_loss(&Batch::from_windows(chunk, 1, seq_len));
    }
    Ok((windows, total / windows as f64))
}

pub fn open_data(opts: &TrainOptions) -> Result<Dataset> {
    let vocab = opts.config.model.vocab_size;
    Ok(match &opts.data {
        Some(p) => Dataset::open(p, opts.data_format, vocab)?,
        None => {
            let t = &opts.config.training;
            let want = (t.steps as usize * t.batch_size * (t.seq_len + 1)).clamp(1 << 18, 1 << 23);
            Dataset::synthetic(vocab, opts.seed, want)
        }
    })
}

/// The model the options ask for: fresh from the seed or loaded from a Hugging Face directory,
/// at the options' precision.
pub fn build_model(opts: &TrainOptions) -> Result<DeepSeekV3> {
    let t = &opts.config.training;
    let mut model = match &opts.init_from_hf {
        Some(dir) => {
            let (m, report) = storage::hf::load_dir(dir, opts.seed)?;
            if m.cfg.vocab_size != opts.config.model.vocab_size {
                tracing::warn!(
                    "--init-from-hf: the directory's config replaces {}",
                    opts.config_path
                );
            }
            tracing::info!(
                loaded = report.loaded,
                fresh = report.fresh.len(),
                "initialised from {}",
                dir.display()
            );
            m
        }
        None => DeepSeekV3::new(&opts.config.model, t.init_std, opts.seed),
    };
    model.set_precision(opts.precision);
    tracing::info!(parameters = model.num_params(), precision = ?opts.precision, "model built");
    Ok(model)
}

/// The state a run starts from: the model the options ask for with fresh optimizer moments, or,
/// when the options say resume, the newest checkpoint of their store (parameters, moments, step).
pub fn build_state(opts: &TrainOptions) -> Result<TrainState> {
    let mut state = TrainState::new(build_model(opts)?);
    if let Some(plan) = opts.checkpoints.as_ref().filter(|p| p.resume) {
        let loaded = crate::checkpoint::load_latest_checked(&plan.store, plan.run.as_deref())?;
        for skip in &loaded.skipped {
            eprintln!("resume: skipped a checkpoint: {skip}");
        }
        let (manifest, tensors) = (loaded.manifest, loaded.tensors);
        let step = manifest.meta["optimizer_step"]
            .as_u64()
            .unwrap_or(manifest.step);
        crate::checkpoint::restore(&mut state, tensors, &manifest.run, step)
            .with_context(|| format!("{}: checkpoint of step {}", plan.store, manifest.step))?;
        if let Some(m) = manifest.meta.get("monitor") {
            state.monitor = serde_json::from_value(m.clone()).with_context(|| {
                format!(
                    "{}: checkpoint of step {}: field `monitor`",
                    plan.store, manifest.step
                )
            })?;
        }
        if step >= opts.config.training.steps {
            bail!(
                "{}: the newest checkpoint is at step {step}, the run has {} steps; pass --steps to go further",
                plan.store,
                opts.config.training.steps
            );
        }
        tracing::info!(step, store = %plan.store, "resumed from checkpoint");
    }
    Ok(state)
}

/// What one step's update needs besides the gradients.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepHyper {
    pub opt: AdamW,
    pub lr: f32,
    pub clip: f32,
    pub gamma: f32,
    pub mtp_weight: f32,
    /// The loss-spike limits the step's update must pass to be applied.
    pub gate: SpikeGate,
}

impl StepHyper {
    /// The optimizer update of a step whose expert loads are `loads`.
    pub fn update<'a>(&'a self, loads: &'a [Vec<u32>]) -> crate::state::Update<'a> {
        crate::state::Update {
            opt: &self.opt,
            lr: self.lr,
            clip: self.clip,
            gamma: self.gamma,
            loads,
        }
    }
}

/// What one step reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepOutput {
    pub stats: StepStats,
    /// Pre-clip global gradient norm.
    pub grad_norm: f64,
    /// Why the gate refused the update (the committed state is unchanged), or None.
    pub rejected: Option<Spike>,
}

/// Step `step`'s batch split into `microbatches` micro-batches of equal size, in order.
pub fn microbatches(
    data: &Dataset,
    seed: u64,
    step: u64,
    batch: usize,
    seq: usize,
    microbatches: usize,
) -> Result<Vec<Batch>> {
    let windows = data
        .train_batch(seed, step, batch, seq)
        .map_err(anyhow::Error::msg)?;
    let b = Batch::from_windows(&windows, batch, seq);
    if microbatches == 1 {
        return Ok(vec![b]);
    }
    split_batch(&b, microbatches).map_err(anyhow::Error::msg)
}

/// The common end of a step once `state.grads` holds its gradient: the loss-spike gate, then
/// clipping, AdamW and the bias update (or, for a refused step, nothing but the step count).
pub fn finish_step(state: &mut TrainState, stats: StepStats, h: &StepHyper) -> Result<StepOutput> {
    let grad_norm = state.grad_norm();
    let rejected = judge(&stats, grad_norm, h);
    match rejected {
        Some(_) => state.skip(),
        None => state.apply_with_norm(grad_norm, &h.update(&stats.loads)),
    }
    Ok(StepOutput {
        stats,
        grad_norm,
        rejected,
    })
}

/// [`finish_step`] for an engine that keeps the committed state until the step commits: the new
/// state is built beside `committed` from the step's gradients `grads` (see
/// [`TrainState::advanced`]); a refused step's new state is a copy with the step counted.
pub fn finish_step_beside(
    committed: &TrainState,
    grads: Vec<kernels::tensor::Tensor>,
    stats: StepStats,
    h: &StepHyper,
) -> Result<(TrainState, StepOutput)> {
    let grad_norm = crate::state::grad_norm(&grads, &committed.model.params.trainable);
    let rejected = judge(&stats, grad_norm, h);
    let next = match rejected {
        Some(_) => {
            drop(grads);
            committed.refused()
        }
        None => committed.advanced(grads, grad_norm, &h.update(&stats.loads)),
    };
    Ok((
        next,
        StepOutput {
            stats,
            grad_norm,
            rejected,
        },
    ))
}

/// The gate's verdict on a step: a non-finite objective counts as a non-finite loss.
pub(crate) fn judge(stats: &StepStats, grad_norm: f64, h: &StepHyper) -> Option<Spike> {
    let loss = if stats.objective.is_finite() {
        stats.loss
    } else {
        f64::NAN
    };
    h.gate.judge(loss, grad_norm)
}

/// The run's AdamW from its `[training]` table: BF16 moments under the FP8 recipe, as DeepSeek-V3.
pub fn optimizer(t: &kernels::model::TrainingConfig, precision: Precision) -> AdamW {
    AdamW {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.adam_eps,
        weight_decay: t.weight_decay,
        bf16_moments: precision == Precision::Fp8,
    }
}
/// Runs a whole training job; `on_step` sees every step (the CLI draws its progress bar from it).
pub fn train(opts: &TrainOptions, on_step: impl FnMut(&StepRecord, u64)) -> Result<TrainSummary> {
    train_microbatched(opts, 1, on_step)
}

/// [`train`] with each step's batch processed as `microbatches` micro-batches in order: the
/// single-process reference of a pipelined run with as many micro-batches.
pub fn train_microbatched(
    opts: &TrainOptions,
    microbatches: usize,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    let data = Arc::new(open_data(opts)?);
    tracing::info!(data = %data.description, "data ready");
    let state = build_state(opts)?;
    let t = &opts.config.training;
    let mut engine = Sequential {
        data: data.clone(),
        seed: opts.seed,
        batch: t.batch_size,
        seq: t.seq_len,
        microbatches,
    };
    run(opts, &data, state, &mut engine, on_step)
}

/// The training loop around an engine: LR schedule, evaluation, metrics, checkpoints and the
/// summary. Runs steps `state.step + 1 ..= training.steps` (all of them for a fresh state).
pub fn run(
    opts: &TrainOptions,
    data: &Dataset,
    state: TrainState,
    engine: &mut dyn StepEngine,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    let dir = opts.out_dir.join("journal");
    let (journal, set_aside) = Journal::open_for_run(&dir)?;
    if let Some(w) = set_aside {
        tracing::warn!("{w}");
    }
    // a resume from the store, or a coordinator that rebuilt the state from the ranks' mirrors
    let resumed_from = (opts.checkpoints.as_ref().is_some_and(|p| p.resume)
        || (state.restored_from.is_some() && fixed_run_id().is_some()))
    .then_some(state.step);
    let id = run_id();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t = &opts.config.training;
    journal.begin(&RunEntry {
        resumed_from,
        store: opts.checkpoints.as_ref().map(|p| p.store.clone()),
        pid: Some(std::process::id()),
        last_step: state.step,
        ..RunEntry::running(&id, started_unix, &opts.config_path, opts.seed, t.steps)
    })?;
    // checkpoints go under the run's name in the store: a resumed run continues the one it resumes
    let ckpt_run = state.restored_from.clone().unwrap_or_else(|| id.clone());
    let ids = RunIds {
        journal: &id,
        checkpoints: &ckpt_run,
    };
    let result = run_steps(
        opts,
        data,
        state,
        engine,
        on_step,
        &journal,
        ids,
        resumed_from,
    );
    journal.update(&id, |e| match &result {
        Ok(s) => {
            e.status = "finished".into();
            e.restarts = s.restarts;
        }
        Err(err) => {
            e.status = "failed".into();
            e.error = Some(format!("{err:#}"));
        }
    })?;
    journal.flush()?;
    result
}

/// A run id unique on this machine: start time (ms), process, and a counter within the process.
/// The run id a launcher fixed for all its coordinators (`PHALANX_RUN_ID`), if any.
pub fn fixed_run_id() -> Option<String> {
    std::env::var("PHALANX_RUN_ID")
        .ok()
        .filter(|s| !s.is_empty())
}

/// A new run's id: `PHALANX_RUN_ID` when a launcher fixed it, else from the clock and pid.
pub fn run_id() -> String {
    if let Some(id) = fixed_run_id() {
        return id;
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // zero-padded milliseconds first, so names sort by start time
    format!("{ms:013}-{}-{n}", std::process::id())
}

/// A run's names: its journal entry and its key prefix in the checkpoint store.
#[derive(Clone, Copy)]
struct RunIds<'a> {
    journal: &'a str,
    checkpoints: &'a str,
}

#[allow(clippy::too_many_arguments)]
fn run_steps(
    opts: &TrainOptions,
    data: &Dataset,
    mut state: TrainState,
    engine: &mut dyn StepEngine,
    mut on_step: impl FnMut(&StepRecord, u64),
    journal: &Journal,
    ids: RunIds,
    resumed_from: Option<u64>,
) -> Result<TrainSummary> {
    let run_started = Instant::now();
    let run = ids.journal;
    let t = &opts.config.training;
    let first_step = state.step + 1;
    // with injected outages the uploader's store is wrapped so that they can be switched on
    let mut outage_switch = None;
    let mut uploader = opts
        .checkpoints
        .as_ref()
        .map(|p| {
            if opts.store_outages.is_empty() {
                return crate::checkpoint::Uploader::start(
                    &p.store,
                    ids.checkpoints,
                    journal.clone(),
                    run,
                );
            }
            let store = storage::store::Store::open(&p.store)?;
            let (store, switch) = storage::store::Faulty::wrap(&store, "");
            outage_switch = Some(switch);
            crate::checkpoint::Uploader::start_with(
                store,
                ids.checkpoints,
                journal.clone(),
                run,
                crate::uploader::UploadPolicy::from_env()?,
            )
        })
        .transpose()?;
    let opt = optimizer(t, opts.precision);
    let schedule = LrSchedule {
        peak: t.lr,
        warmup: t.warmup_steps,
        decay_start: (t.steps as f32 * t.decay_start_frac) as u64,
        total: t.steps,
        min_ratio: t.min_lr_ratio,
    };
    let mut log = match resumed_from {
        Some(step) => MetricsLog::resume(&opts.out_dir, step),
        None => MetricsLog::create(&opts.out_dir),
    }
    .with_context(|| format!("cannot write metrics in {}", opts.out_dir.display()))?;
    let initial_eval = evaluate(&state.model, data, t.eval_batches, t.batch_size, t.seq_len)?;
    tracing::info!(eval_loss = initial_eval, "before training");
    let started = Instant::now();
    let mut tokens = 0u64;
    let mut last_losses = Vec::new();
    let mut last_stats = StepStats::default();
    // the loop's decisions are the RunController's; this is its driver
    let mut ctl = RunController::new(
        RunPlan {
            first_step,
            total_steps: t.steps,
            eval_every: t.eval_every,
            ckpt_every: opts.checkpoints.as_ref().map(|p| p.every),
            lr: schedule,
            spike: crate::rollback::spike_rules(t),
        },
        state.monitor.clone(),
    );
    // a checkpoint writes one shard per pipeline stage, side by side, from buffers the
    // uploader makes ready while the first steps run
    let owners = crate::checkpoint::stage_owners(&state, engine.model_stages());
    if let Some(up) = uploader.as_mut() {
        up.prepare(crate::checkpoint::snapshot_layout(&state, &owners));
    }
    // committed states kept for rollbacks past the step before a spike, oldest first
    let mut ring: std::collections::VecDeque<TrainState> = Default::default();
    let mut rejected_at: Option<(u64, String)> = None;
    // time inside the engine's steps only (no evaluation, checkpoint or start-up)
    let mut step_seconds = 0.0f64;
    let mut pending: Option<(f32, StepOutput)> = None;
    let mut queue: std::collections::VecDeque<RunCommand> = ctl.on(RunEvent::Start).into();
    while let Some(cmd) = queue.pop_front() {
        let next = match cmd {
            RunCommand::Step { step, lr, gate } => {
                let h = StepHyper {
                    opt,
                    lr,
                    clip: t.grad_clip,
                    gamma: t.bias_update_speed,
                    mtp_weight: t.mtp_loss_weight,
                    gate,
                };
                if let Some(&(_, ms)) = opts.store_outages.iter().find(|o| o.0 == step)
                    && let Some(switch) = &outage_switch
                {
                    tracing::warn!(step, ms, "injected store outage: every store request fails");
                    switch.outage(std::time::Duration::from_millis(ms));
                }
                if t.rollback_ring > 0 {
                    engine.sync_host(&mut state)?;
                    // a full ring's oldest entry lends its buffers to the newest
                    let spare = (ring.len() >= t.rollback_ring)
                        .then(|| ring.pop_front())
                        .flatten();
                    ring.push_back(state.copy_without_grads_into(spare));
                }
                let t0 = Instant::now();
                let (s, out) = engine.step(state, step, &h)?;
                step_seconds += t0.elapsed().as_secs_f64();
                state = s;
                tokens += (t.batch_size * t.seq_len) as u64;
                let (loss, grad_norm, rejected) = (out.stats.loss, out.grad_norm, out.rejected);
                pending = Some((lr, out));
                ctl.on(RunEvent::StepDone {
                    step,
                    loss,
                    grad_norm,
                    rejected,
                })
            }
            RunCommand::Rollback {
                spike_step,
                to_step,
                why,
            } => {
                engine.sync_host(&mut state)?;
                let back = crate::rollback::rollback(
                    opts,
                    &mut state,
                    &mut ring,
                    uploader.as_ref(),
                    ids.checkpoints,
                    spike_step,
                    to_step,
                    engine,
                )?;
                tracing::warn!(
                    step = spike_step,
                    %why,
                    back_to = back,
                    "loss spike: the step's update is discarded and its data skipped"
                );
                rejected_at = Some((back, why.to_string()));
                vec![]
            }
            RunCommand::Diverged { step, why, times } => {
                bail!(
                    "step {step}: {why}; {times} steps in a row were rejected as loss spikes (diverged); lower --lr"
                );
            }
            RunCommand::Eval { step } => {
                engine.sync_host(&mut state)?;
                let loss = evaluate(&state.model, data, t.eval_batches, t.batch_size, t.seq_len)?;
                ctl.on(RunEvent::EvalDone { step, loss })
            }
            RunCommand::Record { step, eval_loss } => {
                let (lr, out) = pending
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("step {step}: recorded before it ran"))?;
                let StepOutput {
                    stats,
                    grad_norm: norm,
                    rejected,
                } = out;
                let rolled = rejected_at.take().filter(|_| rejected.is_some());
                let record = StepRecord {
                    step,
                    loss: stats.loss,
                    mtp_loss: stats.mtp_loss,
                    balance_loss: stats.balance_loss,
                    eval_loss,
                    lr,
                    grad_norm: norm,
                    expert_load_max_over_mean: stats.load_imbalance(),
                    tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64(),
                    rejected: rolled.as_ref().map(|(_, why)| why.clone()),
                    rolled_back_to: rolled.as_ref().map(|(back, _)| *back),
                    restarts: engine.restarts(),
                };
                let line = serde_json::to_value(&record)?;
                log.write(&line)?;
                journal.step(run, step, &line)?;
                on_step(&record, t.steps);
                if rejected.is_none() {
                    last_losses.push(stats.loss);
                    last_stats = stats;
                }
                vec![]
            }
            RunCommand::Checkpoint { step } => {
                if let (Some(up), Some(plan)) = (uploader.as_mut(), opts.checkpoints.as_ref()) {
                    engine.sync_host(&mut state)?;
                    state.monitor = ctl.monitor.state.clone();
                    let meta = crate::checkpoint::meta(opts, &state, plan.every);
                    // the step loop pays for the copy alone, into the last snapshot's buffers
                    let snap = crate::checkpoint::snapshot_into(&state, &owners, up.take_buffers());
                    up.save(step, snap, meta)?;
                }
                vec![]
            }
            RunCommand::Finish => vec![],
        };
        queue.extend(next);
    }
    engine.sync_host(&mut state)?;
    let eval_loss = ctl.eval_loss.unwrap_or(initial_eval);
    let uploads = match uploader.as_mut() {
        Some(up) => up.finish_summary()?,
        None => Default::default(),
    };
    let checkpoints = uploads.committed;
    let wall = started.elapsed().as_secs_f64();
    let tail = &last_losses[last_losses.len().saturating_sub(10)..];
    Ok(TrainSummary {
        steps: t.steps,
        final_loss: last_losses.last().copied().unwrap_or(f64::NAN),
        final_loss_avg10: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        initial_eval_loss: initial_eval,
        eval_loss,
        tokens_per_s: tokens as f64 / wall,
        train_tokens_per_s: tokens as f64 / step_seconds.max(1e-9),
        wall_tokens_per_s: tokens as f64 / run_started.elapsed().as_secs_f64(),
        params_sha256: state.model.params.sha256(),
        parameters: state.model.num_params(),
        expert_load_max_over_mean: last_stats.load_imbalance(),
        seed: opts.seed,
        config: opts.config_path.clone(),
        data: data.description.clone(),
        wall_seconds: wall,
        metrics: log.path().display().to_string(),
        restarts: engine.restarts(),
        replayed_steps: engine.replayed_steps(),
        faults_fired: Default::default(),
        coordinator_restarts: 0,
        detections_ms: Vec::new(),
        stragglers: 0,
        processes_restarted: 0,
        recovery_ms: Vec::new(),
        checkpoints,
        checkpoints_missed: uploads.checkpoints_missed,
        resumed_from,
        rollbacks: ctl.monitor.state.rollbacks,
        skipped_steps: ctl.monitor.state.skipped_steps,
    })
}

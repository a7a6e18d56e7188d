//! The formation: the trainer as a pipeline of stage copies, run by a thread executor or by
//! supervised actors, with step transactions, fault injection, restart and replay.
//!
//! The decisions are the pure machines of [`crate::core`]; here are the engines that drive them:
//! [`threads`] (one OS thread per rank, no failures) and the ractor formation
//! ([`crate::shell`], feature `shells`), plus the compute of one rank ([`compute`]) and the
//! fault-injection plan ([`inject`]).

pub mod compute;
pub use crate::inject;
pub mod threads;

pub use compute::Wire;

pub use inject::InjectPlan;

use crate::schedule::{ScheduleKind, build};
use crate::trainer::{self, StepRecord, TrainOptions, TrainSummary};
use anyhow::{Result, anyhow, bail};
pub use kernels::device::model::stage::StagePlacement;
use std::sync::Arc;

/// How the model is laid out over the formation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Pipeline ranks (`--pp`); DualPipeV runs `2·pp` model stages on them.
    pub pp: usize,
    /// Expert groups (`--ep`): the routed experts of every MoE decoder layer split over `ep`
    /// ExpertGroupActors (must divide n_routed_experts and n_group).
    pub ep: usize,
    pub schedule: ScheduleKind,
    /// Micro-batches per step; the batch size must be a multiple.
    pub microbatches: usize,
    pub wire: Wire,
    /// Where the stage copies compute (`--device`): the CPU model, or a device backend.
    pub compute: StagePlacement,
}

impl Default for Layout {
    /// One rank, 1F1B, one micro-batch, f32 wire: the single-process step.
    fn default() -> Layout {
        Layout {
            pp: 1,
            ep: 1,
            schedule: ScheduleKind::OneFOneB,
            microbatches: 1,
            wire: Wire::F32,
            compute: StagePlacement::Model,
        }
    }
}

impl Layout {
    /// Checks the layout against the options; errors name the flag.
    pub fn validate(&self, opts: &TrainOptions) -> Result<()> {
        let t = &opts.config.training;
        if self.pp == 0 {
            bail!("--pp must be at least 1");
        }
        let m = &opts.config.model;
        if self.ep == 0 {
            bail!("--ep must be at least 1");
        }
        if self.ep > 1 {
            if m.n_routed_experts == 0 || !m.n_routed_experts.is_multiple_of(self.ep) {
                bail!(
                    "--ep {}: the expert groups must split the {} routed experts (n_routed_experts) evenly",
                    self.ep,
                    m.n_routed_experts
                );
            }
            if m.n_group == 0 || !m.n_group.is_multiple_of(self.ep) {
                bail!(
                    "--ep {}: must equal or divide n_group = {} so that group-limited routing sends a token to at most topk_group = {} expert groups",
                    self.ep,
                    m.n_group,
                    m.topk_group
                );
            }
        }
        if self.microbatches == 0 || !t.batch_size.is_multiple_of(self.microbatches) {
            bail!(
                "--microbatches {}: the batch size {} must be a positive multiple of it",
                self.microbatches,
                t.batch_size
            );
        }
        build(self.schedule, self.pp, self.microbatches)
            .map_err(|e| anyhow!("--schedule {} --pp {}: {e}", self.schedule, self.pp))?;
        Ok(())
    }
}

/// Trains with the formation: the model cut into the stage copies of `layout.schedule` on
/// `layout.pp` ranks, `layout.microbatches` micro-batches per step, run by the supervised actors
/// (Coordinator, DataLoader, NodeSupervisor, GpuActor, StageActor). With `inject`, the plan's
/// faults fire once each and are healed (restart, restore from the last committed step, replay);
/// the summary counts restarts and replayed steps. With the f32 wire the result equals
/// [`trainer::train_microbatched`] with as many micro-batches, bit for bit.
#[cfg(feature = "runtime")]
pub fn train(
    opts: &TrainOptions,
    layout: &Layout,
    inject: Option<InjectPlan>,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    layout.validate(opts)?;
    let t = &opts.config.training;
    let plan = inject.unwrap_or_default();
    plan.validate(t.steps, layout.pp, layout.ep)
        .map_err(anyhow::Error::msg)?;
    // loss spikes and store outages are the driver's: the actors never see them
    let (spikes, plan) = plan.split_loss_spikes();
    let (outages, plan) = plan.split_store_outages();
    let mut with_outages;
    let opts = if outages.is_empty() {
        opts
    } else {
        if opts.checkpoints.is_none() {
            bail!("--inject: a store_outage needs checkpoints (a store) to hit");
        }
        with_outages = opts.clone();
        with_outages.store_outages = outages.clone();
        &with_outages
    };
    let mut data = trainer::open_data(opts)?;
    for &(step, factor) in &spikes {
        if factor.is_none() {
            data.poison(step);
        }
    }
    let data = Arc::new(data);
    tracing::info!(data = %data.description, "data ready");
    let state = trainer::build_state(opts)?;
    let schedule = build(layout.schedule, layout.pp, layout.microbatches)?;
    crate::schedule::check(&schedule).map_err(|e| anyhow!("schedule {}: {e}", layout.schedule))?;
    let spec = crate::shell::FormationSpec {
        schedule,
        wire: layout.wire,
        ep: layout.ep,
        mtp_weight: t.mtp_loss_weight,
        faults: Arc::new(inject::FaultBook::new(&plan)),
        policy: crate::core::supervisor::RestartPolicy::default(),
        timeouts: crate::core::coordinator::TimeoutPolicy {
            fixed_ms: plan.step_timeout_ms,
            ..Default::default()
        },
        coordinator_dead_after: std::time::Duration::from_millis(1_800),
        detector: crate::core::detector::DetectorPolicy {
            dead_after_ms: 1_800,
            slow_factor: 2.5,
            ..Default::default()
        },
        data: data.clone(),
        seed: opts.seed,
        batch: t.batch_size,
        seq: t.seq_len,
        committed: state.step,
        compute: layout.compute,
    };
    let mut engine = crate::shell::ActorEngine::start(&state.model, spec)?;
    let first_step = state.step + 1;
    let lr_spikes: std::collections::BTreeMap<u64, f32> = spikes
        .iter()
        .filter_map(|&(s, f)| f.map(|f| (s, f as f32)))
        .collect();
    let mut spiking = crate::rollback::LrSpikes {
        inner: &mut engine,
        at: lr_spikes,
    };
    let summary = trainer::run(opts, &data, state, &mut spiking, on_step).map(|mut s| {
        if !plan.faults.is_empty() || !spikes.is_empty() || !outages.is_empty() {
            s.faults_fired = engine.faults_fired();
            let ran = spikes.iter().filter(|&&(x, _)| x >= first_step).count() as u64;
            s.faults_fired.insert("loss_spike".into(), ran);
            let ran = outages.iter().filter(|&&(x, _)| x >= first_step).count() as u64;
            s.faults_fired.insert("store_outage".into(), ran);
        }
        s.coordinator_restarts = engine.coordinator_restarts;
        (s.detections_ms, s.stragglers) = engine.detections();
        s
    });
    let unfired = engine.unfired_faults();
    engine.shutdown();
    if !unfired.is_empty() {
        tracing::warn!(
            count = unfired.len(),
            "injected faults that never fired: {unfired:?}"
        );
    }
    summary
}

/// Trains with the engine the layout calls for: the plain loop for the default layout without
/// faults, the thread executor when `threads` is asked for, else the actor formation.
#[cfg(feature = "runtime")]
pub fn train_with(
    opts: &TrainOptions,
    layout: &Layout,
    inject: Option<InjectPlan>,
    threads: bool,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    if threads {
        if inject.is_some() {
            bail!(
                "--inject needs the actor formation: the thread executor (--threads) has no fault handling"
            );
        }
        train_threads(opts, layout, on_step)
    } else if *layout != Layout::default() || inject.is_some() {
        train(opts, layout, inject, on_step)
    } else {
        trainer::train(opts, on_step)
    }
}

/// The same run on the plain thread executor (one OS thread per rank, no actors, no fault
/// handling): the reference the actor formation is compared with.
pub fn train_threads(
    opts: &TrainOptions,
    layout: &Layout,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    layout.validate(opts)?;
    let data = Arc::new(trainer::open_data(opts)?);
    let state = trainer::build_state(opts)?;
    let t = &opts.config.training;
    let schedule = build(layout.schedule, layout.pp, layout.microbatches)?;
    let pipeline = threads::Pipeline::new(&state.model, schedule, t.mtp_loss_weight, layout.wire)?
        .with_ep(&state.model, layout.ep, layout.compute)?
        .on(layout.compute)?;
    let mut engine = threads::ThreadEngine {
        pipeline,
        data: data.clone(),
        seed: opts.seed,
        batch: t.batch_size,
        seq: t.seq_len,
    };
    trainer::run(opts, &data, state, &mut engine, on_step)
}

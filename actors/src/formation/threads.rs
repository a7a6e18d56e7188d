//! The plain in-process pipeline executor: one OS thread per rank, std channels carrying the f32
//! activation and gradient tensors, each rank driven by its sans-IO [`RankMachine`] (the same
//! machine the GpuActor drives).
//!
//! No actors and no failure handling: this is the reference that proves a schedule computes the
//! single-process step (bit for bit with the f32 wire), and the engine behind `--pp` without
//! fault injection.

use super::StagePlacement;
use super::compute::{Wire, WiredExperts, exec_op};
use crate::core::executor::Arrival;
use crate::core::rank::{RankCommand, RankEvent, RankMachine, RankStats};
use crate::schedule::{Schedule, check};
use crate::trainer::{self, StepEngine, StepHyper, StepOutput, TrainState};
use anyhow::{Result, anyhow, bail};
use kernels::model::experts::LocalExpertGroups;
use kernels::model::stage::{
    Stage, StageGrads, StageRunner, StageStats, combine_microbatch_stats, partition, reduce,
    scale_for_microbatches,
};
use kernels::model::{Batch, DeepSeekV3, ParamStore, StepStats};
use kernels::tensor::Tensor;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;
use storage::dataset::Dataset;

type Message = (Arrival, Vec<f32>);

/// The stage copies one rank holds.
#[derive(Debug)]
pub struct RankState {
    pub rank: usize,
    /// Stage copy id → its runner.
    pub copies: BTreeMap<usize, StageRunner>,
}

impl RankState {
    /// Moves every stage copy of this rank onto `placement`'s device (a no-op on the CPU
    /// model); the error names the rank and the device that did not open.
    pub fn on(&mut self, placement: StagePlacement, microbatches: usize) -> Result<()> {
        for (copy, r) in &mut self.copies {
            if let Some(d) = placement
                .open(self.rank, microbatches)
                .map_err(anyhow::Error::msg)?
            {
                r.set_device(d)
                    .map_err(|e| anyhow!("stage copy s{copy} on rank {}: {e}", self.rank))?;
                let on = r.device().unwrap_or_default();
                tracing::info!(rank = self.rank, copy, "stage copy computes on {on}");
            }
        }
        Ok(())
    }

    /// Expert parallelism: the routed experts of every stage copy's decoder blocks run in `ep`
    /// in-process expert groups behind the wire (payloads really encoded to frames as `wire`),
    /// on the copy's device under `placement` (the CPU model by default). No-op for 1.
    pub fn with_ep(
        &mut self,
        model: &DeepSeekV3,
        ep: usize,
        wire: Wire,
        d: usize,
        placement: StagePlacement,
    ) -> Result<()> {
        if ep <= 1 {
            return Ok(());
        }
        for (copy, c) in self.copies.iter_mut() {
            let layers = c.stage.layers.clone();
            let mut groups = LocalExpertGroups::new(model, layers, ep);
            for g in &mut groups.groups {
                let (rank, index) = (self.rank, g.index);
                let on = |e: String| {
                    anyhow!("expert group {index} of stage copy s{copy} on rank {rank}: {e}")
                };
                if let Some(dev) = placement.open_experts(rank).map_err(on)? {
                    g.set_device(dev).map_err(on)?;
                    let on = g.device().unwrap_or_default();
                    tracing::info!(rank, copy, group = index, "expert group computes on {on}");
                }
            }
            c.set_experts(Box::new(WiredExperts { groups, wire, d }));
        }
        Ok(())
    }

    /// Runs a machine's `RunOp` on the copy it names; its answer for the machine.
    pub fn run_op(
        &mut self,
        batches: &[Batch],
        (op_id, copy, step, attempt): (u64, usize, u64, u32),
        op: crate::core::ops::StageOp,
    ) -> Result<RankEvent<()>, String> {
        let mb = op.mb();
        let runner = self
            .copies
            .get_mut(&copy)
            .ok_or_else(|| format!("stage copy s{copy} is not on this rank"))?;
        let result = exec_op(runner, batches, op);
        Ok(RankEvent::OpDone {
            op_id,
            copy,
            step,
            attempt,
            mb,
            result,
        })
    }
}

/// A model cut into the stage copies of a schedule, ready to run steps.
#[derive(Debug)]
pub struct Pipeline {
    pub schedule: Schedule,
    pub wire: Wire,
    pub ranks: Vec<RankState>,
    hidden: usize,
}

/// Builds the runners of every stage copy of `schedule` from `model`.
pub fn build_ranks(model: &DeepSeekV3, schedule: &Schedule, mtp_weight: f32) -> Vec<RankState> {
    let ranges = partition(
        model.cfg.num_hidden_layers,
        schedule.kind.model_stages(schedule.ranks),
    );
    (0..schedule.ranks)
        .map(|rank| RankState {
            rank,
            copies: schedule
                .stages_on(rank)
                .into_iter()
                .map(|copy| {
                    let st = Stage::from_model(model, &ranges, schedule.stages[copy].model_stage);
                    (
                        copy,
                        StageRunner::new(st, mtp_weight, schedule.microbatches),
                    )
                })
                .collect(),
        })
        .collect()
}

/// Per micro-batch, whole-model stats from per-(micro-batch, model stage) stage stats.
pub fn combine_stage_stats(
    per: Vec<(usize, usize, StageStats)>,
    microbatches: usize,
    stages: usize,
) -> Result<Vec<StepStats>, String> {
    let mut grid: Vec<Vec<Option<StageStats>>> = (0..microbatches)
        .map(|_| (0..stages).map(|_| None).collect())
        .collect();
    for (mb, s, st) in per {
        grid[mb][s] = Some(st);
    }
    grid.into_iter()
        .enumerate()
        .map(|(mb, row)| {
            let row: Option<Vec<StageStats>> = row.into_iter().collect();
            row.map(|r| StageStats::combine(&r))
                .ok_or_else(|| format!("micro-batch {mb} lacks the stats of a stage"))
        })
        .collect()
}

impl Pipeline {
    /// Checks the schedule and cuts `model` into its stage copies.
    pub fn new(
        model: &DeepSeekV3,
        schedule: Schedule,
        mtp_weight: f32,
        wire: Wire,
    ) -> Result<Pipeline> {
        check(&schedule).map_err(|e| anyhow!("schedule {}: {e}", schedule.kind))?;
        let ranks = build_ranks(model, &schedule, mtp_weight);
        Ok(Pipeline {
            schedule,
            wire,
            ranks,
            hidden: model.cfg.hidden_size,
        })
    }

    /// Expert parallelism on every rank ([`RankState::with_ep`]).
    pub fn with_ep(
        mut self,
        model: &DeepSeekV3,
        ep: usize,
        placement: StagePlacement,
    ) -> Result<Pipeline> {
        for r in &mut self.ranks {
            r.with_ep(model, ep, self.wire, self.hidden, placement)?;
        }
        Ok(self)
    }

    /// Every rank's stage copies on `placement` (see [`RankState::on`]).
    pub fn on(mut self, placement: StagePlacement) -> Result<Pipeline> {
        let m = self.schedule.microbatches;
        for r in &mut self.ranks {
            r.on(placement, m)?;
        }
        Ok(self)
    }

    /// Installs whole-model parameter values in every stage copy.
    pub fn load_params(&mut self, full: &ParamStore) {
        for r in &mut self.ranks {
            r.copies.values_mut().for_each(|c| c.load_from(full));
        }
    }

    /// Runs one step's schedule over `batches` (one per micro-batch) and reduces the weight
    /// gradients (see [`reduce`]); returns them and the per-micro-batch stats.
    pub fn step(
        &mut self,
        batches: &[Batch],
        full: &ParamStore,
    ) -> Result<(Vec<Tensor>, Vec<StepStats>)> {
        let s = &self.schedule;
        if batches.len() != s.microbatches {
            bail!(
                "{} micro-batches for a schedule of {}",
                batches.len(),
                s.microbatches
            );
        }
        let (wire, d) = (self.wire, self.hidden);
        let abort = AtomicBool::new(false);
        let (txs, rxs): (Vec<Sender<Message>>, Vec<Receiver<Message>>) =
            (0..s.ranks).map(|_| channel()).unzip();
        let results: Vec<Result<RankStats, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .zip(rxs)
                .map(|(rank, rx)| {
                    let (txs, abort) = (txs.clone(), &abort);
                    scope.spawn(move || {
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run_rank(s, rank, batches, &rx, &txs, wire, d, abort)
                        }));
                        let r = r.unwrap_or_else(|p| Err(panic_text(&p)));
                        if r.is_err() {
                            abort.store(true, Ordering::SeqCst);
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| Err(panic_text(&p))))
                .collect()
        });
        let mut stats = Vec::new();
        for (rank, r) in results.into_iter().enumerate() {
            stats.extend(r.map_err(|e| anyhow!("pipeline rank {rank}: {e}"))?);
        }
        let mut parts = Vec::new();
        for r in &mut self.ranks {
            for c in r.copies.values_mut() {
                parts.push(StageGrads {
                    sums: c.take_grads(),
                    stage: &c.stage,
                });
            }
        }
        let grads = reduce(full, parts, s.microbatches).map_err(anyhow::Error::msg)?;
        let stages = s.kind.model_stages(s.ranks);
        let stats =
            combine_stage_stats(stats, s.microbatches, stages).map_err(anyhow::Error::msg)?;
        Ok((grads, stats))
    }
}

pub(crate) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}

/// One rank's part of a step: its machine decides, this thread computes and sends.
#[allow(clippy::too_many_arguments)]
fn run_rank(
    s: &Schedule,
    rank: &mut RankState,
    batches: &[Batch],
    rx: &Receiver<Message>,
    txs: &[Sender<Message>],
    wire: Wire,
    d: usize,
    abort: &AtomicBool,
) -> Result<RankStats, String> {
    let mut m: RankMachine<()> = RankMachine::new(s, rank.rank);
    let mut pending: VecDeque<RankEvent<()>> = VecDeque::from([RankEvent::Open {
        step: 0,
        attempt: 0,
    }]);
    loop {
        let event = match pending.pop_front() {
            Some(e) => e,
            None => loop {
                if abort.load(Ordering::SeqCst) {
                    return Err("stopped: another rank failed".into());
                }
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok((arrival, data)) => {
                        break RankEvent::Deliver {
                            step: 0,
                            attempt: 0,
                            arrival,
                            data,
                        };
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(format!("channel closed; {:?}", m.waiting_for()));
                    }
                }
            },
        };
        for cmd in m.on(event)? {
            match cmd {
                RankCommand::Starting { .. } => {}
                RankCommand::RunOp {
                    op_id,
                    copy,
                    step,
                    attempt,
                    op,
                } => pending.push_back(rank.run_op(batches, (op_id, copy, step, attempt), op)?),
                RankCommand::Send {
                    to, arrival, data, ..
                } => txs[to]
                    .send((arrival, wire.transmit(arrival, data, d)))
                    .map_err(|_| format!("rank {to} is gone"))?,
                RankCommand::TakeGrads {
                    copy,
                    step,
                    attempt,
                } => pending.push_back(RankEvent::Grads {
                    copy,
                    step,
                    attempt,
                    grads: (),
                }),
                RankCommand::Done { stats, .. } => return Ok(stats),
                RankCommand::InstallStage { .. }
                | RankCommand::Installed { .. }
                | RankCommand::Busy { .. } => {}
            }
        }
    }
}

/// The thread pipeline as a training-loop engine (no fault handling).
pub struct ThreadEngine {
    pub pipeline: Pipeline,
    pub data: Arc<Dataset>,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
}

impl StepEngine for ThreadEngine {
    fn model_stages(&self) -> usize {
        let s = &self.pipeline.schedule;
        s.kind.model_stages(s.ranks)
    }

    fn reload(&mut self, state: &TrainState) -> Result<()> {
        self.pipeline.load_params(&state.model.params);
        Ok(())
    }

    fn step(
        &mut self,
        mut state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        let m = self.pipeline.schedule.microbatches;
        let batches = trainer::microbatches(&self.data, self.seed, step, self.batch, self.seq, m)?;
        // the reduce's sums become the state's gradients: the old buffer goes first
        state.grads = Vec::new();
        let (grads, per) = self.pipeline.step(&batches, &state.model.params)?;
        state.grads = grads;
        scale_for_microbatches(&mut state.grads, m);
        let stats = combine_microbatch_stats(per);
        let out = trainer::finish_step(&mut state, stats, h)?;
        self.pipeline.load_params(&state.model.params);
        Ok((state, out))
    }
}

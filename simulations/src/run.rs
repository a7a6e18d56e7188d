//! A whole run at step granularity, in virtual time, under one recovery policy: steps commit,
//! checkpoints are taken, nodes fail (an exponential process per node, categories from the
//! scenario's mix, optional correlated bursts), failures are detected, the run recovers, spares
//! are used and repaired. The decisions are the real machines': the `RunController` picks every
//! step and checkpoint, the phi-accrual `Detector` says when a crashed or hung node is declared
//! dead (actor-level policies), and the `Supervisor` gives the restart backoff and budget.

use crate::detect::{deadline_verdict_ms, detection_ms};
use crate::engine::{Draws, Nanos, Queue, SECOND, secs, to_secs};
use crate::failures::{self, Category, Symptom};
use crate::scenario::Scenario;
use actors::core::coordinator::TimeoutPolicy;
use actors::core::detector::DetectorPolicy;
use actors::core::monitor::{MonitorState, Spike};
use actors::core::run::{RunCommand, RunController, RunEvent, RunPlan};
use actors::core::supervisor::{RestartPolicy, SupCommand, SupEvent, Supervisor};
use actors::inject::{FaultKind, Phase, Target};
use kernels::ops::adamw::LrSchedule;
use std::collections::BTreeMap;

/// How a run recovers from a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Megatron-LM / torchtitan: the whole job restarts from the newest checkpoint after the
    /// infrastructure notices (health checks, the collective watchdog for hangs).
    WholeJob,
    /// phalanx: the failed actor is declared dead by the failure detector, restarted by its
    /// supervisor (on a spare node for hardware), restores its state from the object store, and
    /// the open step is replayed; nothing else restarts.
    ActorRestart,
    /// As `ActorRestart`, with the state from a peer's in-memory copy instead of the store.
    PeerRestore,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::WholeJob, Policy::ActorRestart, Policy::PeerRestore];

    pub fn name(self) -> &'static str {
        match self {
            Policy::WholeJob => "whole-job",
            Policy::ActorRestart => "actor-restart",
            Policy::PeerRestore => "peer-restore",
        }
    }
}

/// What a simulated run came to.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub policy: Policy,
    pub tokens: f64,
    pub steps: u64,
    pub wall_hours: f64,
    pub gpu_hours: f64,
    /// Productive time (committed steps that were kept) over wall time.
    pub effective_training_time: f64,
    pub interruptions: u64,
    /// GPU-hours lost, by failure category (detection, recovery and the work thrown away), and
    /// `checkpoint` for the stalls of saving.
    pub lost_gpu_hours_by_cause: BTreeMap<String, f64>,
    pub checkpoints: u64,
    /// Whole-job restarts that went back to a checkpoint.
    pub rollbacks: u64,
    /// Median time from failure to detection, seconds.
    pub detection_p50_s: f64,
    /// Checkpoints due while the store was down.
    pub checkpoints_missed: u64,
    /// Steps whose update was rejected as a loss spike (their work does not count).
    pub rejected_steps: u64,
    /// Median downtime per failure (detection to running again), seconds.
    pub recovery_p50_s: f64,
    pub events: u64,
    /// (wall hours, tokens kept) at every failure and recovery and at the end, for the picture.
    #[serde(skip)]
    pub progress: Vec<(f64, f64)>,
    /// Wall hours of every failure.
    #[serde(skip)]
    pub failures_h: Vec<f64>,
}

/// One line of the event log.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EventLine {
    pub t_h: f64,
    pub policy: Policy,
    pub event: &'static str,
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detect_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_work_s: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    StepDone(u64),
    /// A failure of the random process (None) or scripted fault `i` of the scenario.
    Failure(Option<usize>),
    /// Under whole-job restart, a loss spike: the job goes back to its newest checkpoint.
    SpikeRestart,
    /// A node turns slow; the checkpoint store goes down, comes back.
    Straggler,
    StoreDown,
    /// Scripted fault `i` that costs no restart (a straggler, a duplicate, a store outage).
    Effect(usize),
    Recovered(u64),
    Repaired,
}

/// Where in its step a scripted fault fires, as a fraction of the step (the live formation's
/// phases in step order; an assumption of this model, see `simulations/README.md`).
fn phase_fraction(p: Phase) -> f64 {
    match p {
        Phase::Forward => 0.15,
        Phase::Backward => 0.5,
        Phase::Weight => 0.8,
        Phase::Optimizer => 0.95,
    }
}

/// A scripted fault as a failure category: what it is called, how it shows itself, whether the
/// actor is restarted. `None`: it costs no restart (see [`Ev::Effect`]).
fn scripted_category(kind: FaultKind) -> Option<(Category, bool)> {
    let c = |name, symptom| Category {
        name,
        weight: 0.0,
        hardware: false,
        symptom,
        detect_median_s: 2.0,
    };
    match kind {
        // the supervisor sees the actor fail at once; a new one replays the step
        FaultKind::Panic => Some((c("panic", Symptom::Crash), true)),
        // nothing answers: the step timeout sees it, the stuck actor is replaced
        FaultKind::Hang => Some((c("hang", Symptom::Hang), true)),
        // a lost answer: the step timeout sees the sender as down, and it is replaced
        FaultKind::Drop => Some((c("drop", Symptom::Hang), true)),
        // the receiver refuses the frame (CRC): the step is replayed, nothing restarts
        FaultKind::Corrupt => Some((c("corrupt", Symptom::Crash), false)),
        // the step's update is refused by the loss monitor: its work is thrown away
        FaultKind::LossSpike => Some((c("loss_spike", Symptom::Crash), false)),
        FaultKind::Slow | FaultKind::Dup | FaultKind::StoreOutage => None,
    }
}

/// The share of a step one slowed op delays the step by (an op is one of several chunks on the
/// critical path; an assumption of this model).
const SLOW_OP_SHARE: f64 = 0.125;

impl EventLine {
    /// A line with no failure details.
    fn at(now: Nanos, policy: Policy, event: &'static str, step: u64) -> EventLine {
        EventLine {
            t_h: to_secs(now) / 3600.0,
            policy,
            event,
            step,
            category: None,
            nodes: None,
            detect_s: None,
            downtime_s: None,
            lost_work_s: None,
        }
    }
}

/// The step time of a scenario: given, or from the model's FLOPs.
/// The model config a scenario names (a path relative to the workspace root, or as given).
pub fn model_config(model: &str) -> Result<kernels::model::ModelConfig, String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let path = std::path::Path::new(model);
    let path = if path.is_absolute() || path.exists() {
        path.to_path_buf()
    } else {
        std::path::Path::new(root).join(path)
    };
    Ok(kernels::model::RunConfig::load(&path)
        .map_err(|e| e.to_string())?
        .model)
}

pub fn step_seconds(s: &Scenario) -> Result<f64, String> {
    if let Some(x) = s.run.step_seconds {
        return Ok(x);
    }
    if s.run.step_time.as_deref() == Some("pipeline") {
        return crate::step::pipeline_step_seconds(s);
    }
    let (Some(model), Some(tflops), Some(eff)) =
        (&s.run.model, s.run.peak_tflops(), s.run.efficiency)
    else {
        return Err("run.step_seconds or run.model + run.gpu_tflops + run.efficiency".into());
    };
    let cfg = model_config(model)?;
    let f = crate::cost::training_flops_per_token(&cfg, s.run.seq_len.unwrap_or(4096));
    Ok(crate::cost::step_seconds(
        f,
        s.run.tokens_per_step,
        s.gpus(),
        tflops,
        eff,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn plan(first_step: u64, total: u64, ckpt_every: u64) -> RunPlan {
    RunPlan {
        first_step,
        total_steps: total,
        eval_every: u64::MAX,
        ckpt_every: Some(ckpt_every),
        lr: LrSchedule {
            peak: 1.0,
            warmup: 0,
            decay_start: u64::MAX,
            total,
            min_ratio: 1.0,
        },
        spike: Default::default(),
    }
}

/// Simulates the scenario under `policy` with `seed`; `log` gets every event worth a line.
pub fn simulate(
    s: &Scenario,
    policy: Policy,
    seed: u64,
    log: &mut dyn FnMut(&EventLine),
) -> Result<Outcome, String> {
    let step_s = step_seconds(s)?;
    let step_ns = secs(step_s).max(1);
    let mix: &[Category] = failures::mix(&s.failures.mix).ok_or("unknown mix")?;
    let weights: Vec<f64> = mix.iter().map(|c| c.weight).collect();
    let total_steps = match s.run.tokens {
        Some(t) => (t / s.run.tokens_per_step).ceil() as u64,
        None => u64::MAX / 4,
    };
    let end_ns: Option<Nanos> = s.run.duration_hours.map(|h| secs(h * 3600.0));
    let gpus = s.gpus() as f64;
    let rate_per_ns = s.cluster.nodes as f64 * s.failures.rate_per_1000_node_days
        / 1000.0
        / (86_400.0 * SECOND as f64);
    let mean_gap_ns = if rate_per_ns > 0.0 {
        1.0 / rate_per_ns
    } else {
        f64::INFINITY
    };
    let rc = &s.recovery;
    let det_policy = DetectorPolicy {
        dead_after_ms: rc.detector_dead_after_ms,
        ..DetectorPolicy::default()
    };
    let detect_crash_s = detection_ms(det_policy, Symptom::Crash) as f64 / 1000.0;
    let detect_hang_s = detection_ms(det_policy, Symptom::Hang) as f64 / 1000.0;

    let mut gaps = Draws::new(seed, "failure-times");
    let mut cats = Draws::new(seed, "failure-categories");
    let mut delays = Draws::new(seed, "detection-delays");
    let mut bursts = Draws::new(seed, "bursts");
    let mut q: Queue<Ev> = Queue::default();
    let mut ctl = RunController::new(
        plan(1, total_steps, s.checkpoint.interval_steps),
        MonitorState::default(),
    );
    let mut sup: Supervisor<u64> = Supervisor::new("the formation", RestartPolicy::default(), true);

    let mut lost: BTreeMap<String, f64> = BTreeMap::new();
    let mut committed = 0u64;
    let mut ckpt_step = 0u64;
    let (mut checkpoints, mut rollbacks, mut interruptions) = (0u64, 0u64, 0u64);
    let mut detections = Vec::new();
    let mut downtimes = Vec::new();
    let mut spares = s.cluster.spare_nodes;
    // the current recovery: its generation and when it ends
    let mut recovery: Option<(u64, Nanos)> = None;
    let mut generation = 0u64;
    let mut now: Nanos = 0;
    let gpu_h = |ns: f64| ns / SECOND as f64 / 3600.0 * gpus;
    let tokens_per_step = s.run.tokens_per_step;
    let mut progress: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    let mut failures_h = Vec::new();

    if mean_gap_ns.is_finite() {
        q.at(
            secs(gaps.exponential(mean_gap_ns) / SECOND as f64),
            Ev::Failure(None),
        );
    }
    // slow nodes, store outages and loss spikes, each from its own stream (they do not move
    // the failure draws)
    let fl = &s.failures;
    let mut slow_draws = Draws::new(seed, "stragglers");
    let mut outage_draws = Draws::new(seed, "store-outages");
    let mut spike_draws = Draws::new(seed, "loss-spikes");
    let gap = |d: &mut Draws, per_day: f64| -> Option<Nanos> {
        (per_day > 0.0).then(|| secs(d.exponential(86_400.0 / per_day)))
    };
    let stragglers_per_day = s.cluster.nodes as f64 * fl.straggler_rate_per_1000_node_days / 1000.0;
    let outages_per_day = s.checkpoint.store_outages_per_day;
    if let Some(g) = gap(&mut slow_draws, stragglers_per_day) {
        q.at(g, Ev::Straggler);
    }
    if let Some(g) = gap(&mut outage_draws, outages_per_day) {
        q.at(g, Ev::StoreDown);
    }
    // steps run slow until then; the store is down until then
    let mut slow_until: Nanos = 0;
    let mut store_up_at: Nanos = 0;
    let (mut checkpoints_missed, mut rejected_steps) = (0u64, 0u64);
    let stretch_at = |t: Nanos, slow_until: Nanos| {
        if t < slow_until {
            fl.straggler_slowdown
        } else {
            1.0
        }
    };
    // scripted faults not fired yet, by step; those armed for the step in flight (event id,
    // fault); like the live run's fault book, each fires once, a replayed step does not repeat it
    let mut unfired: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, f) in s.faults.iter().enumerate() {
        unfired.entry(f.at_step).or_default().push(i);
    }
    let mut armed: Vec<(u64, usize)> = Vec::new();
    // the live coordinator's step deadline: the scenario's, else the detector's bound
    let timeouts = TimeoutPolicy {
        fixed_ms: Some(s.step_timeout_ms.unwrap_or(rc.detector_dead_after_ms)),
        ..TimeoutPolicy::default()
    };
    let start_step = |q: &mut Queue<Ev>,
                      unfired: &mut BTreeMap<u64, Vec<usize>>,
                      armed: &mut Vec<(u64, usize)>,
                      cmds: Vec<RunCommand>,
                      at: Nanos,
                      stretch: f64|
     -> Option<(u64, u64, Nanos, Nanos, Nanos)> {
        let took = (step_ns as f64 * stretch) as Nanos;
        let (id, step) = cmds.into_iter().find_map(|c| match c {
            RunCommand::Step { step, .. } => Some((q.at(at + took, Ev::StepDone(step)), step)),
            _ => None,
        })?;
        for i in unfired.remove(&step).unwrap_or_default() {
            let f = &s.faults[i];
            let when = at + (phase_fraction(f.phase) * step_ns as f64) as Nanos;
            let ev = match scripted_category(f.kind) {
                Some(_) => Ev::Failure(Some(i)),
                None => Ev::Effect(i),
            };
            armed.push((q.at(when, ev), i));
        }
        Some((id, step, at, at + took, took - step_ns))
    };
    // the in-flight step: its event id, its number, when it started and ends, and how much
    // longer than a step it takes (a straggler)
    let start = ctl.on(RunEvent::Start);
    let mut in_flight: Option<(u64, u64, Nanos, Nanos, Nanos)> =
        start_step(&mut q, &mut unfired, &mut armed, start, 0, 1.0);
    let mut finished = false;

    while let Some((t, ev)) = q.pop() {
        if let Some(end) = end_ns
            && t >= end
        {
            now = end;
            break;
        }
        now = t;
        match ev {
            Ev::StepDone(step) => {
                committed = step;
                if let Some((.., slower)) = in_flight
                    && slower > 0
                {
                    *lost.entry("straggler".into()).or_default() += gpu_h(slower as f64);
                }
                sup.on(now / 1_000_000, SupEvent::Progress);
                let p_spike = fl.loss_spikes_per_1000_steps / 1000.0;
                let spike = p_spike > 0.0 && spike_draws.uniform() < p_spike;
                // phalanx's loss monitor rejects the step before its update; a whole job has
                // no such gate: the spike is found later and the job goes back to a checkpoint
                let rejected = (spike && policy != Policy::WholeJob).then_some(Spike::Loss {
                    loss: 10.0,
                    limit: 3.0,
                });
                if spike && policy == Policy::WholeJob {
                    q.at(now, Ev::SpikeRestart);
                }
                let cmds = ctl.on(RunEvent::StepDone {
                    step,
                    loss: 1.0,
                    grad_norm: 1.0,
                    rejected,
                });
                let mut stall = 0;
                for c in &cmds {
                    match c {
                        RunCommand::Checkpoint { step } => {
                            let st = match policy {
                                Policy::WholeJob => s.checkpoint.sync_write_seconds,
                                _ => s.checkpoint.async_stall_seconds,
                            };
                            stall = secs(st);
                            *lost.entry("checkpoint".into()).or_default() += gpu_h(stall as f64);
                            if now < store_up_at {
                                checkpoints_missed += 1;
                            } else {
                                checkpoints += 1;
                                ckpt_step = *step;
                            }
                        }
                        RunCommand::Rollback {
                            spike_step,
                            to_step,
                            ..
                        } => {
                            // the rejected steps' work is thrown away (the ring holds the state)
                            let n = spike_step - to_step;
                            rejected_steps += n;
                            *lost.entry("loss_spike".into()).or_default() +=
                                gpu_h((n * step_ns) as f64);
                        }
                        RunCommand::Finish => finished = true,
                        _ => {}
                    }
                }
                if finished {
                    now += stall;
                    break;
                }
                armed.clear();
                let at = now + stall;
                let stretch = stretch_at(at, slow_until);
                in_flight = start_step(&mut q, &mut unfired, &mut armed, cmds, at, stretch);
            }
            Ev::Straggler => {
                slow_until = slow_until.max(now + secs(fl.straggler_minutes * 60.0));
                if let Some(g) = gap(&mut slow_draws, stragglers_per_day) {
                    q.at(now + g, Ev::Straggler);
                }
                log(&EventLine::at(now, policy, "straggler", committed));
            }
            Ev::StoreDown => {
                let until = now + secs(s.checkpoint.store_outage_minutes * 60.0);
                store_up_at = store_up_at.max(until);
                if let Some(g) = gap(&mut outage_draws, outages_per_day) {
                    q.at(now + g, Ev::StoreDown);
                }
                log(&EventLine::at(now, policy, "store_down", committed));
            }
            Ev::Effect(i) => {
                let f = &s.faults[i];
                armed.retain(|&(_, j)| j != i);
                let mut extra_s = 0.0;
                if f.kind == FaultKind::Slow
                    && let Some((id, step, started, end, slower)) = in_flight
                {
                    // the straggling op holds the step back
                    extra_s = (f.factor() - 1.0) * SLOW_OP_SHARE * step_s;
                    q.cancel(id);
                    let end = end + secs(extra_s);
                    in_flight = Some((q.at(end, Ev::StepDone(step)), step, started, end, slower));
                    *lost.entry(f.kind.name().into()).or_default() += gpu_h(secs(extra_s) as f64);
                }
                log(&EventLine {
                    t_h: to_secs(now) / 3600.0,
                    policy,
                    event: "fault",
                    step: committed,
                    category: Some(f.kind.name()),
                    nodes: None,
                    detect_s: None,
                    downtime_s: None,
                    lost_work_s: Some(extra_s),
                });
            }
            Ev::Failure(_) | Ev::SpikeRestart => {
                let (which, spike) = match ev {
                    Ev::Failure(w) => (w, false),
                    _ => (None, true),
                };
                interruptions += 1;
                failures_h.push(to_secs(now) / 3600.0);
                progress.push((to_secs(now) / 3600.0, committed as f64 * tokens_per_step));
                let script = which.and_then(|i| scripted_category(s.faults[i].kind));
                if which.is_none() && !spike && mean_gap_ns.is_finite() {
                    q.at(
                        now + secs(gaps.exponential(mean_gap_ns) / SECOND as f64),
                        Ev::Failure(None),
                    );
                }
                // scripted faults armed for the lost step fire when it runs again
                for (id, i) in armed.drain(..) {
                    if Some(i) != which {
                        q.cancel(id);
                        unfired.entry(s.faults[i].at_step).or_default().push(i);
                    }
                }
                let cat = match script {
                    Some((c, _)) => c,
                    // someone (or an alert) notices the loss curve: 10 minutes (an assumption)
                    None if spike => Category {
                        name: "loss_spike",
                        weight: 0.0,
                        hardware: false,
                        symptom: Symptom::SilentCorruption,
                        detect_median_s: 600.0,
                    },
                    None => mix[cats.pick(&weights)],
                };
                let nodes = if script.is_none() && bursts.uniform() < s.failures.burst_probability {
                    s.failures.burst_nodes.max(1)
                } else {
                    1
                };
                // the step in flight (if any) is lost either way
                let lost_open = match in_flight.take() {
                    Some((id, _, started, ..)) => {
                        q.cancel(id);
                        // a failure during a checkpoint's stall loses no step work
                        now.saturating_sub(started)
                    }
                    None => 0,
                };
                // a node to run on: a spare for hardware, else the same node
                let mut wait_spare = 0.0;
                if cat.hardware {
                    for _ in 0..nodes {
                        if spares > 0 {
                            spares -= 1;
                        } else {
                            wait_spare = rc.repair_hours * 3600.0;
                        }
                        q.at(now + secs(rc.repair_hours * 3600.0), Ev::Repaired);
                    }
                }
                // a restore from the store waits for it to come back
                let store_wait = to_secs(store_up_at.saturating_sub(now));
                let (detect, downtime, thrown) = match policy {
                    Policy::WholeJob => {
                        let detect = match cat.symptom {
                            Symptom::Hang => rc.watchdog_seconds,
                            _ => delays.lognormal(cat.detect_median_s, 0.6),
                        };
                        let restart =
                            rc.job_restart_seconds + s.checkpoint.restore_seconds + store_wait;
                        // back to the newest checkpoint: the steps after it are redone
                        let redo = (committed - ckpt_step) as f64 * step_s;
                        if committed > ckpt_step {
                            rollbacks += 1;
                        }
                        committed = ckpt_step;
                        ctl = RunController::new(
                            plan(ckpt_step + 1, total_steps, s.checkpoint.interval_steps),
                            MonitorState::default(),
                        );
                        let spare_or_repair = if cat.hardware { wait_spare } else { 0.0 };
                        (detect, detect + restart + spare_or_repair, redo)
                    }
                    Policy::ActorRestart | Policy::PeerRestore => {
                        let open_s = lost_open as f64 / SECOND as f64;
                        let detect = match (script, cat.symptom) {
                            // seen where it happens (a panic, a refused frame or update)
                            (Some(_), Symptom::Crash) => 0.0,
                            // a hung or silent actor: the failure detector's verdict (counted
                            // from its last progress) or the step timeout (counted from the
                            // step's start), whichever comes first; a GpuActor or the
                            // Coordinator is probed first when the timeout runs out
                            (Some(_), _) => {
                                let probed = which.is_some_and(|i| {
                                    matches!(
                                        s.faults[i].actor,
                                        Target::Gpu | Target::Coordinator | Target::Dataloader
                                    )
                                });
                                let open_ms = (open_s * 1000.0).round() as u64;
                                let coord_ms = deadline_verdict_ms(timeouts, open_ms, !probed);
                                detect_hang_s.min(coord_ms as f64 / 1000.0)
                            }
                            (None, Symptom::Crash) => detect_crash_s,
                            (None, Symptom::Hang) => detect_hang_s,
                            // the loss monitor judges the step before its update: the open
                            // step is rejected where it ends
                            (None, Symptom::SilentCorruption) => step_s - open_s,
                        };
                        if script.is_some_and(|(_, restarts)| !restarts) {
                            // a refused frame or update, a dropped message: the actor lives on,
                            // the step runs again once the fault is seen
                            (detect, detect, 0.0)
                        } else {
                            let now_ms = now / 1_000_000;
                            let mut backoff_ms = 0;
                            for c in sup.on(
                                now_ms,
                                SupEvent::Failed {
                                    child: 0,
                                    what: cat.name.into(),
                                },
                            ) {
                                if let SupCommand::StartTimer { after_ms, token } = c {
                                    backoff_ms = after_ms;
                                    sup.on(now_ms + after_ms, SupEvent::Timer { token });
                                }
                            }
                            let restart = if cat.hardware {
                                rc.spare_start_seconds + wait_spare
                            } else {
                                rc.process_restart_seconds
                            };
                            let restore = match policy {
                                Policy::PeerRestore => rc.peer_restore_seconds,
                                _ => rc.node_restore_seconds + store_wait,
                            };
                            (
                                detect,
                                detect + backoff_ms as f64 / 1000.0 + restart + restore,
                                0.0,
                            )
                        }
                    }
                };
                detections.push(detect);
                downtimes.push(downtime);
                let lost_s = lost_open as f64 / SECOND as f64 + thrown;
                *lost.entry(cat.name.into()).or_default() +=
                    gpu_h((downtime + lost_s) * SECOND as f64);
                generation += 1;
                let until = now + secs(downtime);
                // a failure during a recovery starts the recovery over
                recovery = Some((generation, until));
                q.at(until, Ev::Recovered(generation));
                progress.push((to_secs(now) / 3600.0, committed as f64 * tokens_per_step));
                log(&EventLine {
                    t_h: to_secs(now) / 3600.0,
                    policy,
                    event: "failure",
                    step: committed,
                    category: Some(cat.name),
                    nodes: Some(nodes),
                    detect_s: Some(detect),
                    downtime_s: Some(downtime),
                    lost_work_s: Some(lost_s),
                });
            }
            Ev::Recovered(g) => {
                if recovery.is_some_and(|(cur, _)| cur == g) {
                    recovery = None;
                    progress.push((to_secs(now) / 3600.0, committed as f64 * tokens_per_step));
                    let cmds = match policy {
                        Policy::WholeJob => ctl.on(RunEvent::Start),
                        // the open step again
                        _ => vec![RunCommand::Step {
                            step: committed + 1,
                            lr: 1.0,
                            gate: actors::core::monitor::SpikeGate::open(),
                        }],
                    };
                    let stretch = stretch_at(now, slow_until);
                    in_flight = start_step(&mut q, &mut unfired, &mut armed, cmds, now, stretch);
                    log(&EventLine {
                        t_h: to_secs(now) / 3600.0,
                        policy,
                        event: "recovered",
                        step: committed,
                        category: None,
                        nodes: None,
                        detect_s: None,
                        downtime_s: None,
                        lost_work_s: None,
                    });
                }
            }
            Ev::Repaired => spares += 1,
        }
    }
    let wall_s = to_secs(now);
    // a rejected step's work does not count
    let kept = committed - rejected_steps.min(committed);
    let productive = kept as f64 * step_s;
    progress.push((wall_s / 3600.0, committed as f64 * tokens_per_step));
    Ok(Outcome {
        policy,
        tokens: kept as f64 * s.run.tokens_per_step,
        steps: committed,
        wall_hours: wall_s / 3600.0,
        gpu_hours: wall_s / 3600.0 * gpus,
        effective_training_time: if wall_s > 0.0 {
            productive / wall_s
        } else {
            0.0
        },
        interruptions,
        lost_gpu_hours_by_cause: lost,
        checkpoints,
        rollbacks,
        detection_p50_s: median(detections),
        checkpoints_missed,
        rejected_steps,
        recovery_p50_s: median(downtimes),
        events: q.taken,
        progress,
        failures_h,
    })
}

//! The coordinator of a multi-process run, as a [`StepEngine`]: it drives the sans-IO
//! [`Coordinator`] machine (the step transaction, deadlines, probes, restores: the same rules the
//! actor formation follows) over the TCP link, holds the committed training state, reduces the
//! ranks' gradients in the canonical order and sends each rank the new values of its tensors.
//!
//! Failure handling: a rank whose process exited (the launcher says so), or that was silent past
//! the heartbeat bound, is declared dead; its process is replaced (by the launcher, see
//! [`Keeper`]) and the open step is replayed by every rank once the replacement has said hello.
//! The replacement gets its stage from the coordinator's committed copy; the other processes
//! keep theirs and do not restart.
//!
//! After every commit each rank receives the committed parameters and optimizer moments of its
//! tensors (a mirror); a coordinator that replaces a dead one rebuilds the training state from
//! those mirrors ([`ProcessEngine::recover`]).

use super::protocol::{
    BlobReader, Member, Supervision, TAG_SUPERVISOR, TAG_TO_COORD, TAG_TO_WORKER, ToCoord,
    ToWorker, Tokens, head, read_grads, read_snap, snap_blob, split, tensors_blob,
};
use crate::core::coordinator::{CoordCommand, CoordEvent, CoordTimer, Coordinator, TimeoutPolicy};
use crate::core::rank::RankStats;
use crate::formation::threads::combine_stage_stats;
use crate::schedule::Schedule;
use crate::trainer::{self, StepEngine, StepHyper, StepOutput, TrainState};
use anyhow::{Result, anyhow, bail};
use kernels::model::DeepSeekV3;
use kernels::model::stage::{
    Stage, StageGrads, combine_microbatch_stats, partition, reduce, scale_for_microbatches,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::dataset::Dataset;
use transport::link::{Link, Received};
use transport::tcp::TcpLink;

/// Who keeps the worker processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keeper {
    /// `phalanx launch`: the launcher is peer `ranks + 1` on the link; it reports exits and
    /// replaces the processes the coordinator declares dead.
    Launcher,
    /// torchrun, Slurm, Kubernetes: a dead rank is waited for until its scheduler starts a new
    /// process.
    External,
}

/// What the coordinator measured about failures.
#[derive(Clone, Debug, Default)]
pub struct FailureLog {
    /// Per dead process: ms from its last sign of life to the declaration.
    pub detections_ms: Vec<u64>,
    /// Per dead process: ms from the declaration to the step reopened with its replacement.
    pub recovery_ms: Vec<u64>,
}

/// The coordinator side of a multi-process run.
pub struct ProcessEngine {
    pub link: TcpLink,
    schedule: Schedule,
    /// Per stage copy: its stage (structure and shapes, for the reduce).
    stages: BTreeMap<usize, Stage>,
    /// Per rank: the global tensors its copies hold.
    tensors_of: Vec<Vec<usize>>,
    machine: Coordinator,
    keeper: Keeper,
    members: Vec<Option<Member>>,
    needs_params: Vec<bool>,
    heartbeat_bound: Duration,
    epoch: Instant,
    data: Arc<Dataset>,
    seed: u64,
    batch: usize,
    seq: usize,
    replayed: BTreeSet<u64>,
    recovering: Vec<Instant>,
    pub failures: FailureLog,
    /// Ranks' mirrored states while recovering: step, monitor, tensors.
    reports: BTreeMap<usize, (Option<u64>, String, Vec<storage::checkpoint::SnapTensor>)>,
}

/// How the engine is set up.
pub struct EngineSpec {
    pub schedule: Schedule,
    pub data: Arc<Dataset>,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
    pub committed: u64,
    pub heartbeat_bound: Duration,
    pub timeouts: TimeoutPolicy,
}

impl ProcessEngine {
    pub fn new(
        model: &DeepSeekV3,
        link: TcpLink,
        keeper: Keeper,
        spec: EngineSpec,
    ) -> ProcessEngine {
        let s = &spec.schedule;
        let ranges = partition(model.cfg.num_hidden_layers, s.kind.model_stages(s.ranks));
        let mut stages = BTreeMap::new();
        let mut tensors_of = vec![BTreeSet::new(); s.ranks];
        for (rank, ids) in tensors_of.iter_mut().enumerate() {
            for copy in s.stages_on(rank) {
                let st = Stage::from_model(model, &ranges, s.stages[copy].model_stage);
                ids.extend(st.global.iter().map(|g| g.0));
                stages.insert(copy, st);
            }
        }
        ProcessEngine {
            link,
            machine: Coordinator::new(s.ranks, spec.committed, spec.timeouts),
            members: vec![None; s.ranks],
            needs_params: vec![true; s.ranks],
            tensors_of: tensors_of
                .into_iter()
                .map(|t| t.into_iter().collect())
                .collect(),
            stages,
            schedule: spec.schedule,
            keeper,
            heartbeat_bound: spec.heartbeat_bound,
            epoch: Instant::now(),
            data: spec.data,
            seed: spec.seed,
            batch: spec.batch,
            seq: spec.seq,
            replayed: BTreeSet::new(),
            recovering: Vec::new(),
            failures: FailureLog::default(),
            reports: BTreeMap::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn send(&self, rank: usize, msg: &ToWorker, blob: &[u8]) {
        let h = match head(msg) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        if let Err(e) = self.link.send_parts(rank, TAG_TO_WORKER, &[&h, blob]) {
            // the rank's death is the detector's to declare; the step protocol replays
            tracing::debug!("to rank {rank}: {e}");
        }
    }

    /// Tells every live process the run is over.
    pub fn finish(&self, reason: &str) {
        for r in 0..self.schedule.ranks {
            if self.members[r].is_some() {
                let msg = ToWorker::Exit {
                    reason: reason.to_string(),
                };
                self.send(r, &msg, &[]);
            }
        }
    }

    fn broadcast_peers(&self) {
        let members: Vec<Member> = self.members.iter().flatten().cloned().collect();
        for m in &members {
            let msg = ToWorker::Peers {
                members: members.clone(),
            };
            self.send(m.rank, &msg, &[]);
        }
    }

    /// `rank` is dead: the machine hears of it; `replace`: ask the keeper for a new process
    /// (not when the launcher already reported the exit and starts one itself).
    fn declare_dead(
        &mut self,
        rank: usize,
        why: String,
        replace: bool,
        out: &mut VecDeque<CoordCommand>,
    ) {
        let silent = self
            .link
            .silent_for(rank)
            .map_or(0, |d| d.as_millis() as u64);
        tracing::warn!("rank {rank} declared dead: {why} (silent {silent} ms)");
        self.failures.detections_ms.push(silent);
        self.members[rank] = None;
        self.recovering.push(Instant::now());
        if replace {
            match self.keeper {
                Keeper::Launcher => {
                    let msg = Supervision::Replace { rank };
                    if let Err(e) = head(&msg).map_err(|e| e.to_string()).and_then(|h| {
                        self.link
                            .send_parts(self.launcher(), TAG_SUPERVISOR, &[&h])
                            .map_err(|e| e.to_string())
                    }) {
                        tracing::error!(
                            "rank {rank}: cannot ask the launcher for a replacement: {e}"
                        );
                    }
                }
                Keeper::External => {
                    tracing::warn!("rank {rank}: waiting for its scheduler to start a new process")
                }
            }
        }
        let now = self.now_ms();
        out.extend(
            self.machine
                .on(now, CoordEvent::RankDown { rank, reason: why }),
        );
    }

    fn launcher(&self) -> usize {
        self.schedule.ranks + 1
    }

    /// Silences since the last look.
    fn watch(&mut self, out: &mut VecDeque<CoordCommand>) {
        for rank in 0..self.schedule.ranks {
            if self.members[rank].is_some()
                && self
                    .link
                    .silent_for(rank)
                    .is_some_and(|d| d > self.heartbeat_bound)
            {
                let why = format!(
                    "no heartbeat for more than {} ms",
                    self.heartbeat_bound.as_millis()
                );
                self.declare_dead(rank, why, true, out);
            }
        }
    }

    /// Each rank's share of the committed state, for the mirrors.
    fn mirror(&self, state: &TrainState) {
        let monitor = serde_json::to_string(&state.monitor).unwrap_or_default();
        for r in 0..self.schedule.ranks {
            let snap = crate::checkpoint::snapshot_of(state, &self.tensors_of[r]);
            let (tensors, blob) = snap_blob(&snap);
            let msg = ToWorker::Mirror {
                step: state.step,
                monitor: monitor.clone(),
                tensors,
            };
            self.send(r, &msg, &blob);
        }
    }

    /// Rebuilds the committed training state from the ranks' mirrors (a coordinator replacing
    /// a dead one): waits for every rank's hello, then for the newest step all of them hold.
    /// `template` is a state of the right shapes (fresh from the config).
    pub fn recover(&mut self, mut template: TrainState, wait: Duration) -> Result<TrainState> {
        let started = Instant::now();
        let mut out = VecDeque::new();
        let mut done = BTreeMap::new();
        let ranks = self.schedule.ranks;
        let mut at_most: Option<u64> = None;
        loop {
            // every rank up
            while self.members.iter().any(Option::is_none) {
                if started.elapsed() > wait {
                    let missing: Vec<usize> =
                        (0..ranks).filter(|&r| self.members[r].is_none()).collect();
                    bail!("recovering: ranks {missing:?} did not report within {wait:?}");
                }
                self.pump(&mut done, &mut out)?;
            }
            self.reports.clear();
            for r in 0..ranks {
                self.send(r, &ToWorker::Report { at_most }, &[]);
            }
            while self.reports.len() < ranks {
                if started.elapsed() > wait {
                    bail!(
                        "recovering: {} of {ranks} ranks sent their state",
                        self.reports.len()
                    );
                }
                self.pump(&mut done, &mut out)?;
            }
            let steps: Vec<Option<u64>> = self.reports.values().map(|r| r.0).collect();
            let Some(min) = steps.iter().copied().min().flatten() else {
                bail!("recovering: a rank holds no committed state (steps {steps:?})");
            };
            if steps.iter().all(|&s| s == Some(min)) {
                break;
            }
            at_most = Some(min);
        }
        let mut tensors = Vec::new();
        let mut monitor = String::new();
        let mut step = 0;
        for (_, (s, m, t)) in std::mem::take(&mut self.reports) {
            step = s.unwrap_or(0);
            monitor = m;
            tensors.extend(t);
        }
        // a tensor held by two ranks comes twice, with the same values: keep one
        let mut seen = std::collections::HashSet::new();
        tensors.retain(|t: &storage::checkpoint::SnapTensor| seen.insert(t.name.clone()));
        let run = template.restored_from.clone().unwrap_or_default();
        crate::checkpoint::restore(&mut template, tensors, &run, step)?;
        template.monitor = serde_json::from_str(&monitor).unwrap_or_default();
        self.restart_at(step);
        tracing::info!("recovered the committed state of step {step} from the ranks' mirrors");
        Ok(template)
    }

    /// The step transaction starts over after `step` (a state recovered from the mirrors or
    /// the store); every rank up gets the committed tensors with the next open.
    pub fn restart_at(&mut self, step: u64) {
        self.machine = Coordinator::new(self.schedule.ranks, step, TimeoutPolicy::default());
        let now = self.now_ms();
        for r in 0..self.schedule.ranks {
            if self.members[r].is_some() {
                let _ = self.machine.on(now, CoordEvent::RankUp { rank: r });
            }
        }
        self.needs_params.iter_mut().for_each(|n| *n = true);
    }

    /// One round of the link: a message handled, or 20 ms passed.
    fn pump(&mut self, done: &mut DoneSet, out: &mut VecDeque<CoordCommand>) -> Result<()> {
        if let Some(received) = self.link.recv_timeout(Duration::from_millis(20))? {
            match received {
                Received::Refused(e) => tracing::warn!("refused a message: {e}"),
                Received::Message(msg) if msg.tag == TAG_TO_COORD => {
                    self.on_message(msg.sender, &msg.payload, done, out)
                }
                Received::Message(msg) if msg.tag == TAG_SUPERVISOR => {
                    match split::<Supervision>(&msg.payload) {
                        Ok((Supervision::Exited { rank, how }, _))
                            if rank < self.schedule.ranks =>
                        {
                            if self.members[rank].is_some() {
                                self.declare_dead(rank, format!("its process {how}"), false, out);
                            }
                        }
                        Ok(other) => tracing::warn!("unexpected supervision message {other:?}"),
                        Err(e) => tracing::warn!("unreadable supervision message: {e}"),
                    }
                }
                Received::Message(msg) => {
                    tracing::warn!("message with unknown tag {:#x}", msg.tag)
                }
            }
        }
        Ok(())
    }
}

/// Per rank: its Done of the open attempt (stats, gradient heads, blob).
type DoneSet = BTreeMap<usize, (RankStats, Vec<super::protocol::CopyGrads>, Vec<u8>)>;

impl ProcessEngine {
    fn reduce(
        &self,
        state: &TrainState,
        done: &mut DoneSet,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        let m = self.schedule.microbatches;
        let mut parts = Vec::new();
        let mut per = Vec::new();
        for (rank, (stats, heads, blob)) in std::mem::take(done) {
            per.extend(stats);
            let mut r = BlobReader { rest: &blob };
            for ch in &heads {
                let stage = self.stages.get(&ch.copy).ok_or_else(|| {
                    anyhow!("rank {rank} sent gradients of unknown copy s{}", ch.copy)
                })?;
                let sums = read_grads(ch, stage, m, &mut r)
                    .map_err(|e| anyhow!("rank {rank}'s gradients of s{}: {e}", ch.copy))?;
                parts.push(StageGrads { stage, sums });
            }
            r.finish()
                .map_err(|e| anyhow!("rank {rank}'s gradients: {e}"))?;
        }
        let mut grads = reduce(&state.model.params, parts, m).map_err(anyhow::Error::msg)?;
        scale_for_microbatches(&mut grads, m);
        let stages = self.schedule.kind.model_stages(self.schedule.ranks);
        let per = combine_stage_stats(per, m, stages).map_err(anyhow::Error::msg)?;
        trainer::finish_step_beside(state, grads, combine_microbatch_stats(per), h)
    }
}

impl StepEngine for ProcessEngine {
    fn model_stages(&self) -> usize {
        self.schedule.kind.model_stages(self.schedule.ranks)
    }

    fn restarts(&self) -> u64 {
        self.failures.detections_ms.len() as u64
    }

    fn replayed_steps(&self) -> u64 {
        self.replayed.len() as u64
    }

    fn reload(&mut self, _state: &TrainState) -> Result<()> {
        // every rank loads the (older) committed state with the next open
        self.needs_params.iter_mut().for_each(|n| *n = true);
        Ok(())
    }

    fn step(
        &mut self,
        state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        let m = self.schedule.microbatches;
        let batches = trainer::microbatches(&self.data, self.seed, step, self.batch, self.seq, m)?;
        let tokens: Vec<Tokens> = batches.iter().map(Tokens::of).collect();
        let mut done: DoneSet = BTreeMap::new();
        let mut tentative: Option<(TrainState, StepOutput)> = None;
        let mut timers: Vec<(u64, CoordTimer)> = Vec::new();
        let mut out: VecDeque<CoordCommand> = VecDeque::new();
        let now = self.now_ms();
        out.extend(self.machine.on(now, CoordEvent::Begin { step }));
        loop {
            while let Some(cmd) = out.pop_front() {
                let now = self.now_ms();
                match cmd {
                    CoordCommand::Open {
                        step,
                        attempt,
                        restore,
                    } => {
                        if attempt > 0 {
                            self.replayed.insert(step);
                        }
                        done.clear();
                        tentative = None;
                        for t in self.recovering.drain(..) {
                            self.failures
                                .recovery_ms
                                .push(t.elapsed().as_millis() as u64);
                        }
                        for r in 0..self.schedule.ranks {
                            let ids: &[usize] = if restore || self.needs_params[r] {
                                &self.tensors_of[r]
                            } else {
                                &[]
                            };
                            let (params, blob) = tensors_blob(&state.model.params.tensors, ids);
                            self.needs_params[r] = false;
                            let msg = ToWorker::Open {
                                step,
                                attempt,
                                batches: tokens.clone(),
                                params,
                            };
                            self.send(r, &msg, &blob);
                        }
                    }
                    CoordCommand::SetTimer { at_ms, timer } => timers.push((at_ms, timer)),
                    CoordCommand::Reduce { step, attempt } => {
                        tentative = Some(self.reduce(&state, &mut done, h)?);
                        out.extend(self.machine.on(now, CoordEvent::Reduced { step, attempt }));
                    }
                    CoordCommand::Install { step, attempt } => {
                        let (next, _) = tentative.as_ref().expect("reduced before install");
                        for r in 0..self.schedule.ranks {
                            let (params, blob) =
                                tensors_blob(&next.model.params.tensors, &self.tensors_of[r]);
                            let msg = ToWorker::Install {
                                step,
                                attempt,
                                params,
                            };
                            self.send(r, &msg, &blob);
                        }
                    }
                    CoordCommand::Commit { .. } => {
                        let (next, output) =
                            tentative.ok_or_else(|| anyhow!("committed before reducing"))?;
                        self.mirror(&next);
                        return Ok((next, output));
                    }
                    CoordCommand::Abort {
                        step,
                        attempt,
                        reason,
                    } => {
                        tracing::warn!("step {step} attempt {attempt} aborted: {reason}");
                        for r in 0..self.schedule.ranks {
                            self.send(r, &ToWorker::Abort { step, attempt }, &[]);
                        }
                    }
                    CoordCommand::Probe { step, attempt } => {
                        // a rank whose heartbeat is fresh is alive: it answers for itself
                        for r in 0..self.schedule.ranks {
                            if self.members[r].is_some()
                                && self
                                    .link
                                    .silent_for(r)
                                    .is_some_and(|d| d <= self.heartbeat_bound)
                            {
                                out.extend(self.machine.on(
                                    now,
                                    CoordEvent::ProbeAck {
                                        rank: r,
                                        step,
                                        attempt,
                                    },
                                ));
                            }
                        }
                    }
                    CoordCommand::Kill { rank } => {
                        if self.members[rank].is_some() {
                            self.declare_dead(
                                rank,
                                "did not answer a probe".into(),
                                true,
                                &mut out,
                            );
                        }
                    }
                    CoordCommand::GiveUp { step, reason } => {
                        bail!("step {step}: gave up: {reason}")
                    }
                }
            }
            if super::interrupted() {
                bail!("interrupted");
            }
            self.pump(&mut done, &mut out)?;
            let now = self.now_ms();
            let (due, rest): (Vec<_>, Vec<_>) = timers.drain(..).partition(|t| t.0 <= now);
            timers = rest;
            for (_, t) in due {
                out.extend(self.machine.on(now, CoordEvent::Timer(t)));
            }
            self.watch(&mut out);
        }
    }
}

impl ProcessEngine {
    fn on_message(
        &mut self,
        rank: usize,
        payload: &[u8],
        done: &mut DoneSet,
        out: &mut VecDeque<CoordCommand>,
    ) {
        let (msg, blob): (ToCoord, &[u8]) = match split(payload) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("rank {rank}: unreadable message: {e}");
                return;
            }
        };
        let now = self.now_ms();
        let incarnation = self.link.peer_incarnation(rank);
        match msg {
            ToCoord::Hello {
                rank: r,
                incarnation: inc,
                addr,
                pid,
            } => {
                if r != rank || inc < incarnation {
                    tracing::warn!("hello from rank {r} incarnation {inc} on peer {rank}: ignored");
                    return;
                }
                let Ok(sock) = addr.parse() else {
                    tracing::warn!("rank {rank}: bad address {addr:?}");
                    return;
                };
                match self.members[rank].as_ref().map(|m| m.incarnation) {
                    Some(known) if known == inc => return,
                    // a newer process of a rank still counted up: the old one is gone
                    Some(_) => self.declare_dead(
                        rank,
                        format!("replaced by incarnation {inc}"),
                        false,
                        out,
                    ),
                    None => {}
                }
                tracing::info!("rank {rank} is up: pid {pid}, incarnation {inc}, at {addr}");
                self.link.set_peer(rank, sock, inc);
                self.members[rank] = Some(Member {
                    rank,
                    addr,
                    incarnation: inc,
                });
                self.needs_params[rank] = true;
                self.broadcast_peers();
                out.extend(self.machine.on(now, CoordEvent::RankUp { rank }));
            }
            ToCoord::Heartbeat { .. } => {}
            ToCoord::State {
                step,
                monitor,
                tensors,
            } => match read_snap(&tensors, blob) {
                Ok(t) => {
                    self.reports.insert(rank, (step, monitor, t));
                }
                Err(e) => tracing::warn!("rank {rank}: unreadable state: {e}"),
            },
            ToCoord::Done {
                step,
                attempt,
                stats,
                copies,
            } => {
                if self.machine.is_current(step, attempt) {
                    done.insert(rank, (stats, copies, blob.to_vec()));
                    out.extend(self.machine.on(
                        now,
                        CoordEvent::Done {
                            rank,
                            step,
                            attempt,
                        },
                    ));
                }
            }
            ToCoord::Installed { step, attempt } => out.extend(self.machine.on(
                now,
                CoordEvent::Installed {
                    rank,
                    step,
                    attempt,
                },
            )),
            ToCoord::Failed {
                step,
                attempt,
                reason,
            } => out.extend(self.machine.on(
                now,
                CoordEvent::Lost {
                    rank,
                    step,
                    attempt,
                    reason,
                },
            )),
        }
    }
}

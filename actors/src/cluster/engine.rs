//! The coordinator of a multi-process run, as a [`StepEngine`]: it drives the sans-IO
//! [`Coordinator`] machine (the step transaction, deadlines, probes, restores: the same rules the
//! actor formation follows) over the TCP link, holds the committed training state, reduces the
//! ranks' gradients in the canonical order and sends each rank the new values of its tensors.
//!
//! Failure handling: a rank whose process exited, or that was silent past the heartbeat bound,
//! is declared dead; its process is replaced ([`Processes::replace`]) and the open step is
//! replayed by every rank once the replacement has said hello. The replacement gets its stage
//! from the coordinator's committed copy; the other processes keep theirs and do not restart.

use super::protocol::{
    BlobReader, Member, TAG_TO_COORD, TAG_TO_WORKER, ToCoord, ToWorker, Tokens, head, read_grads,
    split, tensors_blob,
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use storage::dataset::Dataset;
use transport::link::{Link, Received};
use transport::tcp::TcpLink;

/// The processes behind the ranks, as the launcher (or a test) keeps them.
pub trait Processes: Send {
    /// Ranks whose process ended since the last call, each with how it ended.
    fn exited(&mut self) -> Vec<(usize, String)>;
    /// Starts the next incarnation of `rank` (its old process was declared dead; a frozen one
    /// is left to wake up and be told to exit).
    fn replace(&mut self, rank: usize) -> Result<()>;
    /// Processes started to replace dead ones so far.
    fn restarted(&self) -> u64;
}

/// What the coordinator measured about failures.
#[derive(Clone, Debug, Default)]
pub struct FailureLog {
    /// Per dead process: ms from its last sign of life to the declaration.
    pub detections_ms: Vec<u64>,
    /// Per dead process: ms from the declaration to the step reopened with its replacement.
    pub recovery_ms: Vec<u64>,
    /// Each declaration, in words.
    pub events: Vec<String>,
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
    procs: Box<dyn Processes>,
    members: Vec<Option<Member>>,
    needs_params: Vec<bool>,
    heartbeat_bound: Duration,
    epoch: Instant,
    data: Arc<Dataset>,
    seed: u64,
    batch: usize,
    seq: usize,
    replayed: BTreeSet<u64>,
    restarts: u64,
    recovering: Vec<Instant>,
    pub failures: FailureLog,
    pub stop: Arc<AtomicBool>,
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
        procs: Box<dyn Processes>,
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
            procs,
            heartbeat_bound: spec.heartbeat_bound,
            epoch: Instant::now(),
            data: spec.data,
            seed: spec.seed,
            batch: spec.batch,
            seq: spec.seq,
            replayed: BTreeSet::new(),
            restarts: 0,
            recovering: Vec::new(),
            failures: FailureLog::default(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Processes started to replace dead ones.
    pub fn procs_restarted(&self) -> u64 {
        self.procs.restarted()
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

    fn declare_dead(&mut self, rank: usize, why: String, out: &mut VecDeque<CoordCommand>) {
        let silent = self
            .link
            .silent_for(rank)
            .map_or(0, |d| d.as_millis() as u64);
        let line = format!("rank {rank} declared dead: {why} (silent {silent} ms)");
        tracing::warn!("{line}");
        self.failures.events.push(line);
        self.failures.detections_ms.push(silent);
        self.members[rank] = None;
        self.restarts += 1;
        self.recovering.push(Instant::now());
        if let Err(e) = self.procs.replace(rank) {
            tracing::error!("rank {rank}: cannot start a replacement: {e}");
        }
        let now = self.now_ms();
        out.extend(
            self.machine
                .on(now, CoordEvent::RankDown { rank, reason: why }),
        );
    }

    /// Process deaths and silences since the last look.
    fn watch(&mut self, out: &mut VecDeque<CoordCommand>) {
        for (rank, how) in self.procs.exited() {
            if self.members[rank].is_some() || !self.machine.is_down(rank) {
                self.declare_dead(rank, format!("its process {how}"), out);
            } else {
                // it died before saying hello: start another
                tracing::warn!("rank {rank}: a starting process {how}");
                if let Err(e) = self.procs.replace(rank) {
                    tracing::error!("rank {rank}: cannot start a replacement: {e}");
                }
            }
        }
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
                self.declare_dead(rank, why, out);
            }
        }
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
    fn restarts(&self) -> u64 {
        self.restarts
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
                        return tentative.ok_or_else(|| anyhow!("committed before reducing"));
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
                            self.declare_dead(rank, "did not answer a probe".into(), &mut out);
                        }
                    }
                    CoordCommand::GiveUp { step, reason } => {
                        bail!("step {step}: gave up: {reason}")
                    }
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let now = self.now_ms();
            let wait = timers
                .iter()
                .map(|t| t.0.saturating_sub(now))
                .min()
                .unwrap_or(20)
                .min(20);
            if let Some(received) = self.link.recv_timeout(Duration::from_millis(wait))? {
                match received {
                    Received::Refused(e) => tracing::warn!("refused a message: {e}"),
                    Received::Message(msg) if msg.tag == TAG_TO_COORD => {
                        self.on_message(msg.sender, &msg.payload, &mut done, &mut out)
                    }
                    Received::Message(msg) => {
                        tracing::warn!("message with unknown tag {:#x}", msg.tag)
                    }
                }
            }
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
                if self.members[rank]
                    .as_ref()
                    .is_some_and(|m| m.incarnation == inc)
                {
                    return;
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

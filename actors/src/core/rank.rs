//! One pipeline rank's decisions as a sans-IO machine around [`RankExecutor`]: which attempt a
//! message belongs to (stale ones dropped, early ones buffered), which stage operation runs next,
//! what is sent where, when the rank's gradients are collected and when it reports done and
//! installed. The thread engine and the GpuActor both drive it: the per-rank logic exists once.
//!
//! Payloads are the tensors themselves (activations and gradients as `Vec<f32>`, the stage's
//! gradient hand-over as `G`); the machine moves them, it never computes.

use super::executor::{Arrival, ExecCommand, ExecEvent, RankExecutor};
use super::ops::{StageOp, StageOpResult, ops_of, route_of};
use crate::schedule::{Instr, Schedule};
use kernels::model::stage::StageStats;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Per micro-batch forward stats of one rank: `(micro-batch, model stage, stats)`.
pub type RankStats = Vec<(usize, usize, StageStats)>;

/// Messages from a later attempt kept until it opens, at most this many.
const EARLY_LIMIT: usize = 4_096;

/// What the rank's shell observed.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum RankEvent<G> {
    /// The coordinator opened attempt `attempt` of `step` (the shell reset its stages first).
    Open {
        step: u64,
        attempt: u32,
    },
    /// An activation or gradient from a peer (or from this rank).
    Deliver {
        step: u64,
        attempt: u32,
        arrival: Arrival,
        data: Vec<f32>,
    },
    /// A stage copy finished the op `op_id` handed to it (a duplicate or stale answer, with
    /// another id, is dropped).
    OpDone {
        op_id: u64,
        copy: usize,
        step: u64,
        attempt: u32,
        mb: usize,
        result: StageOpResult,
    },
    /// A stage copy handed over its gradients of the attempt.
    Grads {
        copy: usize,
        step: u64,
        attempt: u32,
        grads: G,
    },
    /// The coordinator sends the new parameters.
    Install {
        step: u64,
        attempt: u32,
    },
    /// A stage copy installed them.
    StageInstalled {
        copy: usize,
        step: u64,
        attempt: u32,
    },
    Abort {
        step: u64,
        attempt: u32,
    },
    /// The attempt is overdue: say which copies this rank waits on.
    Probe {
        step: u64,
        attempt: u32,
    },
    /// A new coordinator took over: forget the open attempt and every buffered message (the
    /// new one numbers its attempts afresh).
    Reset,
}

/// What the shell must do.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum RankCommand<G> {
    /// An instruction starts (the shell's fault-injection point for the rank).
    Starting { step: u64, instr: Instr },
    /// Hand `op` to stage copy `copy`; answer with [`RankEvent::OpDone`] naming `op_id`.
    RunOp {
        op_id: u64,
        copy: usize,
        step: u64,
        attempt: u32,
        op: StageOp,
    },
    /// Send an activation or gradient to rank `to` (never this rank: local hand-offs stay inside).
    Send {
        to: usize,
        step: u64,
        attempt: u32,
        arrival: Arrival,
        data: Vec<f32>,
    },
    /// Ask stage copy `copy` for its gradients; answer with [`RankEvent::Grads`].
    TakeGrads {
        copy: usize,
        step: u64,
        attempt: u32,
    },
    /// The rank's program ran: report to the coordinator with its gradients and stats.
    Done {
        step: u64,
        attempt: u32,
        grads: Vec<(usize, G)>,
        stats: RankStats,
    },
    /// Install the new parameters in stage copy `copy`; answer with [`RankEvent::StageInstalled`].
    InstallStage {
        copy: usize,
        step: u64,
        attempt: u32,
    },
    /// Every copy installed: report to the coordinator.
    Installed { step: u64, attempt: u32 },
    /// Answer to a probe: the copies this rank waits on (the shell kills them).
    Busy {
        step: u64,
        attempt: u32,
        copies: Vec<usize>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Running,
    Collecting,
    Installing,
    Finished,
}

#[derive(Debug)]
struct Attempt<G> {
    step: u64,
    attempt: u32,
    ex: RankExecutor,
    stage: Stage,
    received: BTreeSet<Arrival>,
    inbox: BTreeMap<Arrival, Vec<f32>>,
    outbox: BTreeMap<Arrival, Vec<f32>>,
    queue: VecDeque<(usize, StageOp)>,
    instr: Option<Instr>,
    /// The op handed out and not yet answered, and the count of ops handed out.
    op_inflight: Option<u64>,
    ops: u64,
    waiting_on: BTreeSet<usize>,
    stats: RankStats,
    grads: Vec<(usize, G)>,
}

/// One pipeline rank.
#[derive(Debug)]
pub struct RankMachine<G> {
    pub rank: usize,
    schedule: Schedule,
    copies: Vec<usize>,
    cur: Option<Attempt<G>>,
    early: Vec<(u64, u32, Arrival, Vec<f32>)>,
    /// Messages dropped as stale or duplicate, over the machine's life.
    pub dropped: u64,
}

impl<G> RankMachine<G> {
    pub fn new(schedule: &Schedule, rank: usize) -> RankMachine<G> {
        RankMachine {
            rank,
            copies: schedule.stages_on(rank),
            schedule: schedule.clone(),
            cur: None,
            early: Vec::new(),
            dropped: 0,
        }
    }

    /// The open attempt, if any.
    pub fn current(&self) -> Option<(u64, u32)> {
        self.cur.as_ref().map(|c| (c.step, c.attempt))
    }

    /// What the rank waits for, in words.
    pub fn waiting_for(&self) -> Option<String> {
        self.cur.as_ref().and_then(|c| c.ex.waiting_for())
    }

    fn is_current(&self, step: u64, attempt: u32) -> bool {
        self.current() == Some((step, attempt))
    }

    /// Feeds one event; returns what to do, in order. An error is a broken invariant (a message
    /// the schedule cannot explain): the shell fails the rank, which heals by replay.
    pub fn on(&mut self, event: RankEvent<G>) -> Result<Vec<RankCommand<G>>, String> {
        let mut out = Vec::new();
        match event {
            RankEvent::Open { step, attempt } => {
                if self.current().is_some_and(|c| c >= (step, attempt)) {
                    self.dropped += 1;
                    return Ok(out);
                }
                self.cur = Some(Attempt {
                    step,
                    attempt,
                    ex: RankExecutor::new(&self.schedule, self.rank),
                    stage: Stage::Running,
                    received: BTreeSet::new(),
                    inbox: BTreeMap::new(),
                    outbox: BTreeMap::new(),
                    queue: VecDeque::new(),
                    instr: None,
                    op_inflight: None,
                    ops: 0,
                    waiting_on: BTreeSet::new(),
                    stats: Vec::new(),
                    grads: Vec::new(),
                });
                let early = std::mem::take(&mut self.early);
                let mut arrived = Vec::new();
                for (s, a, arrival, data) in early {
                    if (s, a) == (step, attempt) {
                        arrived.push((arrival, data));
                    } else if (s, a) > (step, attempt) {
                        self.early.push((s, a, arrival, data));
                    }
                }
                self.feed(ExecEvent::Start, &mut out)?;
                for (arrival, data) in arrived {
                    self.arrive(arrival, data, &mut out)?;
                }
            }
            RankEvent::Deliver {
                step,
                attempt,
                arrival,
                data,
            } => {
                if self.is_current(step, attempt) {
                    self.arrive(arrival, data, &mut out)?;
                } else if self.current().is_none_or(|c| (step, attempt) > c)
                    && self.early.len() < EARLY_LIMIT
                    && !self
                        .early
                        .iter()
                        .any(|e| (e.0, e.1, e.2) == (step, attempt, arrival))
                {
                    self.early.push((step, attempt, arrival, data));
                } else {
                    self.dropped += 1;
                }
            }
            RankEvent::OpDone {
                op_id,
                copy,
                step,
                attempt,
                mb,
                mut result,
            } => {
                if !self.is_current(step, attempt) {
                    self.dropped += 1;
                    return Ok(out);
                }
                let schedule = &self.schedule;
                let cur = self.cur.as_mut().expect("current attempt");
                if cur.stage != Stage::Running || cur.op_inflight != Some(op_id) {
                    self.dropped += 1;
                    return Ok(out);
                }
                cur.op_inflight = None;
                cur.waiting_on.remove(&copy);
                if let StageOpResult::Forward { stats, .. } = &mut result {
                    let model_stage = schedule.stages[copy].model_stage;
                    cur.stats.push((mb, model_stage, std::mem::take(stats)));
                }
                if let Some((a, x)) = route_of(schedule, copy, mb, &mut result) {
                    cur.outbox.insert(a, x);
                }
                if !cur.queue.is_empty() {
                    self.dispatch_next(&mut out);
                } else if let Some(instr) = cur.instr.take() {
                    self.feed(ExecEvent::Completed(instr), &mut out)?;
                }
            }
            RankEvent::Grads {
                copy,
                step,
                attempt,
                grads,
            } => {
                if !self.is_current(step, attempt) {
                    self.dropped += 1;
                    return Ok(out);
                }
                let cur = self.cur.as_mut().expect("current attempt");
                if cur.stage != Stage::Collecting || !cur.waiting_on.remove(&copy) {
                    self.dropped += 1;
                    return Ok(out);
                }
                cur.grads.push((copy, grads));
                if cur.waiting_on.is_empty() {
                    cur.stage = Stage::Installing;
                    out.push(RankCommand::Done {
                        step,
                        attempt,
                        grads: std::mem::take(&mut cur.grads),
                        stats: std::mem::take(&mut cur.stats),
                    });
                }
            }
            RankEvent::Install { step, attempt } => {
                if !self.is_current(step, attempt) {
                    self.dropped += 1;
                    return Ok(out);
                }
                let cur = self.cur.as_mut().expect("current attempt");
                if cur.stage != Stage::Installing || !cur.waiting_on.is_empty() {
                    self.dropped += 1;
                    return Ok(out);
                }
                for &copy in &self.copies {
                    cur.waiting_on.insert(copy);
                    out.push(RankCommand::InstallStage {
                        copy,
                        step,
                        attempt,
                    });
                }
            }
            RankEvent::StageInstalled {
                copy,
                step,
                attempt,
            } => {
                if !self.is_current(step, attempt) {
                    self.dropped += 1;
                    return Ok(out);
                }
                let cur = self.cur.as_mut().expect("current attempt");
                if cur.stage != Stage::Installing || !cur.waiting_on.remove(&copy) {
                    self.dropped += 1;
                    return Ok(out);
                }
                if cur.waiting_on.is_empty() {
                    cur.stage = Stage::Finished;
                    out.push(RankCommand::Installed { step, attempt });
                }
            }
            RankEvent::Abort { step, attempt } => {
                if self.is_current(step, attempt) {
                    self.cur = None;
                }
            }
            RankEvent::Reset => {
                self.cur = None;
                self.early.clear();
            }
            RankEvent::Probe { step, attempt } => {
                let copies = match self.cur.as_ref() {
                    Some(c) if (c.step, c.attempt) == (step, attempt) => {
                        c.waiting_on.iter().copied().collect()
                    }
                    _ => Vec::new(),
                };
                out.push(RankCommand::Busy {
                    step,
                    attempt,
                    copies,
                });
            }
        }
        Ok(out)
    }

    fn arrive(
        &mut self,
        arrival: Arrival,
        data: Vec<f32>,
        out: &mut Vec<RankCommand<G>>,
    ) -> Result<(), String> {
        let cur = self.cur.as_mut().expect("current attempt");
        if !cur.received.insert(arrival) {
            // a duplicate delivery: the first copy counts
            self.dropped += 1;
            return Ok(());
        }
        cur.inbox.insert(arrival, data);
        self.feed(ExecEvent::Arrived(arrival), out)
    }

    /// Feeds executor events until the rank waits for a stage or a peer.
    fn feed(&mut self, first: ExecEvent, out: &mut Vec<RankCommand<G>>) -> Result<(), String> {
        let mut events = VecDeque::from([first]);
        while let Some(ev) = events.pop_front() {
            let cur = self.cur.as_mut().expect("current attempt");
            let (step, attempt) = (cur.step, cur.attempt);
            for cmd in cur.ex.on(ev) {
                let cur = self.cur.as_mut().expect("current attempt");
                match cmd {
                    ExecCommand::Run(instr) => {
                        out.push(RankCommand::Starting { step, instr });
                        let ops = ops_of(&self.schedule, instr, &mut cur.inbox)?;
                        cur.queue = ops.into();
                        cur.instr = Some(instr);
                        self.dispatch_next(out);
                    }
                    ExecCommand::Send { to, arrival } => {
                        let data = cur
                            .outbox
                            .remove(&arrival)
                            .ok_or_else(|| format!("nothing to send for {arrival:?}"))?;
                        if to == self.rank {
                            cur.received.insert(arrival);
                            cur.inbox.insert(arrival, data);
                            events.push_back(ExecEvent::Arrived(arrival));
                        } else {
                            out.push(RankCommand::Send {
                                to,
                                step,
                                attempt,
                                arrival,
                                data,
                            });
                        }
                    }
                    ExecCommand::Finished => {
                        cur.stage = Stage::Collecting;
                        for &copy in &self.copies {
                            cur.waiting_on.insert(copy);
                            out.push(RankCommand::TakeGrads {
                                copy,
                                step,
                                attempt,
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn dispatch_next(&mut self, out: &mut Vec<RankCommand<G>>) {
        let cur = self.cur.as_mut().expect("current attempt");
        if let Some((copy, op)) = cur.queue.pop_front() {
            cur.waiting_on.insert(copy);
            cur.ops += 1;
            cur.op_inflight = Some(cur.ops);
            out.push(RankCommand::RunOp {
                op_id: cur.ops,
                copy,
                step: cur.step,
                attempt: cur.attempt,
                op,
            });
        }
    }
}

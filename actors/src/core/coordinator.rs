//! The coordinator's decisions as a sans-IO machine around [`StepTxn`]: opening a step only when
//! every rank is up, the step deadline and the probe protocol (timers as commands), which ranks to
//! kill, when the ranks must restore the committed state, and when to give up.
//!
//! It holds no tensors and no clock: the shell feeds [`CoordEvent`]s with the time they happened
//! and carries out the [`CoordCommand`]s (broadcast an open, reduce, install, arm a timer, kill a
//! rank). The same machine runs under the ractor formation and in the simulator.

use super::txn::{StepTxn, TxnCommand, TxnEvent};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, VecDeque};

/// How long an attempt may run before the ranks are probed, as data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutPolicy {
    /// A fixed step deadline (the inject plan's `step_timeout_ms`); `None` adapts.
    pub fixed_ms: Option<u64>,
    /// The deadline before any attempt has committed (the first step builds caches).
    pub first_ms: u64,
    /// Adaptive deadline: `factor ×` the slowest committed attempt, at least `floor_ms`.
    pub factor: u64,
    pub floor_ms: u64,
    /// How long a probed rank has to answer before it is killed.
    pub probe_grace_ms: u64,
    /// Attempts of one step before the run gives up.
    pub max_attempts: u32,
}

impl Default for TimeoutPolicy {
    fn default() -> TimeoutPolicy {
        TimeoutPolicy {
            fixed_ms: None,
            first_ms: 120_000,
            factor: 10,
            floor_ms: 5_000,
            probe_grace_ms: 1_000,
            max_attempts: 64,
        }
    }
}

/// The coordinator's timers; each names the attempt it guards, so a stale one does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CoordTimer {
    StepDeadline { step: u64, attempt: u32 },
    ProbeDeadline { step: u64, attempt: u32 },
}

/// What the coordinator's shell observed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordEvent {
    /// Run step `step` (its micro-batches are ready).
    Begin {
        step: u64,
    },
    /// A rank finished its program and handed over its gradients.
    Done {
        rank: usize,
        step: u64,
        attempt: u32,
    },
    /// The shell reduced the gradients and applied the optimizer (tentatively).
    Reduced {
        step: u64,
        attempt: u32,
    },
    /// A rank installed the new parameters.
    Installed {
        rank: usize,
        step: u64,
        attempt: u32,
    },
    /// A rank lost an actor (being restarted) or was declared dead.
    RankDown {
        rank: usize,
        reason: String,
    },
    /// A rank is complete again.
    RankUp {
        rank: usize,
    },
    /// A message of the attempt was lost (refused on arrival, or never sent): replay it, with
    /// every rank restoring the committed state.
    Lost {
        rank: usize,
        step: u64,
        attempt: u32,
        reason: String,
    },
    /// Every rank went down at once (their supervisor restarts the subtree).
    AllDown {
        reason: String,
    },
    /// A probed rank answered (it killed whatever it waited on).
    ProbeAck {
        rank: usize,
        step: u64,
        attempt: u32,
    },
    Timer(CoordTimer),
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordCommand {
    /// Send attempt `attempt` of `step` to every rank; `restore`: reset the stages to the last
    /// committed parameters first.
    Open {
        step: u64,
        attempt: u32,
        restore: bool,
    },
    /// Every rank is done: reduce the gradients and apply the optimizer.
    Reduce { step: u64, attempt: u32 },
    /// Send the tentatively updated parameters to every rank.
    Install { step: u64, attempt: u32 },
    /// Everyone installed: the step is committed.
    Commit { step: u64, attempts: u32 },
    /// Tell every rank to drop the attempt.
    Abort {
        step: u64,
        attempt: u32,
        reason: String,
    },
    /// The attempt is overdue: ask every rank what it waits on (it kills that and answers).
    Probe { step: u64, attempt: u32 },
    /// A rank did not answer the probe: stop it (its supervisor restarts it).
    Kill { rank: usize },
    /// Feed [`CoordEvent::Timer`] back at `at_ms`.
    SetTimer { at_ms: u64, timer: CoordTimer },
    /// Too many attempts of one step: stop the run.
    GiveUp { step: u64, reason: String },
}

/// The coordinator of one formation of `ranks` pipeline ranks.
#[derive(Clone, Debug)]
pub struct Coordinator {
    policy: TimeoutPolicy,
    ranks: usize,
    txn: StepTxn,
    down: BTreeSet<usize>,
    pending_open: Option<(u64, u32)>,
    restore_next: bool,
    attempt_started_ms: u64,
    slowest_ms: Option<u64>,
    probe_acks: BTreeSet<usize>,
    /// Ranks reported down over the run (each one a restart).
    pub restarts: u64,
}

impl Coordinator {
    /// A coordinator whose ranks are all still starting (each reports [`CoordEvent::RankUp`]);
    /// `committed` steps are already done (a resumed run opens `committed + 1` first).
    pub fn new(ranks: usize, committed: u64, policy: TimeoutPolicy) -> Coordinator {
        Coordinator {
            policy,
            ranks,
            txn: StepTxn::new(ranks, policy.max_attempts).after(committed),
            down: (0..ranks).collect(),
            pending_open: None,
            restore_next: false,
            attempt_started_ms: 0,
            slowest_ms: None,
            probe_acks: BTreeSet::new(),
            restarts: 0,
        }
    }

    pub fn txn(&self) -> &StepTxn {
        &self.txn
    }

    pub fn is_down(&self, rank: usize) -> bool {
        self.down.contains(&rank)
    }

    /// True when (step, attempt) is the open attempt.
    pub fn is_current(&self, step: u64, attempt: u32) -> bool {
        self.txn.is_open() && self.txn.step() == step && self.txn.attempt() == attempt
    }

    /// The next open restores the committed state on every rank (a coordinator that replaces a
    /// dead one cannot know what the ranks installed meanwhile).
    pub fn restore_on_next_open(&mut self) {
        self.restore_next = true;
    }

    /// The deadline of the next attempt, in milliseconds.
    pub fn step_timeout_ms(&self) -> u64 {
        let p = &self.policy;
        p.fixed_ms.unwrap_or(match self.slowest_ms {
            None => p.first_ms,
            Some(s) => s.saturating_mul(p.factor).max(p.floor_ms),
        })
    }

    /// Feeds one event at `now_ms`; returns what to do, in order.
    pub fn on(&mut self, now_ms: u64, event: CoordEvent) -> Vec<CoordCommand> {
        let mut out = Vec::new();
        let txn_cmds = match event {
            CoordEvent::Begin { step } => self.txn.on(TxnEvent::Begin { step }),
            CoordEvent::Done {
                rank,
                step,
                attempt,
            } => self.txn.on(TxnEvent::Done {
                participant: rank,
                step,
                attempt,
            }),
            CoordEvent::Reduced { step, attempt } => {
                self.txn.on(TxnEvent::Reduced { step, attempt })
            }
            CoordEvent::Installed {
                rank,
                step,
                attempt,
            } => self.txn.on(TxnEvent::Installed {
                participant: rank,
                step,
                attempt,
            }),
            CoordEvent::RankDown { rank, reason } => {
                self.restarts += 1;
                self.restore_next = true;
                let newly = self.down.insert(rank);
                self.fail_open(newly, reason)
            }
            CoordEvent::Lost {
                rank,
                step,
                attempt,
                reason,
            } => {
                if self.is_current(step, attempt) {
                    self.txn.on(TxnEvent::Failed {
                        step,
                        attempt,
                        reason: format!("rank {rank}: {reason}"),
                    })
                } else {
                    vec![]
                }
            }
            CoordEvent::AllDown { reason } => {
                self.restarts += 1;
                self.restore_next = true;
                self.down = (0..self.ranks).collect();
                self.fail_open(true, reason)
            }
            CoordEvent::RankUp { rank } => {
                self.down.remove(&rank);
                if self.down.is_empty()
                    && let Some((step, attempt)) = self.pending_open.take()
                    && self.is_current(step, attempt)
                {
                    self.open_now(now_ms, step, attempt, &mut out);
                }
                vec![]
            }
            CoordEvent::ProbeAck {
                rank,
                step,
                attempt,
            } => {
                if self.is_current(step, attempt) {
                    self.probe_acks.insert(rank);
                }
                vec![]
            }
            CoordEvent::Timer(CoordTimer::StepDeadline { step, attempt }) => {
                if self.is_current(step, attempt) && self.pending_open.is_none() {
                    self.probe_acks.clear();
                    out.push(CoordCommand::Probe { step, attempt });
                    out.push(CoordCommand::SetTimer {
                        at_ms: now_ms + self.policy.probe_grace_ms,
                        timer: CoordTimer::ProbeDeadline { step, attempt },
                    });
                }
                vec![]
            }
            CoordEvent::Timer(CoordTimer::ProbeDeadline { step, attempt }) => {
                if !self.is_current(step, attempt) {
                    vec![]
                } else {
                    for r in 0..self.ranks {
                        if !self.probe_acks.contains(&r) && self.down.insert(r) {
                            out.push(CoordCommand::Kill { rank: r });
                        }
                    }
                    self.txn.on(TxnEvent::TimedOut { step, attempt })
                }
            }
        };
        self.exec(now_ms, txn_cmds, &mut out);
        out
    }

    fn fail_open(&mut self, newly: bool, reason: String) -> Vec<TxnCommand> {
        if newly && self.txn.is_open() {
            let (step, attempt) = (self.txn.step(), self.txn.attempt());
            self.txn.on(TxnEvent::Failed {
                step,
                attempt,
                reason,
            })
        } else {
            vec![]
        }
    }

    fn open_now(&mut self, now_ms: u64, step: u64, attempt: u32, out: &mut Vec<CoordCommand>) {
        let restore = attempt > 0 || std::mem::take(&mut self.restore_next);
        self.attempt_started_ms = now_ms;
        out.push(CoordCommand::Open {
            step,
            attempt,
            restore,
        });
        out.push(CoordCommand::SetTimer {
            at_ms: now_ms + self.step_timeout_ms(),
            timer: CoordTimer::StepDeadline { step, attempt },
        });
    }

    fn exec(&mut self, now_ms: u64, first: Vec<TxnCommand>, out: &mut Vec<CoordCommand>) {
        let mut cmds: VecDeque<TxnCommand> = first.into();
        while let Some(cmd) = cmds.pop_front() {
            match cmd {
                TxnCommand::Open { step, attempt } | TxnCommand::Replay { step, attempt } => {
                    if self.down.is_empty() {
                        self.open_now(now_ms, step, attempt, out);
                    } else {
                        self.pending_open = Some((step, attempt));
                    }
                }
                TxnCommand::Reduce { step, attempt } => {
                    out.push(CoordCommand::Reduce { step, attempt })
                }
                TxnCommand::Install { step, attempt } => {
                    out.push(CoordCommand::Install { step, attempt })
                }
                TxnCommand::Commit { step, attempts } => {
                    let took = now_ms.saturating_sub(self.attempt_started_ms);
                    self.slowest_ms = Some(self.slowest_ms.map_or(took, |s| s.max(took)));
                    out.push(CoordCommand::Commit { step, attempts });
                }
                TxnCommand::Abort {
                    step,
                    attempt,
                    reason,
                } => {
                    self.probe_acks.clear();
                    out.push(CoordCommand::Abort {
                        step,
                        attempt,
                        reason,
                    });
                }
                TxnCommand::GiveUp { step, reason } => {
                    self.pending_open = None;
                    out.push(CoordCommand::GiveUp { step, reason });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up_all(c: &mut Coordinator, now: u64) -> Vec<CoordCommand> {
        let mut out = Vec::new();
        for r in 0..c.ranks {
            out.extend(c.on(now, CoordEvent::RankUp { rank: r }));
        }
        out
    }

    fn finish(c: &mut Coordinator, now: u64, step: u64, attempt: u32) -> Vec<CoordCommand> {
        let mut out = Vec::new();
        for r in 0..c.ranks {
            out.extend(c.on(
                now,
                CoordEvent::Done {
                    rank: r,
                    step,
                    attempt,
                },
            ));
        }
        out.extend(c.on(now, CoordEvent::Reduced { step, attempt }));
        for r in (0..c.ranks).rev() {
            out.extend(c.on(
                now,
                CoordEvent::Installed {
                    rank: r,
                    step,
                    attempt,
                },
            ));
        }
        out
    }

    #[test]
    fn waits_for_every_rank_then_opens_with_a_deadline() {
        let mut c = Coordinator::new(2, 0, TimeoutPolicy::default());
        assert!(
            c.on(0, CoordEvent::Begin { step: 1 }).is_empty(),
            "ranks still starting"
        );
        assert!(c.on(5, CoordEvent::RankUp { rank: 1 }).is_empty());
        let cmds = c.on(7, CoordEvent::RankUp { rank: 0 });
        assert_eq!(
            cmds,
            vec![
                CoordCommand::Open {
                    step: 1,
                    attempt: 0,
                    restore: false
                },
                CoordCommand::SetTimer {
                    at_ms: 7 + 120_000,
                    timer: CoordTimer::StepDeadline {
                        step: 1,
                        attempt: 0
                    }
                }
            ]
        );
        let cmds = finish(&mut c, 107, 1, 0);
        assert_eq!(
            cmds,
            vec![
                CoordCommand::Reduce {
                    step: 1,
                    attempt: 0
                },
                CoordCommand::Install {
                    step: 1,
                    attempt: 0
                },
                CoordCommand::Commit {
                    step: 1,
                    attempts: 1
                }
            ]
        );
        // the adaptive deadline: 10 × the slowest attempt (100 ms), at least 5 s
        assert_eq!(c.step_timeout_ms(), 5_000);
        // a stale deadline of the committed attempt does nothing
        let stale = CoordTimer::StepDeadline {
            step: 1,
            attempt: 0,
        };
        assert!(c.on(200_000, CoordEvent::Timer(stale)).is_empty());
    }

    #[test]
    fn a_rank_down_aborts_waits_for_it_and_replays_with_restore() {
        let mut c = Coordinator::new(2, 4, TimeoutPolicy::default());
        up_all(&mut c, 0);
        let cmds = c.on(1, CoordEvent::Begin { step: 5 });
        assert!(matches!(
            cmds[0],
            CoordCommand::Open {
                step: 5,
                attempt: 0,
                restore: false
            }
        ));
        c.on(
            2,
            CoordEvent::Done {
                rank: 0,
                step: 5,
                attempt: 0,
            },
        );
        let cmds = c.on(
            3,
            CoordEvent::RankDown {
                rank: 1,
                reason: "stage panicked".into(),
            },
        );
        assert_eq!(
            cmds,
            vec![CoordCommand::Abort {
                step: 5,
                attempt: 0,
                reason: "stage panicked".into()
            }]
        );
        // the same rank reported down twice (its supervisor and a peer) aborts once
        let again = CoordEvent::RankDown {
            rank: 1,
            reason: "again".into(),
        };
        assert!(c.on(4, again).is_empty());
        // a late done of attempt 0 counts for nothing
        assert!(
            c.on(
                5,
                CoordEvent::Done {
                    rank: 1,
                    step: 5,
                    attempt: 0
                }
            )
            .is_empty()
        );
        let cmds = c.on(9, CoordEvent::RankUp { rank: 1 });
        assert_eq!(
            cmds[0],
            CoordCommand::Open {
                step: 5,
                attempt: 1,
                restore: true
            }
        );
        let cmds = finish(&mut c, 20, 5, 1);
        assert_eq!(
            cmds.last(),
            Some(&CoordCommand::Commit {
                step: 5,
                attempts: 2
            })
        );
        assert_eq!(c.restarts, 2);
        assert_eq!(c.txn().replayed_steps, 1);
        // a restart between steps makes the next open restore too
        c.on(
            30,
            CoordEvent::RankDown {
                rank: 0,
                reason: "x".into(),
            },
        );
        c.on(31, CoordEvent::RankUp { rank: 0 });
        let cmds = c.on(32, CoordEvent::Begin { step: 6 });
        assert!(matches!(
            cmds[0],
            CoordCommand::Open {
                step: 6,
                attempt: 0,
                restore: true
            }
        ));
    }

    #[test]
    fn an_overdue_attempt_is_probed_and_silent_ranks_are_killed() {
        let policy = TimeoutPolicy {
            fixed_ms: Some(1_500),
            ..TimeoutPolicy::default()
        };
        let mut c = Coordinator::new(3, 0, policy);
        up_all(&mut c, 0);
        c.on(10, CoordEvent::Begin { step: 1 });
        let deadline = CoordTimer::StepDeadline {
            step: 1,
            attempt: 0,
        };
        let cmds = c.on(1_510, CoordEvent::Timer(deadline));
        assert_eq!(
            cmds,
            vec![
                CoordCommand::Probe {
                    step: 1,
                    attempt: 0
                },
                CoordCommand::SetTimer {
                    at_ms: 2_510,
                    timer: CoordTimer::ProbeDeadline {
                        step: 1,
                        attempt: 0
                    }
                }
            ]
        );
        c.on(
            1_600,
            CoordEvent::ProbeAck {
                rank: 0,
                step: 1,
                attempt: 0,
            },
        );
        // rank 1 answered the probe by killing its hung stage: it reports itself down
        c.on(
            1_601,
            CoordEvent::RankDown {
                rank: 1,
                reason: "hung stage killed".into(),
            },
        );
        // that aborted attempt 0, so its probe deadline is stale: nothing is killed
        let probe = CoordTimer::ProbeDeadline {
            step: 1,
            attempt: 0,
        };
        assert!(c.on(2_510, CoordEvent::Timer(probe)).is_empty());
        c.on(2_600, CoordEvent::RankUp { rank: 1 });
        // attempt 1: rank 2 never answers the probe and is killed
        c.on(
            4_200,
            CoordEvent::Timer(CoordTimer::StepDeadline {
                step: 1,
                attempt: 1,
            }),
        );
        c.on(
            4_300,
            CoordEvent::ProbeAck {
                rank: 0,
                step: 1,
                attempt: 1,
            },
        );
        c.on(
            4_300,
            CoordEvent::ProbeAck {
                rank: 1,
                step: 1,
                attempt: 1,
            },
        );
        let probe = CoordTimer::ProbeDeadline {
            step: 1,
            attempt: 1,
        };
        let cmds = c.on(5_200, CoordEvent::Timer(probe));
        assert_eq!(cmds[0], CoordCommand::Kill { rank: 2 });
        assert!(matches!(
            cmds[1],
            CoordCommand::Abort {
                step: 1,
                attempt: 1,
                ..
            }
        ));
        assert_eq!(cmds.len(), 2, "waits for the killed rank before replaying");
        assert!(c.is_down(2));
        // its supervisor reports it down (no second abort) and then up: attempt 2 opens
        assert!(
            c.on(
                5_201,
                CoordEvent::RankDown {
                    rank: 2,
                    reason: "killed".into()
                }
            )
            .is_empty()
        );
        let cmds = c.on(5_300, CoordEvent::RankUp { rank: 2 });
        assert!(matches!(
            cmds[0],
            CoordCommand::Open {
                step: 1,
                attempt: 2,
                restore: true
            }
        ));
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let policy = TimeoutPolicy {
            max_attempts: 2,
            ..TimeoutPolicy::default()
        };
        let mut c = Coordinator::new(1, 0, policy);
        up_all(&mut c, 0);
        c.on(0, CoordEvent::Begin { step: 1 });
        c.on(
            1,
            CoordEvent::RankDown {
                rank: 0,
                reason: "a".into(),
            },
        );
        c.on(2, CoordEvent::RankUp { rank: 0 });
        let cmds = c.on(
            3,
            CoordEvent::RankDown {
                rank: 0,
                reason: "b".into(),
            },
        );
        assert!(matches!(
            cmds.last(),
            Some(CoordCommand::GiveUp { step: 1, .. })
        ));
        // nothing opens afterwards
        assert!(c.on(4, CoordEvent::RankUp { rank: 0 }).is_empty());
    }
}

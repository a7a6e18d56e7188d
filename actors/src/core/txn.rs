//! The coordinator's step transaction as a sans-IO state machine: open step t, wait for every
//! participant's "done", reduce, install, commit; on a failure abort and replay step t.
//!
//! A step runs as attempts `0, 1, 2, …`. Every event names the attempt it belongs to, and events
//! of any other attempt (a late "done" from before a failure, a duplicate) are ignored, so a
//! replay is idempotent: it runs the same micro-batches from the same committed state.

use std::collections::BTreeSet;

/// What the coordinator's shell observed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TxnEvent {
    /// Start step `step` (the previous one is committed).
    Begin { step: u64 },
    /// A participant finished its part of the schedule and handed over its gradients.
    Done {
        participant: usize,
        step: u64,
        attempt: u32,
    },
    /// The shell reduced the gradients and applied the optimizer (tentatively).
    Reduced { step: u64, attempt: u32 },
    /// A participant installed the new parameters.
    Installed {
        participant: usize,
        step: u64,
        attempt: u32,
    },
    /// Something failed during the attempt (an actor died, a message was refused).
    Failed {
        step: u64,
        attempt: u32,
        reason: String,
    },
    /// The attempt took longer than the step timeout.
    TimedOut { step: u64, attempt: u32 },
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TxnCommand {
    /// Send the step's work to every participant (attempt > 0 is a replay: restore first).
    Open { step: u64, attempt: u32 },
    /// Every participant is done: reduce the gradients and apply the optimizer.
    Reduce { step: u64, attempt: u32 },
    /// Send the tentatively updated parameters to every participant.
    Install { step: u64, attempt: u32 },
    /// Everyone installed: the step is durable; snapshot it and report it.
    Commit { step: u64, attempts: u32 },
    /// Drop everything of this attempt (tentative optimizer state included).
    Abort {
        step: u64,
        attempt: u32,
        reason: String,
    },
    /// Run the step again from its start with the same micro-batches, as `attempt`.
    Replay { step: u64, attempt: u32 },
    /// Too many attempts: stop the run.
    GiveUp { step: u64, reason: String },
}

/// Where the open step is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No step open (before the first, or after a commit).
    Idle,
    Running {
        done: BTreeSet<usize>,
    },
    Reducing,
    Installing {
        installed: BTreeSet<usize>,
    },
    /// The run was given up.
    Failed,
}

/// One step at a time, over a fixed set of participants `0..participants`.
#[derive(Clone, Debug)]
pub struct StepTxn {
    participants: usize,
    max_attempts: u32,
    step: u64,
    attempt: u32,
    phase: Phase,
    /// Replays so far, over the whole run.
    pub replays: u64,
    /// Steps that needed at least one replay.
    pub replayed_steps: u64,
    last_committed: u64,
}

impl StepTxn {
    /// `max_attempts` bounds the attempts of one step (≥ 1).
    pub fn new(participants: usize, max_attempts: u32) -> StepTxn {
        StepTxn {
            participants,
            max_attempts: max_attempts.max(1),
            step: 0,
            attempt: 0,
            phase: Phase::Idle,
            replays: 0,
            replayed_steps: 0,
            last_committed: 0,
        }
    }

    /// The same machine for a run that already committed steps `1..=committed` (a resumed run):
    /// the next step to open is `committed + 1`.
    pub fn after(mut self, committed: u64) -> StepTxn {
        self.last_committed = committed;
        self
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }

    /// True while the step is open (running, reducing or installing).
    pub fn is_open(&self) -> bool {
        matches!(
            self.phase,
            Phase::Running { .. } | Phase::Reducing | Phase::Installing { .. }
        )
    }

    fn current(&self, step: u64, attempt: u32) -> bool {
        self.is_open() && step == self.step && attempt == self.attempt
    }

    /// Feeds one event; returns what to do, in order.
    pub fn on(&mut self, event: TxnEvent) -> Vec<TxnCommand> {
        match event {
            TxnEvent::Begin { step } => {
                assert!(!self.is_open(), "step {} is still open", self.step);
                assert_eq!(
                    step,
                    self.last_committed + 1,
                    "steps open in order after the last commit"
                );
                self.step = step;
                self.attempt = 0;
                self.phase = Phase::Running {
                    done: BTreeSet::new(),
                };
                vec![TxnCommand::Open { step, attempt: 0 }]
            }
            TxnEvent::Done {
                participant,
                step,
                attempt,
            } => {
                if !self.current(step, attempt) || participant >= self.participants {
                    return vec![];
                }
                let Phase::Running { done } = &mut self.phase else {
                    return vec![];
                };
                done.insert(participant);
                if done.len() == self.participants {
                    self.phase = Phase::Reducing;
                    vec![TxnCommand::Reduce { step, attempt }]
                } else {
                    vec![]
                }
            }
            TxnEvent::Reduced { step, attempt } => {
                if !self.current(step, attempt) || self.phase != Phase::Reducing {
                    return vec![];
                }
                self.phase = Phase::Installing {
                    installed: BTreeSet::new(),
                };
                vec![TxnCommand::Install { step, attempt }]
            }
            TxnEvent::Installed {
                participant,
                step,
                attempt,
            } => {
                if !self.current(step, attempt) || participant >= self.participants {
                    return vec![];
                }
                let Phase::Installing { installed } = &mut self.phase else {
                    return vec![];
                };
                installed.insert(participant);
                if installed.len() < self.participants {
                    return vec![];
                }
                self.phase = Phase::Idle;
                self.last_committed = step;
                if attempt > 0 {
                    self.replayed_steps += 1;
                }
                vec![TxnCommand::Commit {
                    step,
                    attempts: attempt + 1,
                }]
            }
            TxnEvent::Failed {
                step,
                attempt,
                reason,
            } => self.abort(step, attempt, reason),
            TxnEvent::TimedOut { step, attempt } => self.abort(
                step,
                attempt,
                format!("step {step} attempt {attempt} timed out"),
            ),
        }
    }

    fn abort(&mut self, step: u64, attempt: u32, reason: String) -> Vec<TxnCommand> {
        if !self.current(step, attempt) {
            return vec![];
        }
        let mut out = vec![TxnCommand::Abort {
            step,
            attempt,
            reason: reason.clone(),
        }];
        if attempt + 1 >= self.max_attempts {
            self.phase = Phase::Failed;
            out.push(TxnCommand::GiveUp {
                step,
                reason: format!("step {step} failed {} times; last: {reason}", attempt + 1),
            });
            return out;
        }
        self.attempt = attempt + 1;
        self.replays += 1;
        self.phase = Phase::Running {
            done: BTreeSet::new(),
        };
        out.push(TxnCommand::Replay {
            step,
            attempt: self.attempt,
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(p: usize, step: u64, attempt: u32) -> TxnEvent {
        TxnEvent::Done {
            participant: p,
            step,
            attempt,
        }
    }

    fn installed(p: usize, step: u64, attempt: u32) -> TxnEvent {
        TxnEvent::Installed {
            participant: p,
            step,
            attempt,
        }
    }

    #[test]
    fn a_clean_step_commits() {
        let mut t = StepTxn::new(2, 3);
        assert_eq!(
            t.on(TxnEvent::Begin { step: 1 }),
            vec![TxnCommand::Open {
                step: 1,
                attempt: 0
            }]
        );
        assert!(t.on(done(0, 1, 0)).is_empty());
        assert!(
            t.on(done(0, 1, 0)).is_empty(),
            "a duplicate done is ignored"
        );
        assert_eq!(
            t.on(done(1, 1, 0)),
            vec![TxnCommand::Reduce {
                step: 1,
                attempt: 0
            }]
        );
        assert_eq!(
            t.on(TxnEvent::Reduced {
                step: 1,
                attempt: 0
            }),
            vec![TxnCommand::Install {
                step: 1,
                attempt: 0
            }]
        );
        assert!(t.on(installed(1, 1, 0)).is_empty());
        assert_eq!(
            t.on(installed(0, 1, 0)),
            vec![TxnCommand::Commit {
                step: 1,
                attempts: 1
            }]
        );
        assert_eq!(t.last_committed(), 1);
        assert!(!t.is_open());
        assert_eq!(t.replays, 0);
    }

    #[test]
    fn a_failure_aborts_and_replays_and_late_events_are_ignored() {
        let mut t = StepTxn::new(2, 5);
        t.on(TxnEvent::Begin { step: 1 });
        t.on(done(0, 1, 0));
        let c = t.on(TxnEvent::Failed {
            step: 1,
            attempt: 0,
            reason: "stage 1 panicked".into(),
        });
        assert_eq!(
            c,
            vec![
                TxnCommand::Abort {
                    step: 1,
                    attempt: 0,
                    reason: "stage 1 panicked".into()
                },
                TxnCommand::Replay {
                    step: 1,
                    attempt: 1
                }
            ]
        );
        // the same failure reported twice (by supervisor and by peer) aborts once
        assert!(
            t.on(TxnEvent::Failed {
                step: 1,
                attempt: 0,
                reason: "again".into()
            })
            .is_empty()
        );
        // a late done of attempt 0 does not count for attempt 1
        assert!(t.on(done(1, 1, 0)).is_empty());
        assert!(t.on(done(1, 1, 1)).is_empty());
        assert_eq!(
            t.on(done(0, 1, 1)),
            vec![TxnCommand::Reduce {
                step: 1,
                attempt: 1
            }]
        );
        t.on(TxnEvent::Reduced {
            step: 1,
            attempt: 1,
        });
        // a failure while installing (the optimizer phase) also replays
        let c = t.on(TxnEvent::TimedOut {
            step: 1,
            attempt: 1,
        });
        assert_eq!(
            c[1],
            TxnCommand::Replay {
                step: 1,
                attempt: 2
            }
        );
        t.on(done(0, 1, 2));
        t.on(done(1, 1, 2));
        t.on(TxnEvent::Reduced {
            step: 1,
            attempt: 2,
        });
        t.on(installed(0, 1, 2));
        assert_eq!(
            t.on(installed(1, 1, 2)),
            vec![TxnCommand::Commit {
                step: 1,
                attempts: 3
            }]
        );
        assert_eq!((t.replays, t.replayed_steps), (2, 1));
        // events of a committed step change nothing
        assert!(
            t.on(TxnEvent::Failed {
                step: 1,
                attempt: 2,
                reason: "late".into()
            })
            .is_empty()
        );
        assert_eq!(
            t.on(TxnEvent::Begin { step: 2 }),
            vec![TxnCommand::Open {
                step: 2,
                attempt: 0
            }]
        );
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut t = StepTxn::new(1, 2);
        t.on(TxnEvent::Begin { step: 1 });
        t.on(TxnEvent::TimedOut {
            step: 1,
            attempt: 0,
        });
        let c = t.on(TxnEvent::TimedOut {
            step: 1,
            attempt: 1,
        });
        assert!(matches!(c.last(), Some(TxnCommand::GiveUp { step: 1, .. })));
        assert_eq!(t.phase(), &Phase::Failed);
    }
}

//! Supervision as a sans-IO machine: the restart policy as data (at most `max_restarts` restarts
//! of one child inside a sliding window, each after an exponential backoff), and one generic
//! [`Supervisor`] that every supervising actor drives.
//!
//! A child failure is answered with a backoff timer and, when it fires, a restart. A child past
//! its budget is this supervisor's own failure: it restarts its whole subtree (every child, fresh,
//! from the last committed step), charged to its own budget. Past that budget a supervisor
//! escalates to its parent, which does the same one level up; only the root's budget ends a run,
//! with a message naming the actor that failed and how often. A committed step is progress and
//! clears every window: the budgets stop crash loops (the same step failing again and again),
//! not a long run that heals one fault per step.
//!
//! Time is an input (milliseconds on any monotonic clock the shell chooses) and backoff is a
//! timer command, so the machine is deterministic and the simulator drives it in virtual time.

use std::collections::{BTreeMap, VecDeque};

/// Limits of one supervisor's restarts of one child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed inside `window_ms` (the next one escalates).
    pub max_restarts: u32,
    pub window_ms: u64,
    /// Backoff before the k-th restart inside the window: `base · 2^(k−1)`, at most `max`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 16,
            window_ms: 60_000,
            backoff_base_ms: 5,
            backoff_max_ms: 1_000,
        }
    }
}

/// The decision for one failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart after waiting `after_ms`; `restart` counts this child's restarts in the window.
    Restart { after_ms: u64, restart: u32 },
    /// Too many restarts in the window: give up on this child and fail upward.
    Escalate { restarts_in_window: u32 },
}

/// Per-child bookkeeping for a [`RestartPolicy`].
#[derive(Clone, Debug)]
pub struct RestartTracker {
    pub policy: RestartPolicy,
    recent: VecDeque<u64>,
    /// Restarts granted over the whole life of the child.
    pub total: u64,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> RestartTracker {
        RestartTracker {
            policy,
            recent: VecDeque::new(),
            total: 0,
        }
    }

    /// Failures inside the window right now.
    pub fn recent(&self) -> usize {
        self.recent.len()
    }

    /// The run made progress (a step committed): earlier failures no longer count.
    pub fn on_progress(&mut self) {
        self.recent.clear();
    }

    /// A child failed at `now_ms`: restart it (after a backoff) or escalate.
    pub fn on_failure(&mut self, now_ms: u64) -> RestartDecision {
        while let Some(&t) = self.recent.front() {
            if now_ms.saturating_sub(t) >= self.policy.window_ms {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        let k = self.recent.len() as u32;
        if k >= self.policy.max_restarts {
            return RestartDecision::Escalate {
                restarts_in_window: k,
            };
        }
        self.recent.push_back(now_ms);
        self.total += 1;
        let shift = k.min(20);
        let after_ms = self
            .policy
            .backoff_base_ms
            .saturating_mul(1u64 << shift)
            .min(self.policy.backoff_max_ms);
        RestartDecision::Restart {
            after_ms,
            restart: k + 1,
        }
    }
}

/// What a supervising shell observed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SupEvent<K> {
    /// A child failed; `what` names it and says how ("stage copy s1 on rank 0 panicked: …").
    Failed { child: K, what: String },
    /// A timer this machine asked for fired.
    Timer { token: u64 },
    /// A step committed.
    Progress,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SupCommand<K> {
    /// Call back with [`SupEvent::Timer`] after `after_ms` (the backoff).
    StartTimer { after_ms: u64, token: u64 },
    /// Start a fresh `child` (its `restart`-th restart inside the window).
    Restart { child: K, restart: u32 },
    /// Stop every child and start all of them fresh; they restore the last committed step.
    RestartAll { reason: String },
    /// This supervisor is past its own budget: fail upward with this reason.
    Escalate { reason: String },
    /// The root is past its budget: end the run.
    GiveUp { reason: String },
}

#[derive(Clone, Debug)]
enum Pending<K> {
    Child(K, u32),
    All(String),
}

/// The restart decisions of one supervising actor over its children `K`.
#[derive(Clone, Debug)]
pub struct Supervisor<K> {
    name: String,
    root: bool,
    policy: RestartPolicy,
    children: BTreeMap<K, RestartTracker>,
    own: RestartTracker,
    pending: BTreeMap<u64, Pending<K>>,
    next_token: u64,
    /// Child restarts and subtree restarts granted so far.
    pub restarts: u64,
    pub subtree_restarts: u64,
}

impl<K: Ord + Clone + std::fmt::Debug> Supervisor<K> {
    /// `name` says who supervises ("the node supervisor"); a `root` gives up instead of escalating.
    pub fn new(name: impl Into<String>, policy: RestartPolicy, root: bool) -> Supervisor<K> {
        Supervisor {
            name: name.into(),
            root,
            policy,
            children: BTreeMap::new(),
            own: RestartTracker::new(policy),
            pending: BTreeMap::new(),
            next_token: 0,
            restarts: 0,
            subtree_restarts: 0,
        }
    }

    /// True while a restart waits for its backoff timer.
    pub fn is_waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    fn timer(&mut self, after_ms: u64, p: Pending<K>) -> SupCommand<K> {
        self.next_token += 1;
        self.pending.insert(self.next_token, p);
        SupCommand::StartTimer {
            after_ms,
            token: self.next_token,
        }
    }

    /// Feeds one event at `now_ms`; returns what to do, in order.
    pub fn on(&mut self, now_ms: u64, event: SupEvent<K>) -> Vec<SupCommand<K>> {
        match event {
            SupEvent::Progress => {
                self.own.on_progress();
                self.children.values_mut().for_each(|t| t.on_progress());
                vec![]
            }
            SupEvent::Timer { token } => match self.pending.remove(&token) {
                Some(Pending::Child(child, restart)) => {
                    vec![SupCommand::Restart { child, restart }]
                }
                Some(Pending::All(reason)) => {
                    // a fresh subtree: children start with clean budgets, earlier timers are void
                    self.children.clear();
                    self.pending.clear();
                    vec![SupCommand::RestartAll { reason }]
                }
                None => vec![],
            },
            SupEvent::Failed { child, what } => {
                if self.pending.values().any(|p| matches!(p, Pending::All(_))) {
                    // the whole subtree is about to restart anyway
                    return vec![];
                }
                let policy = self.policy;
                let tracker = self
                    .children
                    .entry(child.clone())
                    .or_insert_with(|| RestartTracker::new(policy));
                match tracker.on_failure(now_ms) {
                    RestartDecision::Restart { after_ms, restart } => {
                        self.restarts += 1;
                        vec![self.timer(after_ms, Pending::Child(child, restart))]
                    }
                    RestartDecision::Escalate { restarts_in_window } => {
                        let reason = format!(
                            "{what}; it failed {} times within {} ms ({restarts_in_window} restarts already)",
                            restarts_in_window + 1,
                            self.policy.window_ms
                        );
                        self.own_failure(now_ms, reason)
                    }
                }
            }
        }
    }

    fn own_failure(&mut self, now_ms: u64, reason: String) -> Vec<SupCommand<K>> {
        match self.own.on_failure(now_ms) {
            RestartDecision::Restart { after_ms, .. } => {
                self.subtree_restarts += 1;
                let why = format!("{} restarts its subtree: {reason}", self.name);
                self.pending.retain(|_, p| matches!(p, Pending::All(_)));
                vec![self.timer(after_ms, Pending::All(why))]
            }
            RestartDecision::Escalate { restarts_in_window } => {
                let reason = format!(
                    "{reason}; {} restarted its subtree {restarts_in_window} times within {} ms",
                    self.name, self.policy.window_ms
                );
                if self.root {
                    vec![SupCommand::GiveUp { reason }]
                } else {
                    vec![SupCommand::Escalate { reason }]
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_escalates_and_forgets_old_failures() {
        let p = RestartPolicy {
            max_restarts: 3,
            window_ms: 1_000,
            backoff_base_ms: 10,
            backoff_max_ms: 25,
        };
        let mut t = RestartTracker::new(p);
        assert_eq!(
            t.on_failure(0),
            RestartDecision::Restart {
                after_ms: 10,
                restart: 1
            }
        );
        assert_eq!(
            t.on_failure(100),
            RestartDecision::Restart {
                after_ms: 20,
                restart: 2
            }
        );
        assert_eq!(
            t.on_failure(200),
            RestartDecision::Restart {
                after_ms: 25,
                restart: 3
            }
        );
        assert_eq!(
            t.on_failure(300),
            RestartDecision::Escalate {
                restarts_in_window: 3
            }
        );
        // a second later the first two have left the window
        assert_eq!(
            t.on_failure(1_150),
            RestartDecision::Restart {
                after_ms: 20,
                restart: 2
            }
        );
        assert_eq!(t.total, 4);
    }

    fn policy(max: u32) -> RestartPolicy {
        RestartPolicy {
            max_restarts: max,
            window_ms: 1_000,
            backoff_base_ms: 10,
            backoff_max_ms: 40,
        }
    }

    fn failed(child: usize) -> SupEvent<usize> {
        SupEvent::Failed {
            child,
            what: format!("stage copy s{child} panicked"),
        }
    }

    #[test]
    fn backoff_is_a_timer_and_the_restart_waits_for_it() {
        let mut s = Supervisor::new("gpu actor of rank 0", policy(3), false);
        let c = s.on(0, failed(1));
        assert_eq!(
            c,
            vec![SupCommand::StartTimer {
                after_ms: 10,
                token: 1
            }]
        );
        assert!(s.is_waiting());
        // an unknown or stale token does nothing; the right one restarts the child once
        assert!(s.on(5, SupEvent::Timer { token: 9 }).is_empty());
        assert_eq!(
            s.on(10, SupEvent::Timer { token: 1 }),
            vec![SupCommand::Restart {
                child: 1,
                restart: 1
            }]
        );
        assert!(
            s.on(11, SupEvent::Timer { token: 1 }).is_empty(),
            "a duplicated timer"
        );
        assert!(!s.is_waiting());
    }

    #[test]
    fn a_child_past_its_budget_restarts_the_subtree_and_progress_clears_budgets() {
        let mut s = Supervisor::new("gpu actor of rank 0", policy(2), false);
        for t in [0, 1] {
            assert!(matches!(
                s.on(t, failed(0))[0],
                SupCommand::StartTimer { .. }
            ));
        }
        // the third failure inside the window is the supervisor's own: subtree restart
        let c = s.on(2, failed(0));
        let SupCommand::StartTimer { token, .. } = c[0] else {
            panic!("{c:?}")
        };
        // failures while the subtree restart is pending are absorbed by it
        assert!(s.on(3, failed(1)).is_empty());
        let c = s.on(20, SupEvent::Timer { token });
        let SupCommand::RestartAll { reason } = &c[0] else {
            panic!("{c:?}")
        };
        assert!(
            reason.contains("stage copy s0 panicked; it failed 3 times"),
            "{reason}"
        );
        assert_eq!(s.subtree_restarts, 1);
        // fresh children have fresh budgets
        assert!(matches!(
            s.on(30, failed(0))[0],
            SupCommand::StartTimer { .. }
        ));
        // a committed step clears every window: one failure per step never escalates
        for k in 0..50u64 {
            s.on(100 + k, SupEvent::Progress);
            let c = s.on(100 + k, failed(0));
            assert!(matches!(c[0], SupCommand::StartTimer { .. }), "{k}: {c:?}");
        }
    }

    #[test]
    fn only_the_root_gives_up_and_says_who_failed_how_often() {
        for root in [false, true] {
            let mut s = Supervisor::new("the node supervisor", policy(1), root);
            s.on(0, failed(3));
            let c = s.on(1, failed(3));
            let SupCommand::StartTimer { token, .. } = c[0] else {
                panic!("{c:?}")
            };
            s.on(2, SupEvent::Timer { token });
            s.on(3, failed(3));
            let c = s.on(4, failed(3));
            let reason = match (&c[0], root) {
                (SupCommand::GiveUp { reason }, true) => reason,
                (SupCommand::Escalate { reason }, false) => reason,
                other => panic!("{other:?}"),
            };
            assert!(
                reason.contains("stage copy s3 panicked; it failed 2 times"),
                "{reason}"
            );
            assert!(
                reason.contains("the node supervisor restarted its subtree 1 times"),
                "{reason}"
            );
        }
    }
}

//! The restart policy as data: at most `max_restarts` restarts of one child inside a sliding
//! window, each after an exponential backoff; past that the failure escalates to the parent.
//!
//! Time is an input (milliseconds on any monotonic clock the shell chooses), so the policy is
//! deterministic and the simulator can drive it in virtual time.

use std::collections::VecDeque;

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
}

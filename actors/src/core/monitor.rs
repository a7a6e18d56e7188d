//! Loss-spike detection as a sans-IO machine: the rules (`[training]`'s `spike_*` keys) turned
//! into a gate for the next step, and the decision once the step's loss and gradient norm are
//! known: accept it, or reject it and say which window of steps to roll back and skip.
//!
//! A step is judged before its update is applied: an engine computes the step's loss and
//! gradient norm, checks them against the [`SpikeGate`] it was given, and applies the update only
//! when they pass. A rejected step therefore never touches the committed state: rolling it back
//! costs nothing and restarts nothing. A longer window (`rollback_skip_steps` > 1) also discards
//! the accepted steps before it, from an in-memory ring of committed states or from the store.

use std::collections::VecDeque;

/// The rules, from the config's `[training]` table.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpikeRules {
    /// A loss above this many times the mean of the last `window` accepted losses is a spike
    /// (0: off).
    pub loss_factor: f64,
    /// Accepted steps the running mean and the grad-norm mean look back over.
    pub window: usize,
    /// A loss more than this many standard deviations above its EMA is a spike (0: off).
    pub zscore: f64,
    /// Decay of the loss EMA and its variance.
    pub ema_decay: f64,
    /// A gradient norm above this many times the mean of the last `window` is a spike (0: off).
    pub grad_factor: f64,
    /// Accepted steps seen before the rules apply (NaN and Inf are spikes from the first step).
    pub min_history: usize,
    /// Steps whose data a rollback skips, ending at the spike (1: the spike step's batches).
    pub skip_steps: u64,
    /// After a rollback the learning rate is multiplied by `lr_factor` for `lr_steps` steps.
    pub lr_factor: f32,
    pub lr_steps: u64,
    /// Rejected steps in a row after which the run stops as diverged.
    pub max_consecutive: u32,
}

impl Default for SpikeRules {
    fn default() -> Self {
        SpikeRules {
            loss_factor: 3.0,
            window: 20,
            zscore: 0.0,
            ema_decay: 0.9,
            grad_factor: 0.0,
            min_history: 5,
            skip_steps: 1,
            lr_factor: 1.0,
            lr_steps: 0,
            max_consecutive: 5,
        }
    }
}

/// The limits one step is judged against (infinite when a rule is off or has no history yet).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpikeGate {
    pub max_loss: f64,
    pub max_grad_norm: f64,
}

impl SpikeGate {
    /// A gate that only refuses NaN and Inf.
    pub fn open() -> SpikeGate {
        SpikeGate {
            max_loss: f64::INFINITY,
            max_grad_norm: f64::INFINITY,
        }
    }

    /// Why a step with this loss and gradient norm is a spike, or None when it passes.
    pub fn judge(&self, loss: f64, grad_norm: f64) -> Option<Spike> {
        if !loss.is_finite() || !grad_norm.is_finite() {
            Some(Spike::NotFinite)
        } else if loss > self.max_loss {
            Some(Spike::Loss {
                loss,
                limit: self.max_loss,
            })
        } else if grad_norm > self.max_grad_norm {
            Some(Spike::GradNorm {
                norm: grad_norm,
                limit: self.max_grad_norm,
            })
        } else {
            None
        }
    }
}

/// Why a step was rejected.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Spike {
    NotFinite,
    Loss { loss: f64, limit: f64 },
    GradNorm { norm: f64, limit: f64 },
}

impl std::fmt::Display for Spike {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spike::NotFinite => f.write_str("the loss or gradient norm is not finite"),
            Spike::Loss { loss, limit } => write!(f, "loss {loss:.4} above the limit {limit:.4}"),
            Spike::GradNorm { norm, limit } => {
                write!(f, "gradient norm {norm:.4} above the limit {limit:.4}")
            }
        }
    }
}

/// What the monitor decided about one step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Accepted,
    /// The step was rejected: go back to the committed state of step `to_step` and skip the data
    /// of steps `to_step + 1 ..= spike_step`.
    Rollback {
        spike_step: u64,
        to_step: u64,
        why: Spike,
    },
    /// Too many rejections in a row.
    Diverged {
        step: u64,
        why: Spike,
        times: u32,
    },
}

/// The monitor's memory: what a resumed run needs to decide as the uninterrupted one would
/// (it travels in the checkpoint manifest).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MonitorState {
    pub losses: VecDeque<f64>,
    pub grad_norms: VecDeque<f64>,
    pub ema: Option<f64>,
    pub ema_var: f64,
    pub seen: u64,
    pub consecutive: u32,
    /// The step the learning rate is lowered until (inclusive), after a rollback.
    pub lr_low_until: Option<u64>,
    pub rollbacks: u64,
    pub skipped_steps: u64,
}

/// The loss-spike monitor.
#[derive(Clone, Debug)]
pub struct LossMonitor {
    pub rules: SpikeRules,
    pub state: MonitorState,
}

impl LossMonitor {
    pub fn new(rules: SpikeRules, state: MonitorState) -> LossMonitor {
        LossMonitor { rules, state }
    }

    /// The gate for the next step.
    pub fn gate(&self) -> SpikeGate {
        let (r, s) = (&self.rules, &self.state);
        let mut g = SpikeGate::open();
        if (s.seen as usize) < r.min_history.max(1) {
            return g;
        }
        if r.loss_factor > 0.0 && !s.losses.is_empty() {
            let mean = s.losses.iter().sum::<f64>() / s.losses.len() as f64;
            g.max_loss = g.max_loss.min(r.loss_factor * mean);
        }
        if r.zscore > 0.0
            && let Some(ema) = s.ema
        {
            g.max_loss = g.max_loss.min(ema + r.zscore * s.ema_var.sqrt());
        }
        if r.grad_factor > 0.0 && !s.grad_norms.is_empty() {
            let mean = s.grad_norms.iter().sum::<f64>() / s.grad_norms.len() as f64;
            g.max_grad_norm = r.grad_factor * mean;
        }
        g
    }

    /// The learning-rate multiplier for step `step`.
    pub fn lr_factor(&self, step: u64) -> f32 {
        match self.state.lr_low_until {
            Some(until) if step <= until => self.rules.lr_factor,
            _ => 1.0,
        }
    }

    /// Step `step` ran with loss `loss` and pre-clip gradient norm `grad_norm`; `rejected` is
    /// what the engine's gate said (the engine applied the update only when it is None).
    pub fn on_step(
        &mut self,
        step: u64,
        loss: f64,
        grad_norm: f64,
        rejected: Option<Spike>,
    ) -> Verdict {
        let (r, s) = (&self.rules, &mut self.state);
        match rejected {
            None => {
                s.consecutive = 0;
                s.seen += 1;
                push_bounded(&mut s.losses, loss, r.window.max(1));
                push_bounded(&mut s.grad_norms, grad_norm, r.window.max(1));
                match s.ema {
                    None => s.ema = Some(loss),
                    Some(e) => {
                        let d = loss - e;
                        let a = r.ema_decay;
                        s.ema = Some(a * e + (1.0 - a) * loss);
                        s.ema_var = a * (s.ema_var + (1.0 - a) * d * d);
                    }
                }
                Verdict::Accepted
            }
            Some(why) => {
                s.consecutive += 1;
                if s.consecutive > r.max_consecutive {
                    return Verdict::Diverged {
                        step,
                        why,
                        times: s.consecutive,
                    };
                }
                let window = r.skip_steps.max(1);
                let to_step = step.saturating_sub(window);
                s.rollbacks += 1;
                s.skipped_steps += step - to_step;
                if r.lr_steps > 0 {
                    s.lr_low_until = Some(step + r.lr_steps);
                }
                Verdict::Rollback {
                    spike_step: step,
                    to_step,
                    why,
                }
            }
        }
    }
}

fn push_bounded(q: &mut VecDeque<f64>, v: f64, cap: usize) {
    q.push_back(v);
    while q.len() > cap {
        q.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut LossMonitor, steps: std::ops::RangeInclusive<u64>, loss: f64) {
        for s in steps {
            let why = m.gate().judge(loss, 1.0);
            assert_eq!(m.on_step(s, loss, 1.0, why), Verdict::Accepted, "step {s}");
        }
    }

    #[test]
    fn a_loss_three_times_the_mean_is_rolled_back_and_skipped() {
        let mut m = LossMonitor::new(SpikeRules::default(), MonitorState::default());
        // no history yet: only NaN is refused
        assert_eq!(m.gate(), SpikeGate::open());
        assert_eq!(m.gate().judge(f64::NAN, 1.0), Some(Spike::NotFinite));
        feed(&mut m, 1..=10, 2.0);
        let g = m.gate();
        assert_eq!(g.max_loss, 6.0);
        assert_eq!(g.judge(5.9, 1.0), None);
        let why = g.judge(7.0, 1.0).expect("a spike");
        assert_eq!(
            m.on_step(11, 7.0, 1.0, Some(why)),
            Verdict::Rollback {
                spike_step: 11,
                to_step: 10,
                why: Spike::Loss {
                    loss: 7.0,
                    limit: 6.0
                }
            }
        );
        // the rejected loss is not part of the mean
        assert_eq!(m.gate().max_loss, 6.0);
        assert_eq!((m.state.rollbacks, m.state.skipped_steps), (1, 1));
    }

    #[test]
    fn a_wider_window_rolls_back_further_and_lowers_the_lr() {
        let rules = SpikeRules {
            skip_steps: 3,
            lr_factor: 0.5,
            lr_steps: 4,
            ..SpikeRules::default()
        };
        let mut m = LossMonitor::new(rules, MonitorState::default());
        feed(&mut m, 1..=8, 1.0);
        let v = m.on_step(9, f64::INFINITY, 1.0, Some(Spike::NotFinite));
        assert_eq!(
            v,
            Verdict::Rollback {
                spike_step: 9,
                to_step: 6,
                why: Spike::NotFinite
            }
        );
        assert_eq!(m.state.skipped_steps, 3);
        assert_eq!(m.lr_factor(9), 0.5);
        assert_eq!(m.lr_factor(13), 0.5);
        assert_eq!(m.lr_factor(14), 1.0);
    }

    #[test]
    fn grad_norm_and_zscore_rules_and_divergence() {
        let rules = SpikeRules {
            loss_factor: 0.0,
            zscore: 4.0,
            grad_factor: 10.0,
            max_consecutive: 2,
            ..SpikeRules::default()
        };
        let mut m = LossMonitor::new(rules, MonitorState::default());
        for s in 1..=20u64 {
            let loss = 3.0 + 0.01 * (s % 3) as f64;
            let why = m.gate().judge(loss, 0.5);
            assert_eq!(m.on_step(s, loss, 0.5, why), Verdict::Accepted);
        }
        let g = m.gate();
        assert_eq!(g.max_grad_norm, 5.0);
        assert!(g.max_loss > 3.02 && g.max_loss < 3.2, "{}", g.max_loss);
        assert!(matches!(g.judge(3.0, 6.0), Some(Spike::GradNorm { .. })));
        assert!(matches!(g.judge(3.5, 0.5), Some(Spike::Loss { .. })));
        // a run that keeps spiking stops
        for s in 21..=22 {
            assert!(matches!(
                m.on_step(s, 9.0, 0.5, Some(Spike::NotFinite)),
                Verdict::Rollback { .. }
            ));
        }
        assert!(matches!(
            m.on_step(23, 9.0, 0.5, Some(Spike::NotFinite)),
            Verdict::Diverged { times: 3, .. }
        ));
        // state round-trips (it travels in the manifest)
        let text = serde_json::to_string(&m.state).unwrap();
        let back: MonitorState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m.state);
    }
}

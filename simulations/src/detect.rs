//! When a fault is seen, decided by the live machines: the phi-accrual `Detector`'s Dead verdict
//! on a silent or frozen node (heartbeats every interval), and the `Coordinator`'s step deadline
//! and probe protocol for a hung actor or a lost message inside an attempt.

use crate::failures::Symptom;
use actors::core::coordinator::{CoordCommand, CoordEvent, Coordinator, TimeoutPolicy};
use actors::core::detector::{Detector, DetectorCommand, DetectorEvent, DetectorPolicy};
use std::collections::BTreeMap;

/// Milliseconds from a node's last sign of life to the `Detector`'s Dead verdict, found by
/// driving the machine: heartbeats every interval, then silence (a crash) or heartbeats whose
/// work progress is frozen (a hang).
pub fn detection_ms(policy: DetectorPolicy, symptom: Symptom) -> u64 {
    let mut d = Detector::new(policy);
    let every = policy.heartbeat_interval_ms.max(1);
    d.on(0, DetectorEvent::Join { member: 0 });
    let mut t = 0;
    let mut progress = 0;
    while t < 50 * every {
        d.on(
            t,
            DetectorEvent::Heartbeat {
                member: 0,
                progress,
            },
        );
        progress += 1;
        t += every;
    }
    let failed = t - every;
    if symptom == Symptom::Hang {
        d.on(failed, DetectorEvent::WorkStarted { member: 0, work: 1 });
    }
    while t < failed + 600_000 {
        if symptom == Symptom::Hang {
            d.on(
                t,
                DetectorEvent::Heartbeat {
                    member: 0,
                    progress,
                },
            );
        }
        let dead = d
            .on(t, DetectorEvent::Tick)
            .into_iter()
            .any(|c| matches!(c, DetectorCommand::Dead { .. }));
        if dead {
            return t - failed;
        }
        t += every;
    }
    600_000
}

/// Milliseconds from a fault `fault_ms` into an attempt until the [`Coordinator`] acts on it, by
/// driving the machine over a two-rank step whose rank 1 never finishes: at the step deadline
/// it probes; a rank whose shell still answers names the hung actor, which is killed at once
/// (`answers_probe`); a silent one is killed when the probe's grace runs out.
pub fn deadline_verdict_ms(policy: TimeoutPolicy, fault_ms: u64, answers_probe: bool) -> u64 {
    let mut c = Coordinator::new(2, 0, policy);
    // timers in (due, posting order)
    let mut timers = BTreeMap::new();
    let mut posted = 0u64;
    let mut pending = c.on(0, CoordEvent::RankUp { rank: 0 });
    pending.extend(c.on(0, CoordEvent::RankUp { rank: 1 }));
    pending.extend(c.on(0, CoordEvent::Begin { step: 1 }));
    let mut now = 0;
    loop {
        let mut next = Vec::new();
        for cmd in pending {
            match cmd {
                CoordCommand::SetTimer { at_ms, timer } => {
                    posted += 1;
                    timers.insert((at_ms, posted), timer);
                }
                CoordCommand::Probe { step, attempt } => {
                    // the healthy rank answers; the hung one's shell names its stuck actor
                    next.extend(c.on(
                        now,
                        CoordEvent::ProbeAck {
                            rank: 0,
                            step,
                            attempt,
                        },
                    ));
                    if answers_probe {
                        let reason = "the probe found a hung actor".to_string();
                        next.extend(c.on(now, CoordEvent::RankDown { rank: 1, reason }));
                    }
                }
                CoordCommand::Kill { .. } | CoordCommand::Abort { .. } => {
                    return now.saturating_sub(fault_ms);
                }
                _ => {}
            }
        }
        if next.is_empty() {
            let Some(((at, _), timer)) = timers.pop_first() else {
                return u64::MAX;
            };
            now = at;
            next = c.on(now, CoordEvent::Timer(timer));
        }
        pending = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 s deadline: a stage hang 0.3 s into the attempt is seen at the deadline (1.7 s
    /// later); a silent GpuActor one probe grace (1 s) after that.
    #[test]
    fn the_coordinator_decides_at_the_deadline_and_after_the_probe_grace() {
        let p = TimeoutPolicy {
            fixed_ms: Some(2_000),
            ..TimeoutPolicy::default()
        };
        assert_eq!(deadline_verdict_ms(p, 300, true), 1_700);
        assert_eq!(deadline_verdict_ms(p, 300, false), 2_700);
        let slow = TimeoutPolicy {
            fixed_ms: Some(10_000),
            probe_grace_ms: 250,
            ..TimeoutPolicy::default()
        };
        assert_eq!(deadline_verdict_ms(slow, 0, false), 10_250);
    }
}

//! Failure detector: a sans-IO state machine that tells a *slow* member from a *dead* one.
//! It owns, per member, the heartbeat inter-arrival window (phi-accrual suspicion), the
//! progress counter (a heartbeating member whose progress freezes during work is Hung), and
//! the typical work duration (Slow reports). Time is the shell's `now_ms`; the machine asks
//! for its next evaluation with `ArmTimer` and decides only when fed `Tick`.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Tuning of the detector; all durations in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectorPolicy {
    /// Expected heartbeat period; also the shortest spacing between requested Ticks.
    pub heartbeat_interval_ms: u64,
    /// Hard bound: silent (or progress-frozen during work) this long means dead.
    pub dead_after_ms: u64,
    /// phi-accrual threshold for `Suspect` (reported, never acted on here).
    pub phi_suspect: f64,
    /// Number of inter-arrival samples kept per member.
    pub window: usize,
    /// Work running longer than `slow_factor ×` the typical duration is `Slow`.
    pub slow_factor: f64,
    /// Floor of the inter-arrival standard deviation.
    pub min_std_ms: f64,
}

impl Default for DetectorPolicy {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            dead_after_ms: 2000,
            phi_suspect: 8.0,
            window: 100,
            slow_factor: 2.0,
            min_std_ms: 25.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DetectorEvent {
    /// (Re)join: forgets any previous state of `member`, including a Dead verdict.
    Join {
        member: usize,
    },
    /// Sign of life; `progress` is a counter the member bumps while working.
    Heartbeat {
        member: usize,
        progress: u64,
    },
    /// Forget `member`; later events for it are ignored until it joins again.
    Leave {
        member: usize,
    },
    /// Re-evaluate everyone; the only event that yields Suspect, Dead or Slow.
    Tick,
    WorkStarted {
        member: usize,
        work: u64,
    },
    WorkDone {
        member: usize,
        work: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadReason {
    /// No heartbeat for `dead_after_ms`.
    Silent,
    /// Heartbeats arrive but progress is frozen during outstanding work for `dead_after_ms`.
    Hung,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DetectorCommand {
    /// Send `Tick` at `at_ms` (never in the past). Each supersedes the previous one; extra
    /// Ticks are harmless.
    ArmTimer { at_ms: u64 },
    /// phi crossed `phi_suspect`; once per silence episode.
    Suspect { member: usize, phi: f64 },
    /// Once per incarnation. `silent_ms`: time since the last heartbeat (Silent) or since
    /// progress last advanced (Hung).
    Dead {
        member: usize,
        silent_ms: u64,
        reason: DeadReason,
    },
    /// Work item `work` has run `elapsed_ms` against a typical `typical_ms`; once per item.
    Slow {
        member: usize,
        work: u64,
        elapsed_ms: u64,
        typical_ms: u64,
    },
    /// A Suspect member heartbeated again, or a work item reported Slow finished.
    Recovered { member: usize },
}

const EWMA_ALPHA: f64 = 0.25;
const PHI_MAX: f64 = 1.0e3;

#[derive(Clone, Debug)]
struct Work {
    started_ms: u64,
    progress_at_start: u64,
    slow: bool,
}

#[derive(Clone, Debug, Default)]
struct Member {
    joined_ms: u64,
    last_hb: Option<u64>,
    gaps: VecDeque<u64>,
    progress: u64,
    /// Last time progress advanced, or outstanding work began from idle.
    progress_ms: u64,
    work: BTreeMap<u64, Work>,
    typical: Option<f64>,
    suspected: bool,
    dead: bool,
}

impl Member {
    fn last_seen(&self) -> u64 {
        self.last_hb.unwrap_or(self.joined_ms)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Detector {
    policy: DetectorPolicy,
    members: BTreeMap<usize, Member>,
    global_typical: Option<f64>,
    armed: Option<u64>,
    last_tick: Option<u64>,
}

fn ewma(old: Option<f64>, x: f64) -> f64 {
    old.map_or(x, |o| o + EWMA_ALPHA * (x - o))
}

/// -log10(1 - CDF(y)) with the logistic approximation CDF(y) ≈ 1/(1+e^(-a)),
/// a = y(1.5976 + 0.070566y²); equals softplus(a)/ln 10, evaluated without overflow.
fn phi_of(mean: f64, std: f64, elapsed: u64) -> f64 {
    let y = (elapsed as f64 - mean) / std;
    let a = y * (1.5976 + 0.070566 * y * y);
    let softplus = a.max(0.0) + (-a.abs()).exp().ln_1p();
    (softplus / std::f64::consts::LN_10).min(PHI_MAX)
}

impl Detector {
    pub fn new(policy: DetectorPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Members that joined and have not left, dead ones included, in id order.
    pub fn members(&self) -> impl Iterator<Item = usize> + '_ {
        self.members.keys().copied()
    }

    pub fn is_dead(&self, member: usize) -> bool {
        self.members.get(&member).is_some_and(|m| m.dead)
    }

    pub fn last_heartbeat(&self, member: usize) -> Option<u64> {
        self.members.get(&member).and_then(|m| m.last_hb)
    }

    /// Typical work duration used for `member`: its own EWMA, else that of all members.
    pub fn typical_work_ms(&self, member: usize) -> Option<f64> {
        self.members
            .get(&member)
            .and_then(|m| m.typical)
            .or(self.global_typical)
    }

    /// Suspicion level at `now_ms` (0.0 for an unknown member).
    pub fn phi(&self, member: usize, now_ms: u64) -> f64 {
        self.members.get(&member).map_or(0.0, |m| {
            let (mean, std) = self.stats(m);
            phi_of(mean, std, now_ms.saturating_sub(m.last_seen()))
        })
    }

    /// Mean and floored std of the inter-arrival window; the heartbeat interval before any sample.
    fn stats(&self, m: &Member) -> (f64, f64) {
        let floor = self.policy.min_std_ms.max(1e-6);
        if m.gaps.is_empty() {
            return (self.policy.heartbeat_interval_ms as f64, floor);
        }
        let n = m.gaps.len() as f64;
        let mean = m.gaps.iter().map(|&g| g as f64).sum::<f64>() / n;
        let sq = |g: &u64| (*g as f64 - mean).powi(2);
        let var = m.gaps.iter().map(sq).sum::<f64>() / n;
        (mean, var.sqrt().max(floor))
    }

    pub fn on(&mut self, now_ms: u64, ev: DetectorEvent) -> Vec<DetectorCommand> {
        let mut out = Vec::new();
        match ev {
            DetectorEvent::Join { member } => {
                let fresh = Member {
                    joined_ms: now_ms,
                    progress_ms: now_ms,
                    ..Member::default()
                };
                self.members.insert(member, fresh);
            }
            DetectorEvent::Leave { member } => {
                self.members.remove(&member);
            }
            DetectorEvent::Heartbeat { member, progress } => {
                let window = self.policy.window;
                if let Some(m) = self.members.get_mut(&member).filter(|m| !m.dead) {
                    // A same-instant duplicate adds no sample; `now` never moves last_hb back.
                    if let Some(gap) = m.last_hb.map(|l| now_ms.saturating_sub(l)) {
                        m.gaps.extend(Some(gap).filter(|&g| g > 0));
                        m.gaps.drain(..m.gaps.len().saturating_sub(window));
                    }
                    m.last_hb = Some(m.last_hb.map_or(now_ms, |l| l.max(now_ms)));
                    if progress > m.progress {
                        m.progress = progress;
                        m.progress_ms = m.progress_ms.max(now_ms);
                    }
                    if std::mem::take(&mut m.suspected) {
                        out.push(DetectorCommand::Recovered { member });
                    }
                }
            }
            DetectorEvent::WorkStarted { member, work } => {
                if let Some(m) = self.members.get_mut(&member).filter(|m| !m.dead) {
                    if m.work.is_empty() {
                        m.progress_ms = m.progress_ms.max(now_ms);
                    }
                    let w = Work {
                        started_ms: now_ms,
                        progress_at_start: m.progress,
                        slow: false,
                    };
                    m.work.entry(work).or_insert(w);
                }
            }
            DetectorEvent::WorkDone { member, work } => {
                if let Some(m) = self.members.get_mut(&member).filter(|m| !m.dead)
                    && let Some(w) = m.work.remove(&work)
                {
                    let took = now_ms.saturating_sub(w.started_ms) as f64;
                    m.typical = Some(ewma(m.typical, took));
                    self.global_typical = Some(ewma(self.global_typical, took));
                    if w.slow {
                        out.push(DetectorCommand::Recovered { member });
                    }
                }
            }
            DetectorEvent::Tick => {
                self.last_tick = Some(now_ms);
                if self.armed.is_some_and(|a| a <= now_ms) {
                    self.armed = None;
                }
                self.evaluate(now_ms, &mut out);
            }
        }
        self.arm(now_ms, &mut out);
        out
    }

    fn evaluate(&mut self, now: u64, out: &mut Vec<DetectorCommand>) {
        let p = self.policy;
        let global = self.global_typical;
        let ids: Vec<usize> = self.members.keys().copied().collect();
        for id in ids {
            let (mean, std) = self.stats(&self.members[&id]);
            let m = self.members.get_mut(&id).expect("listed member");
            if m.dead {
                continue;
            }
            let silent = now.saturating_sub(m.last_seen());
            let frozen = now.saturating_sub(m.progress_ms);
            let dead = if silent >= p.dead_after_ms {
                Some((silent, DeadReason::Silent))
            } else if !m.work.is_empty() && frozen >= p.dead_after_ms {
                Some((frozen, DeadReason::Hung))
            } else {
                None
            };
            if let Some((silent_ms, reason)) = dead {
                m.dead = true;
                out.push(DetectorCommand::Dead {
                    member: id,
                    silent_ms,
                    reason,
                });
                continue;
            }
            let phi = phi_of(mean, std, silent);
            if !m.suspected && phi >= p.phi_suspect {
                m.suspected = true;
                out.push(DetectorCommand::Suspect { member: id, phi });
            }
            let Some(typical) = m.typical.or(global) else {
                continue;
            };
            let progress = m.progress;
            for (&work, w) in m.work.iter_mut() {
                let elapsed = now.saturating_sub(w.started_ms);
                let advancing = progress > w.progress_at_start;
                if !w.slow && advancing && elapsed as f64 > p.slow_factor * typical {
                    w.slow = true;
                    let typical_ms = typical.round() as u64;
                    out.push(DetectorCommand::Slow {
                        member: id,
                        work,
                        elapsed_ms: elapsed,
                        typical_ms,
                    });
                }
            }
        }
    }

    /// Earliest time at which a Tick could change a verdict, over live members.
    fn next_deadline(&self) -> Option<u64> {
        let p = &self.policy;
        let mut best: Option<u64> = None;
        let mut take = |t: u64| best = Some(best.map_or(t, |b| b.min(t)));
        for m in self.members.values().filter(|m| !m.dead) {
            let seen = m.last_seen();
            take(seen.saturating_add(p.dead_after_ms));
            if !m.work.is_empty() {
                take(m.progress_ms.saturating_add(p.dead_after_ms));
            }
            let (mean, std) = self.stats(m);
            if !m.suspected && phi_of(mean, std, p.dead_after_ms) >= p.phi_suspect {
                // phi is non-decreasing in elapsed time: bisect for the first crossing.
                let (mut lo, mut hi) = (0u64, p.dead_after_ms);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if phi_of(mean, std, mid) >= p.phi_suspect {
                        hi = mid
                    } else {
                        lo = mid + 1
                    }
                }
                take(seen.saturating_add(lo));
            }
            if let Some(typical) = m.typical.or(self.global_typical) {
                let limit = (p.slow_factor * typical).max(0.0).floor() as u64;
                for w in m
                    .work
                    .values()
                    .filter(|w| !w.slow && m.progress > w.progress_at_start)
                {
                    take(w.started_ms.saturating_add(limit).saturating_add(1));
                }
            }
        }
        best
    }

    fn arm(&mut self, now: u64, out: &mut Vec<DetectorCommand>) {
        if self.armed.is_some_and(|a| a < now) {
            self.armed = None; // its Tick was lost or is late: ask again
        }
        let Some(next) = self.next_deadline() else {
            return;
        };
        let spacing = self.policy.heartbeat_interval_ms.max(1);
        let floor = self.last_tick.map_or(0, |t| t.saturating_add(spacing));
        let at = next.max(floor).max(now);
        if self.armed.is_none_or(|a| at < a) {
            self.armed = Some(at);
            out.push(DetectorCommand::ArmTimer { at_ms: at });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeadReason::{Hung, Silent};
    use DetectorCommand as C;
    use DetectorEvent as E;

    fn hb(member: usize, progress: u64) -> E {
        E::Heartbeat { member, progress }
    }

    fn dead(member: usize, silent_ms: u64, reason: DeadReason) -> C {
        C::Dead {
            member,
            silent_ms,
            reason,
        }
    }

    fn deaths(got: &[(u64, C)]) -> Vec<(u64, C)> {
        got.iter()
            .filter(|(_, c)| matches!(c, C::Dead { .. }))
            .cloned()
            .collect()
    }

    fn joined(ids: &[usize]) -> Detector {
        let mut d = Detector::default();
        ids.iter()
            .for_each(|&member| drop(d.on(0, E::Join { member })));
        d
    }

    /// Feeds `beat(t)` then a Tick at every ms of `from..=to`; returns all but ArmTimer.
    fn run(
        d: &mut Detector,
        from: u64,
        to: u64,
        mut beat: impl FnMut(u64) -> Vec<E>,
    ) -> Vec<(u64, C)> {
        let mut got = Vec::new();
        for t in from..=to {
            for ev in beat(t).into_iter().chain([E::Tick]) {
                got.extend(d.on(t, ev).into_iter().map(|c| (t, c)));
            }
        }
        got.retain(|(_, c)| !matches!(c, C::ArmTimer { .. }));
        got
    }

    /// Heartbeats from `member` every 100 ms until `stop`, progress = time (advancing) or `frozen`.
    fn beats(member: usize, stop: u64, frozen: Option<u64>) -> impl FnMut(u64) -> Vec<E> {
        move |t| match t % 100 == 0 && t <= stop {
            true => vec![hb(member, frozen.unwrap_or(t))],
            false => vec![],
        }
    }

    #[test]
    fn regular_heartbeats_never_dead_and_phi_stays_low() {
        let mut d = joined(&[0]);
        for t in 1..=10_000u64 {
            assert!(run(&mut d, t, t, beats(0, u64::MAX, None)).is_empty());
            assert!(d.phi(0, t) < 1.0, "phi {} at {t}", d.phi(0, t));
        }
        assert_eq!(d.last_heartbeat(0), Some(10_000));
    }

    #[test]
    fn silent_member_is_dead_exactly_at_deadline_once() {
        let mut d = joined(&[0]);
        let got = run(&mut d, 1, 6000, beats(0, 1000, None));
        assert_eq!(deaths(&got), [(3000, dead(0, 2000, Silent))]);
        let suspect = got.iter().find(|(_, c)| matches!(c, C::Suspect { .. }));
        assert!(
            suspect.is_some_and(|s| s.0 > 1000 && s.0 < 3000),
            "{suspect:?}"
        );
        assert!(d.on(6001, hb(0, 1)).is_empty() && d.is_dead(0)); // no resurrection
    }

    #[test]
    fn duplicated_and_reordered_heartbeats_are_harmless() {
        let mut d = joined(&[0]);
        d.on(0, E::WorkStarted { member: 0, work: 1 });
        let got = run(&mut d, 1, 5040, |t| match (t % 100, t / 100) {
            (0, k) => vec![hb(0, k), hb(0, k)], // duplicate, same instant
            (30, k) => vec![hb(0, k.saturating_sub(2))], // stale copy, late
            _ => vec![],
        });
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(d.last_heartbeat(0), Some(5030));
        // Progress last advanced at 5000; stale beats are liveness, not progress.
        assert!(d.on(5040, E::WorkDone { member: 0, work: 1 }).is_empty());
        let got = run(&mut d, 5041, 9000, |_| vec![]);
        assert_eq!(deaths(&got), [(7030, dead(0, 2000, Silent))]);
    }

    #[test]
    fn slow_worker_with_progress_is_slow_never_dead() {
        let mut d = joined(&[0]);
        for w in 0..4 {
            d.on(w * 200, E::WorkStarted { member: 0, work: w });
            assert!(run(&mut d, w * 200, w * 200 + 199, beats(0, u64::MAX, None)).is_empty());
            d.on(w * 200 + 200, E::WorkDone { member: 0, work: w });
        }
        assert_eq!(d.typical_work_ms(0), Some(200.0));
        d.on(800, E::WorkStarted { member: 0, work: 9 });
        let got = run(&mut d, 800, 1399, beats(0, u64::MAX, None));
        let slow = C::Slow {
            member: 0,
            work: 9,
            elapsed_ms: 401,
            typical_ms: 200,
        };
        assert_eq!(got, [(1201, slow)]);
        let done = d.on(1400, E::WorkDone { member: 0, work: 9 });
        assert_eq!(done, [C::Recovered { member: 0 }]);
        // Member 1 has no history of its own: the all-members EWMA (now 300) applies.
        d.on(1400, E::Leave { member: 0 });
        d.on(1400, E::Join { member: 1 });
        d.on(1400, E::WorkStarted { member: 1, work: 5 });
        let got = run(&mut d, 1400, 2200, beats(1, u64::MAX, None));
        let slow = C::Slow {
            member: 1,
            work: 5,
            elapsed_ms: 601,
            typical_ms: 300,
        };
        assert_eq!(got, [(2001, slow)]);
    }

    #[test]
    fn frozen_progress_during_work_is_hung() {
        let mut d = joined(&[0]);
        d.on(1000, E::WorkStarted { member: 0, work: 1 });
        let got = run(&mut d, 1, 5000, beats(0, u64::MAX, Some(7)));
        assert_eq!(got, [(3000, dead(0, 2000, Hung))]);
    }

    #[test]
    fn leave_forgets_and_rejoin_resets() {
        let mut d = joined(&[0, 1]);
        d.on(50, hb(0, 1));
        d.on(60, E::Leave { member: 0 });
        assert!(d.on(70, hb(0, 2)).is_empty()); // a late beat does not resurrect it
        assert_eq!(
            (d.members().collect(), d.last_heartbeat(0)),
            (vec![1], None)
        );
        let got = run(&mut d, 61, 2500, |_| vec![]);
        assert_eq!(deaths(&got), [(2000, dead(1, 2000, Silent))]);
        d.on(2600, E::Join { member: 1 });
        assert!(!d.is_dead(1) && d.last_heartbeat(1).is_none());
        d.on(2700, hb(1, 1));
        let got = run(&mut d, 2601, 9000, |_| vec![]);
        assert_eq!(deaths(&got), [(4700, dead(1, 2000, Silent))]);
    }

    /// A shell that sends Tick only when its timer fires, checking that ArmTimer is never in the
    /// past and that requested Ticks are at least one heartbeat interval apart.
    fn drive(d: &mut Detector, until: u64, mut beat: impl FnMut(u64) -> Vec<E>) -> Vec<(u64, C)> {
        let (mut timer, mut got, mut last_tick) = (None, Vec::new(), None::<u64>);
        for t in 0..=until {
            let mut evs: VecDeque<E> = beat(t).into();
            while let Some(ev) = evs.pop_front() {
                for c in d.on(t, ev) {
                    let C::ArmTimer { at_ms } = c else {
                        got.push((t, c));
                        continue;
                    };
                    assert!(at_ms >= t, "ArmTimer {at_ms} in the past at {t}");
                    assert!(
                        last_tick.is_none_or(|l| at_ms >= l + 100),
                        "too soon: {at_ms}"
                    );
                    timer = Some(at_ms);
                }
                if evs.is_empty() && timer.is_some_and(|a| a <= t) {
                    (timer, last_tick) = (None, Some(t));
                    evs.push_back(E::Tick);
                }
            }
        }
        got
    }

    #[test]
    fn arm_timer_alone_drives_detection() {
        let mut d = joined(&[0, 1, 2]);
        let mut bs = [(0, 9999), (1, 9999), (2, 1200)].map(|(m, stop)| beats(m, stop, None));
        let got = drive(&mut d, 6000, |t| bs.iter_mut().flat_map(|b| b(t)).collect());
        let dead = deaths(&got);
        assert!(
            matches!(dead[..], [(t, C::Dead { member: 2, .. })] if (3200..3300).contains(&t)),
            "{dead:?}"
        );
        assert!(
            got.iter()
                .any(|(t, c)| matches!(c, C::Suspect { member: 2, .. }) && *t < 3200)
        );
    }

    #[test]
    fn random_gaps_below_bound_never_dead() {
        let bound = DetectorPolicy::default().dead_after_ms;
        for seed in 1..=20u64 {
            let mut lcg = seed;
            let mut below = move |n: u64| {
                lcg = lcg
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (lcg >> 33) % n
            };
            let (mut d, mut next) = (joined(&[0, 1, 2]), [0u64; 3]);
            let got = drive(&mut d, 20_000, |t| {
                let mut evs = if t % 7 == 0 { vec![E::Tick] } else { vec![] };
                for m in (0..3).filter(|&m| next[m] == t).collect::<Vec<_>>() {
                    next[m] = t + 1 + below(bound - 1);
                    evs.push(hb(m, t)); // progress advances with every beat
                    match below(4) {
                        0 => evs.push(E::WorkStarted { member: m, work: t }),
                        1 => evs.push(E::WorkDone {
                            member: m,
                            work: below(t + 1),
                        }),
                        _ => {}
                    }
                }
                evs
            });
            assert!(deaths(&got).is_empty(), "seed {seed}: {got:?}");
        }
    }
}

//! The control plane's machines driven together with a simulated clock and no compute: the
//! Coordinator machine, one RankMachine per rank, a Supervisor per rank (over its stage copies)
//! and a root Supervisor over the ranks. Random faults (stage crashes, stage hangs, rank hangs,
//! dropped and duplicated messages, reordered delivery) must end in one of two ways: every step
//! committed exactly once and in order, or a clean give-up.

use actors::core::coordinator::{CoordCommand, CoordEvent, Coordinator, TimeoutPolicy};
use actors::core::executor::Arrival;
use actors::core::ops::{StageOp, StageOpResult};
use actors::core::rank::{RankCommand, RankEvent, RankMachine};
use actors::core::supervisor::{RestartPolicy, SupCommand, SupEvent, Supervisor};
use actors::schedule::{Schedule, ScheduleKind, build};
use kernels::model::stage::StageStats;
use std::collections::{BTreeMap, BTreeSet};

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Debug)]
enum Ev {
    Coord(CoordEvent),
    Rank(usize, RankEvent<()>),
    /// A stage copy finished an op of (step, attempt) in incarnation `inc` of the copy.
    OpFinished {
        op_id: u64,
        rank: usize,
        copy: usize,
        inc: u64,
        step: u64,
        attempt: u32,
        mb: usize,
        result: StageOpResult,
    },
    StageCrash {
        rank: usize,
        copy: usize,
        inc: u64,
    },
    RankTimer {
        rank: usize,
        token: u64,
    },
    RootTimer {
        token: u64,
    },
}

/// Fault rates, per mille of the opportunities.
#[derive(Clone, Copy, Debug)]
struct Rates {
    crash: u64,
    hang: u64,
    rank_hang: u64,
    drop: u64,
    dup: u64,
}

struct World {
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    rng: Lcg,
    rates: Rates,
    schedule: Schedule,
    coord: Coordinator,
    ranks: Vec<RankMachine<()>>,
    rank_sup: Vec<Supervisor<usize>>,
    root: Supervisor<usize>,
    /// Per (rank, copy): the incarnation; ops of an older one are lost with it.
    inc: BTreeMap<(usize, usize), u64>,
    /// Ranks that hang (ignore everything) until killed.
    hung: BTreeSet<usize>,
    /// Ranks whose Supervisor has restarts pending (they are down).
    commits: Vec<u64>,
    gave_up: Option<String>,
    steps: u64,
}

impl World {
    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), ev);
    }

    fn coord(&mut self, ev: CoordEvent) {
        let cmds = self.coord.on(self.now, ev);
        for c in cmds {
            match c {
                CoordCommand::Open { step, attempt, .. } => {
                    for r in 0..self.ranks.len() {
                        let d = 1 + self.rng.below(3);
                        self.at(d, Ev::Rank(r, RankEvent::Open { step, attempt }));
                    }
                }
                CoordCommand::Reduce { step, attempt } => {
                    self.at(2, Ev::Coord(CoordEvent::Reduced { step, attempt }))
                }
                CoordCommand::Install { step, attempt } => {
                    for r in 0..self.ranks.len() {
                        self.at(1, Ev::Rank(r, RankEvent::Install { step, attempt }));
                    }
                }
                CoordCommand::Commit { step, .. } => {
                    self.commits.push(step);
                    for s in &mut self.rank_sup {
                        s.on(self.now, SupEvent::Progress);
                    }
                    self.root.on(self.now, SupEvent::Progress);
                    if step < self.steps {
                        self.at(0, Ev::Coord(CoordEvent::Begin { step: step + 1 }));
                    }
                }
                CoordCommand::Abort { step, attempt, .. } => {
                    for r in 0..self.ranks.len() {
                        self.at(1, Ev::Rank(r, RankEvent::Abort { step, attempt }));
                    }
                }
                CoordCommand::Probe { step, attempt } => {
                    for r in 0..self.ranks.len() {
                        self.at(1, Ev::Rank(r, RankEvent::Probe { step, attempt }));
                    }
                }
                CoordCommand::Kill { rank } => {
                    // the rank's process is gone: its supervisor (the root) restarts it
                    self.hung.remove(&rank);
                    self.rank_down(rank, "killed after the probe".into());
                }
                CoordCommand::SetTimer { at_ms, timer } => {
                    let d = at_ms.saturating_sub(self.now);
                    self.at(d, Ev::Coord(CoordEvent::Timer(timer)));
                }
                CoordCommand::GiveUp { reason, .. } => self.gave_up = Some(reason),
            }
        }
    }

    /// A whole rank failed: fresh machine after the root's backoff.
    fn rank_down(&mut self, rank: usize, reason: String) {
        self.coord(CoordEvent::RankDown {
            rank,
            reason: reason.clone(),
        });
        let cmds = self.root.on(
            self.now,
            SupEvent::Failed {
                child: rank,
                what: format!("rank {rank}: {reason}"),
            },
        );
        self.root_cmds(cmds);
    }

    fn root_cmds(&mut self, cmds: Vec<SupCommand<usize>>) {
        for c in cmds {
            match c {
                SupCommand::StartTimer { after_ms, token } => {
                    self.at(after_ms, Ev::RootTimer { token })
                }
                SupCommand::Restart { child, .. } => {
                    self.ranks[child] = RankMachine::new(&self.schedule, child);
                    self.rank_sup[child] =
                        Supervisor::new(format!("rank {child}"), stage_policy(), false);
                    for copy in self.schedule.stages_on(child) {
                        *self.inc.entry((child, copy)).or_default() += 1;
                    }
                    self.coord(CoordEvent::RankUp { rank: child });
                }
                SupCommand::RestartAll { reason } => {
                    self.coord(CoordEvent::AllDown { reason });
                    for r in 0..self.ranks.len() {
                        self.ranks[r] = RankMachine::new(&self.schedule, r);
                        for copy in self.schedule.stages_on(r) {
                            *self.inc.entry((r, copy)).or_default() += 1;
                        }
                        self.coord(CoordEvent::RankUp { rank: r });
                    }
                }
                SupCommand::Escalate { reason } | SupCommand::GiveUp { reason } => {
                    self.gave_up = Some(reason)
                }
            }
        }
    }

    /// A stage copy failed: the rank aborts its attempt, reports down, its supervisor restarts.
    fn stage_down(&mut self, rank: usize, copy: usize, what: String) {
        *self.inc.entry((rank, copy)).or_default() += 1;
        if let Some((step, attempt)) = self.ranks[rank].current() {
            let _ = self.ranks[rank].on(RankEvent::Abort { step, attempt });
        }
        self.coord(CoordEvent::RankDown {
            rank,
            reason: what.clone(),
        });
        let cmds = self.rank_sup[rank].on(self.now, SupEvent::Failed { child: copy, what });
        self.rank_sup_cmds(rank, cmds);
    }

    fn rank_sup_cmds(&mut self, rank: usize, cmds: Vec<SupCommand<usize>>) {
        for c in cmds {
            match c {
                SupCommand::StartTimer { after_ms, token } => {
                    self.at(after_ms, Ev::RankTimer { rank, token })
                }
                SupCommand::Restart { .. } => {
                    if !self.rank_sup[rank].is_waiting() {
                        self.coord(CoordEvent::RankUp { rank });
                    }
                }
                SupCommand::RestartAll { .. } => {
                    for copy in self.schedule.stages_on(rank) {
                        *self.inc.entry((rank, copy)).or_default() += 1;
                    }
                    self.coord(CoordEvent::RankUp { rank });
                }
                SupCommand::Escalate { reason } | SupCommand::GiveUp { reason } => {
                    self.rank_down(rank, reason)
                }
            }
        }
    }

    fn result_of(&self, copy: usize, op: &StageOp) -> (usize, StageOpResult) {
        let st = &self.schedule.stages[copy];
        match op {
            StageOp::Forward { mb, .. } => (
                *mb,
                StageOpResult::Forward {
                    out: st.next.map(|_| vec![*mb as f32]),
                    stats: StageStats::default(),
                },
            ),
            StageOp::BackwardInput { mb, .. } | StageOp::Backward { mb, .. } => (
                *mb,
                StageOpResult::Backward {
                    dx: st.prev.map(|_| vec![-(*mb as f32)]),
                },
            ),
            StageOp::Weight { mb } => (*mb, StageOpResult::Weight),
        }
    }

    fn rank(&mut self, rank: usize, ev: RankEvent<()>) {
        if self.hung.contains(&rank) {
            return;
        }
        let cmds = match self.ranks[rank].on(ev) {
            Ok(c) => c,
            Err(e) => panic!("rank {rank}: broken invariant: {e}"),
        };
        for c in cmds {
            match c {
                RankCommand::Starting { .. } => {
                    if self.rng.chance(self.rates.rank_hang) {
                        self.hung.insert(rank);
                        return;
                    }
                }
                RankCommand::RunOp {
                    op_id,
                    copy,
                    step,
                    attempt,
                    op,
                } => {
                    let inc = self.inc.get(&(rank, copy)).copied().unwrap_or(0);
                    if self.rng.chance(self.rates.crash) {
                        let d = self.rng.below(3);
                        self.at(d, Ev::StageCrash { rank, copy, inc });
                    } else if self.rng.chance(self.rates.hang) {
                        // never answers
                    } else {
                        let (mb, result) = self.result_of(copy, &op);
                        let d = 1 + self.rng.below(5);
                        self.at(
                            d,
                            Ev::OpFinished {
                                op_id,
                                rank,
                                copy,
                                inc,
                                step,
                                attempt,
                                mb,
                                result,
                            },
                        );
                    }
                }
                RankCommand::Send {
                    to,
                    step,
                    attempt,
                    arrival,
                    data,
                } => {
                    if self.rng.chance(self.rates.drop) {
                        // lost on the wire: the deadline and probe recover
                        continue;
                    }
                    let copies = if self.rng.chance(self.rates.dup) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        // random latency reorders deliveries
                        let d = 1 + self.rng.below(6);
                        let ev = RankEvent::Deliver {
                            step,
                            attempt,
                            arrival,
                            data: data.clone(),
                        };
                        self.at(d, Ev::Rank(to, ev));
                    }
                }
                RankCommand::TakeGrads {
                    copy,
                    step,
                    attempt,
                } => self.at(
                    1,
                    Ev::Rank(
                        rank,
                        RankEvent::Grads {
                            copy,
                            step,
                            attempt,
                            grads: (),
                        },
                    ),
                ),
                RankCommand::Done { step, attempt, .. } => self.at(
                    1,
                    Ev::Coord(CoordEvent::Done {
                        rank,
                        step,
                        attempt,
                    }),
                ),
                RankCommand::InstallStage {
                    copy,
                    step,
                    attempt,
                } => self.at(
                    1,
                    Ev::Rank(
                        rank,
                        RankEvent::StageInstalled {
                            copy,
                            step,
                            attempt,
                        },
                    ),
                ),
                RankCommand::Installed { step, attempt } => self.at(
                    1,
                    Ev::Coord(CoordEvent::Installed {
                        rank,
                        step,
                        attempt,
                    }),
                ),
                RankCommand::Busy {
                    step,
                    attempt,
                    copies,
                } => {
                    for copy in copies {
                        self.stage_down(rank, copy, format!("s{copy} hung on rank {rank}"));
                    }
                    self.at(
                        1,
                        Ev::Coord(CoordEvent::ProbeAck {
                            rank,
                            step,
                            attempt,
                        }),
                    );
                }
            }
        }
    }

    fn run(&mut self) {
        for r in 0..self.ranks.len() {
            self.coord(CoordEvent::RankUp { rank: r });
        }
        self.coord(CoordEvent::Begin { step: 1 });
        let mut events = 0u64;
        while let Some((&(t, s), _)) = self.queue.iter().next() {
            let ev = self.queue.remove(&(t, s)).expect("queued");
            self.now = t;
            events += 1;
            assert!(events < 2_000_000, "the run neither finished nor gave up");
            if self.gave_up.is_some() || self.commits.len() as u64 == self.steps {
                break;
            }
            match ev {
                Ev::Coord(e) => self.coord(e),
                Ev::Rank(r, e) => self.rank(r, e),
                Ev::OpFinished {
                    op_id,
                    rank,
                    copy,
                    inc,
                    step,
                    attempt,
                    mb,
                    result,
                } => {
                    if self.inc.get(&(rank, copy)).copied().unwrap_or(0) == inc {
                        let ev = RankEvent::OpDone {
                            op_id,
                            copy,
                            step,
                            attempt,
                            mb,
                            result,
                        };
                        self.rank(rank, ev);
                    }
                }
                Ev::StageCrash { rank, copy, inc } => {
                    if self.inc.get(&(rank, copy)).copied().unwrap_or(0) == inc
                        && !self.hung.contains(&rank)
                    {
                        self.stage_down(rank, copy, format!("s{copy} panicked on rank {rank}"));
                    }
                }
                Ev::RankTimer { rank, token } => {
                    let cmds = self.rank_sup[rank].on(self.now, SupEvent::Timer { token });
                    self.rank_sup_cmds(rank, cmds);
                }
                Ev::RootTimer { token } => {
                    let cmds = self.root.on(self.now, SupEvent::Timer { token });
                    self.root_cmds(cmds);
                }
            }
        }
    }
}

fn stage_policy() -> RestartPolicy {
    RestartPolicy {
        max_restarts: 3,
        window_ms: 5_000,
        backoff_base_ms: 5,
        backoff_max_ms: 40,
    }
}

fn world(seed: u64, schedule: Schedule, rates: Rates, steps: u64, max_attempts: u32) -> World {
    let ranks = schedule.ranks;
    World {
        now: 0,
        seq: 0,
        queue: BTreeMap::new(),
        rng: Lcg(seed),
        rates,
        coord: Coordinator::new(
            ranks,
            0,
            TimeoutPolicy {
                fixed_ms: Some(300),
                probe_grace_ms: 50,
                max_attempts,
                ..TimeoutPolicy::default()
            },
        ),
        ranks: (0..ranks).map(|r| RankMachine::new(&schedule, r)).collect(),
        rank_sup: (0..ranks)
            .map(|r| Supervisor::new(format!("rank {r}"), stage_policy(), false))
            .collect(),
        root: Supervisor::new("the root", stage_policy(), true),
        schedule,
        inc: BTreeMap::new(),
        hung: BTreeSet::new(),
        commits: Vec::new(),
        gave_up: None,
        steps,
    }
}

#[test]
fn random_faults_commit_every_step_exactly_once_or_give_up_cleanly() {
    let layouts = [
        (ScheduleKind::OneFOneB, 2, 4),
        (ScheduleKind::Zb1p, 3, 6),
        (ScheduleKind::DualPipe, 2, 4),
        (ScheduleKind::DualPipe, 4, 8),
        (ScheduleKind::DualPipeV, 2, 4),
    ];
    let (mut finished, mut gave_up, mut replays) = (0, 0, 0u64);
    for seed in 0..150u64 {
        let mut rng = Lcg(seed * 7919 + 1);
        let (kind, pp, m) = layouts[seed as usize % layouts.len()];
        let schedule = build(kind, pp, m).expect("schedule");
        let rates = Rates {
            crash: rng.below(30),
            hang: rng.below(10),
            rank_hang: rng.below(5),
            drop: rng.below(20),
            dup: rng.below(100),
        };
        let max_attempts = if seed % 10 == 9 { 2 } else { 64 };
        let mut w = world(seed, schedule, rates, 12, max_attempts);
        w.run();
        let want: Vec<u64> = (1..=w.commits.len() as u64).collect();
        assert_eq!(w.commits, want, "seed {seed}: commits in order, each once");
        match &w.gave_up {
            None => {
                assert_eq!(w.commits.len(), 12, "seed {seed} {rates:?}: stopped early");
                finished += 1;
            }
            Some(reason) => {
                assert!(!reason.is_empty());
                gave_up += 1;
            }
        }
        replays += w.coord.txn().replays;
    }
    println!("{finished} runs committed every step, {gave_up} gave up cleanly, {replays} replays");
    // seeded: the outcome of every sequence is fixed
    assert_eq!(
        (finished, gave_up, replays),
        (135, 15, 4600),
        "runs healed, runs given up, replays"
    );
}

#[test]
fn a_clean_run_never_replays() {
    for kind in ScheduleKind::ALL {
        let schedule = build(kind, 2, 4).expect("schedule");
        let rates = Rates {
            crash: 0,
            hang: 0,
            rank_hang: 0,
            drop: 0,
            dup: 0,
        };
        let mut w = world(1, schedule, rates, 5, 64);
        w.run();
        assert_eq!(w.commits, vec![1, 2, 3, 4, 5], "{kind}");
        assert_eq!((w.coord.txn().replays, w.coord.restarts), (0, 0), "{kind}");
    }
}

#[test]
fn the_rank_machine_drops_stale_duplicate_and_buffers_early_messages() {
    let s = build(ScheduleKind::OneFOneB, 2, 2).expect("schedule");
    let mut m: RankMachine<()> = RankMachine::new(&s, 1);
    let act = |mb| Arrival::Activation { stage: 1, mb };
    let deliver = |step, attempt, mb| RankEvent::Deliver {
        step,
        attempt,
        arrival: act(mb),
        data: vec![mb as f32],
    };
    // an activation of attempt 1 arrives before attempt 1 opens: kept
    assert!(m.on(deliver(3, 1, 0)).expect("ok").is_empty());
    // attempt 0 opens: the early message is not for it
    assert!(
        m.on(RankEvent::Open {
            step: 3,
            attempt: 0
        })
        .expect("ok")
        .is_empty()
    );
    // a message of an older step is dropped
    assert!(m.on(deliver(2, 0, 0)).expect("ok").is_empty());
    let dropped = m.dropped;
    // attempt 1 opens and runs the buffered activation at once
    let c = m
        .on(RankEvent::Open {
            step: 3,
            attempt: 1,
        })
        .expect("ok");
    assert!(
        matches!(c[0], RankCommand::Starting { step: 3, .. }),
        "{c:?}"
    );
    assert!(
        matches!(
            c[1],
            RankCommand::RunOp {
                copy: 1,
                step: 3,
                attempt: 1,
                ..
            }
        ),
        "{c:?}"
    );
    // a duplicate of the same activation is dropped
    assert!(m.on(deliver(3, 1, 0)).expect("ok").is_empty());
    assert_eq!(m.dropped, dropped + 1);
    // a stale open (attempt 0 again) does not reset the attempt
    assert!(
        m.on(RankEvent::Open {
            step: 3,
            attempt: 0
        })
        .expect("ok")
        .is_empty()
    );
    assert_eq!(m.current(), Some((3, 1)));
    // an op answer of another attempt is dropped; the right one moves on to B
    let fwd = StageOpResult::Forward {
        out: None,
        stats: StageStats::default(),
    };
    let done = |attempt, op_id| RankEvent::OpDone {
        op_id,
        copy: 1,
        step: 3,
        attempt,
        mb: 0,
        result: fwd.clone(),
    };
    assert!(m.on(done(0, 1)).expect("ok").is_empty());
    let c = m.on(done(1, 1)).expect("ok");
    assert!(
        c.iter().any(|c| matches!(
            c,
            RankCommand::RunOp {
                op: StageOp::Backward { mb: 0, .. },
                ..
            }
        )),
        "{c:?}"
    );
    // a duplicated answer (the stage sent it twice) changes nothing
    assert!(m.on(done(1, 1)).expect("ok").is_empty());
    // a probe names the copy the rank waits on
    let c = m
        .on(RankEvent::Probe {
            step: 3,
            attempt: 1,
        })
        .expect("ok");
    assert!(
        matches!(&c[0], RankCommand::Busy { copies, .. } if copies == &vec![1]),
        "{c:?}"
    );
    // an abort of another attempt changes nothing; of this one, drops it
    m.on(RankEvent::Abort {
        step: 3,
        attempt: 0,
    })
    .expect("ok");
    assert_eq!(m.current(), Some((3, 1)));
    m.on(RankEvent::Abort {
        step: 3,
        attempt: 1,
    })
    .expect("ok");
    assert_eq!(m.current(), None);
}

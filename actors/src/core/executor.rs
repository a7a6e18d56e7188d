//! The stage executor as a sans-IO state machine: one rank's instruction list, the messages that
//! have arrived, and which instruction may run next (one at a time, strictly in list order).
//!
//! It knows nothing of tensors, threads or actors: a shell feeds it [`ExecEvent`]s (a message
//! arrived, an instruction finished) and carries out the [`ExecCommand`]s it returns (run this
//! instruction, send its output there, the program is finished).

use crate::schedule::{Instr, Schedule};
use std::collections::BTreeSet;

/// A message a rank can wait for: the input of `F(stage, mb)` or the output gradient of the
/// backward of `(stage, mb)`. `stage` is the receiving stage copy.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Arrival {
    Activation { stage: usize, mb: usize },
    Gradient { stage: usize, mb: usize },
}

/// What happened to the rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    /// The step opened (the rank may start its first instruction).
    Start,
    Arrived(Arrival),
    /// The instruction last handed out by `Run` finished.
    Completed(Instr),
}

/// What the shell must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecCommand {
    /// Execute this instruction (its inputs have all arrived).
    Run(Instr),
    /// Deliver the output of a finished instruction: `arrival` to rank `to` (may be this rank,
    /// for a local hand-off between two copies on one rank).
    Send { to: usize, arrival: Arrival },
    /// Every instruction of the program has run.
    Finished,
}

/// `(next copy, its rank, previous copy, its rank)` of one stage copy.
type Link = (Option<usize>, Option<usize>, Option<usize>, Option<usize>);

/// One rank's progress through its program.
#[derive(Clone, Debug)]
pub struct RankExecutor {
    pub rank: usize,
    program: Vec<Instr>,
    /// Per stage copy: `(next copy, its rank, previous copy, its rank)`.
    links: Vec<Link>,
    pc: usize,
    running: Option<Instr>,
    arrived: BTreeSet<Arrival>,
    forwarded: BTreeSet<(usize, usize)>,
    backwarded: BTreeSet<(usize, usize)>,
    finished_sent: bool,
}

impl RankExecutor {
    pub fn new(schedule: &Schedule, rank: usize) -> RankExecutor {
        let links = schedule
            .stages
            .iter()
            .map(|s| {
                (
                    s.next,
                    s.next.map(|n| schedule.stages[n].rank),
                    s.prev,
                    s.prev.map(|p| schedule.stages[p].rank),
                )
            })
            .collect();
        RankExecutor {
            rank,
            program: schedule.programs[rank].clone(),
            links,
            pc: 0,
            running: None,
            arrived: BTreeSet::new(),
            forwarded: BTreeSet::new(),
            backwarded: BTreeSet::new(),
            finished_sent: false,
        }
    }

    /// Instructions already completed.
    pub fn completed(&self) -> usize {
        self.pc
    }

    pub fn program(&self) -> &[Instr] {
        &self.program
    }

    /// The instruction handed out and not yet completed.
    pub fn running(&self) -> Option<Instr> {
        self.running
    }

    pub fn is_finished(&self) -> bool {
        self.pc == self.program.len()
    }

    /// What the next instruction waits for, in words (None when it can run or all is done).
    pub fn waiting_for(&self) -> Option<String> {
        if let Some(r) = self.running {
            return Some(format!("rank {}: {r} is running", self.rank));
        }
        let instr = self.program.get(self.pc)?;
        self.missing(instr)
            .map(|m| format!("rank {}: {instr} waits for {m}", self.rank))
    }

    fn missing(&self, instr: &Instr) -> Option<String> {
        let fwd = |stage: usize, mb: usize| -> Option<String> {
            let (_, _, prev, _) = self.links[stage];
            prev.and_then(|_| {
                (!self.arrived.contains(&Arrival::Activation { stage, mb }))
                    .then(|| format!("the activation of s{stage} m{mb}"))
            })
        };
        let bwd = |stage: usize, mb: usize| -> Option<String> {
            if !self.forwarded.contains(&(stage, mb)) {
                return Some(format!("its own F(s{stage},m{mb})"));
            }
            let (next, _, _, _) = self.links[stage];
            next.and_then(|_| {
                (!self.arrived.contains(&Arrival::Gradient { stage, mb }))
                    .then(|| format!("the gradient of s{stage} m{mb}"))
            })
        };
        match *instr {
            Instr::F { stage, mb } => fwd(stage, mb),
            Instr::B { stage, mb } | Instr::BInput { stage, mb } => bwd(stage, mb),
            Instr::W { stage, mb } => (!self.backwarded.contains(&(stage, mb)))
                .then(|| format!("its own B*(s{stage},m{mb})")),
            Instr::FB { f, b } => fwd(f.0, f.1).or_else(|| bwd(b.0, b.1)),
        }
    }

    /// Feeds one event; returns what to do, in order.
    pub fn on(&mut self, event: ExecEvent) -> Vec<ExecCommand> {
        let mut out = Vec::new();
        match event {
            ExecEvent::Start => {}
            ExecEvent::Arrived(a) => {
                self.arrived.insert(a);
            }
            ExecEvent::Completed(instr) => {
                assert_eq!(
                    self.running,
                    Some(instr),
                    "rank {}: completed {instr} that was not running",
                    self.rank
                );
                self.running = None;
                self.pc += 1;
                if let Some((stage, mb)) = instr.forward() {
                    self.forwarded.insert((stage, mb));
                    let (next, next_rank, _, _) = self.links[stage];
                    if let (Some(n), Some(to)) = (next, next_rank) {
                        out.push(ExecCommand::Send {
                            to,
                            arrival: Arrival::Activation { stage: n, mb },
                        });
                    }
                }
                if let Some((stage, mb)) = instr.backward() {
                    self.backwarded.insert((stage, mb));
                    let (_, _, prev, prev_rank) = self.links[stage];
                    if let (Some(p), Some(to)) = (prev, prev_rank) {
                        out.push(ExecCommand::Send {
                            to,
                            arrival: Arrival::Gradient { stage: p, mb },
                        });
                    }
                }
            }
        }
        if self.running.is_none() {
            if let Some(instr) = self.program.get(self.pc).copied() {
                if self.missing(&instr).is_none() {
                    self.running = Some(instr);
                    out.push(ExecCommand::Run(instr));
                }
            } else if !self.finished_sent {
                self.finished_sent = true;
                out.push(ExecCommand::Finished);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{ScheduleKind, build};

    /// Drives every rank's executor with instant delivery; returns the completion order.
    fn drive(s: &Schedule) -> Vec<(usize, Instr)> {
        let mut ex: Vec<RankExecutor> = (0..s.ranks).map(|r| RankExecutor::new(s, r)).collect();
        let mut queue: Vec<(usize, ExecEvent)> =
            (0..s.ranks).map(|r| (r, ExecEvent::Start)).collect();
        let mut order = Vec::new();
        let mut finished = 0;
        while let Some((r, ev)) = queue.pop() {
            for c in ex[r].on(ev) {
                match c {
                    ExecCommand::Run(i) => {
                        order.push((r, i));
                        queue.insert(0, (r, ExecEvent::Completed(i)));
                    }
                    ExecCommand::Send { to, arrival } => {
                        queue.insert(0, (to, ExecEvent::Arrived(arrival)))
                    }
                    ExecCommand::Finished => finished += 1,
                }
            }
        }
        assert_eq!(finished, s.ranks, "every rank finishes");
        assert!(
            ex.iter()
                .all(|e| e.is_finished() && e.waiting_for().is_none())
        );
        order
    }

    #[test]
    fn every_schedule_kind_runs_to_completion() {
        for kind in ScheduleKind::ALL {
            for (ranks, n) in [(1, 2), (2, 4), (2, 8), (4, 8), (4, 12)] {
                let Ok(s) = build(kind, ranks, n) else {
                    continue;
                };
                let order = drive(&s);
                let total: usize = s.programs.iter().map(|p| p.len()).sum();
                assert_eq!(order.len(), total, "{kind} {ranks}x{n}");
                // each rank ran its program in list order
                for r in 0..s.ranks {
                    let mine: Vec<Instr> = order
                        .iter()
                        .filter(|(q, _)| *q == r)
                        .map(|(_, i)| *i)
                        .collect();
                    assert_eq!(mine, s.programs[r]);
                }
            }
        }
    }

    #[test]
    fn waits_for_the_activation_then_runs() {
        let s = build(ScheduleKind::OneFOneB, 2, 2).unwrap();
        let mut e = RankExecutor::new(&s, 1);
        assert!(e.on(ExecEvent::Start).is_empty());
        assert!(e.waiting_for().unwrap().contains("activation of s1 m0"));
        let c = e.on(ExecEvent::Arrived(Arrival::Activation { stage: 1, mb: 0 }));
        assert_eq!(c, vec![ExecCommand::Run(Instr::F { stage: 1, mb: 0 })]);
        // the loss stage's forward sends nothing; its backward runs next and sends a gradient
        let c = e.on(ExecEvent::Completed(Instr::F { stage: 1, mb: 0 }));
        assert_eq!(c, vec![ExecCommand::Run(Instr::B { stage: 1, mb: 0 })]);
        let c = e.on(ExecEvent::Completed(Instr::B { stage: 1, mb: 0 }));
        assert_eq!(
            c[0],
            ExecCommand::Send {
                to: 0,
                arrival: Arrival::Gradient { stage: 0, mb: 0 }
            }
        );
        assert_eq!(c.len(), 1, "waits for the activation of m1");
    }

    #[test]
    fn a_duplicate_arrival_is_harmless() {
        let s = build(ScheduleKind::OneFOneB, 2, 2).unwrap();
        let mut e = RankExecutor::new(&s, 1);
        let a = Arrival::Activation { stage: 1, mb: 0 };
        assert_eq!(e.on(ExecEvent::Arrived(a)).len(), 1);
        assert!(
            e.on(ExecEvent::Arrived(a)).is_empty(),
            "one instruction at a time"
        );
    }
}

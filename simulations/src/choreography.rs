//! One step's full choreography in virtual time, driven through the control plane that runs
//! live: a [`Coordinator`] opens the step, one [`RankMachine`] per pipeline rank decides which
//! stage operation runs next and what is sent where, the ranks report done, the coordinator
//! reduces (the data-parallel gradient reduction), installs and commits. Compute and
//! communication costs come from the cost models; a rank's GPU runs one instruction at a time.
//! No faults happen at this fidelity (the run level has them), so the coordinator's timers are
//! never due.

use crate::comm::CommCosts;
use actors::core::coordinator::{CoordCommand, CoordEvent, Coordinator, TimeoutPolicy};
use actors::core::executor::Arrival;
use actors::core::ops::empty_result;
use actors::core::rank::{RankCommand, RankEvent, RankMachine};
use actors::schedule::{Costs, Instr, Schedule, Span, TimeQueue, Timeline};

/// What an instruction costs on its rank's GPU: compute from `compute`, plus the expert
/// all-to-all of its chunks. Alone, a chunk waits for its own all-to-all; in DualPipe's
/// overlapped F&B pair the forward's communication hides under the backward's compute and the
/// other way round, so the pair takes max(compute, communication).
pub fn instr_seconds(instr: &Instr, compute: &Costs, comm: &CommCosts) -> f64 {
    match instr {
        Instr::F { .. } => compute.f + comm.a2a_forward_s,
        Instr::B { .. } => compute.b + comm.a2a_backward_s,
        Instr::BInput { .. } => compute.b - compute.w + comm.a2a_backward_s,
        Instr::W { .. } => compute.w,
        Instr::FB { .. } => compute.fb.max(comm.a2a_forward_s + comm.a2a_backward_s),
    }
}

/// The step as it ran.
#[derive(Clone, Debug, PartialEq)]
pub struct Choreography {
    /// Every rank's instructions with their start and end (for the Gantt and the bubble).
    pub timeline: Timeline,
    /// When the last rank reported done, when the reduction ended and when the step committed.
    pub done_s: f64,
    pub reduced_s: f64,
    pub committed_s: f64,
    /// Pipeline messages sent between ranks, and events handled.
    pub messages: u64,
    pub events: u64,
}

#[derive(Debug)]
enum Ev {
    Coord(CoordEvent),
    Rank(usize, RankEvent<()>),
}

struct World<'a> {
    schedule: &'a Schedule,
    compute: &'a Costs,
    comm: &'a CommCosts,
    /// Latency of a control message (open, done, install) between coordinator and ranks.
    control_s: f64,
    queue: TimeQueue<(), Ev>,
    now: f64,
    coord: Coordinator,
    ranks: Vec<RankMachine<()>>,
    spans: Vec<Vec<Span>>,
    done_s: f64,
    reduced_s: f64,
    committed_s: Option<f64>,
    messages: u64,
}

impl World<'_> {
    fn at(&mut self, delay: f64, ev: Ev) {
        self.queue.push(self.now + delay, (), ev);
    }

    fn coord(&mut self, ev: CoordEvent) -> Result<(), String> {
        let now_ms = (self.now * 1000.0) as u64;
        for c in self.coord.on(now_ms, ev) {
            match c {
                CoordCommand::Open { step, attempt, .. } => {
                    for r in 0..self.ranks.len() {
                        self.at(
                            self.control_s,
                            Ev::Rank(r, RankEvent::Open { step, attempt }),
                        );
                    }
                }
                CoordCommand::Reduce { step, attempt } => {
                    self.done_s = self.now;
                    let ev = Ev::Coord(CoordEvent::Reduced { step, attempt });
                    self.at(self.comm.dp_reduce_s, ev);
                }
                CoordCommand::Install { step, attempt } => {
                    self.reduced_s = self.now;
                    for r in 0..self.ranks.len() {
                        let ev = Ev::Rank(r, RankEvent::Install { step, attempt });
                        self.at(self.control_s, ev);
                    }
                }
                CoordCommand::Commit { .. } => self.committed_s = Some(self.now),
                // no faults at this fidelity: a deadline is never due before the commit
                CoordCommand::SetTimer { .. } => {}
                other => return Err(format!("the coordinator did not expect a fault: {other:?}")),
            }
        }
        Ok(())
    }

    fn rank(&mut self, r: usize, ev: RankEvent<()>) -> Result<(), String> {
        let cmds = self.ranks[r].on(ev).map_err(|e| format!("rank {r}: {e}"))?;
        for c in cmds {
            match c {
                RankCommand::Starting { instr, .. } => {
                    let cost = instr_seconds(&instr, self.compute, self.comm);
                    let index = self.spans[r].len();
                    let st = instr.parts()[0].0;
                    self.spans[r].push(Span {
                        instr,
                        step: self.schedule.steps[r].get(index).copied().unwrap_or(0),
                        chunk: self.schedule.stages[st].chunk,
                        start: self.now,
                        end: self.now + cost,
                    });
                }
                RankCommand::RunOp {
                    op_id,
                    copy,
                    step,
                    attempt,
                    op,
                } => {
                    // the instruction's parts run back to back; its outputs go out when it ends
                    let (mb, result) = empty_result(self.schedule, copy, &op);
                    let end = self.spans[r].last().map_or(self.now, |x| x.end);
                    let ev = RankEvent::OpDone {
                        op_id,
                        copy,
                        step,
                        attempt,
                        mb,
                        result,
                    };
                    self.at((end - self.now).max(0.0), Ev::Rank(r, ev));
                }
                RankCommand::Send {
                    to,
                    step,
                    attempt,
                    arrival,
                    data,
                } => {
                    self.messages += 1;
                    let delay = match arrival {
                        Arrival::Activation { .. } => self.comm.send_activation_s,
                        Arrival::Gradient { .. } => self.comm.send_gradient_s,
                    };
                    let ev = RankEvent::Deliver {
                        step,
                        attempt,
                        arrival,
                        data,
                    };
                    self.at(delay, Ev::Rank(to, ev));
                }
                RankCommand::TakeGrads {
                    copy,
                    step,
                    attempt,
                } => {
                    let ev = RankEvent::Grads {
                        copy,
                        step,
                        attempt,
                        grads: (),
                    };
                    self.at(0.0, Ev::Rank(r, ev));
                }
                RankCommand::Done { step, attempt, .. } => {
                    let ev = CoordEvent::Done {
                        rank: r,
                        step,
                        attempt,
                    };
                    self.at(self.control_s, Ev::Coord(ev));
                }
                RankCommand::InstallStage {
                    copy,
                    step,
                    attempt,
                } => {
                    // the stage owns its parameters: installing is a pointer swap
                    let ev = RankEvent::StageInstalled {
                        copy,
                        step,
                        attempt,
                    };
                    self.at(0.0, Ev::Rank(r, ev));
                }
                RankCommand::Installed { step, attempt } => {
                    let ev = CoordEvent::Installed {
                        rank: r,
                        step,
                        attempt,
                    };
                    self.at(self.control_s, Ev::Coord(ev));
                }
                RankCommand::Busy { .. } => return Err(format!("rank {r} was probed")),
            }
        }
        Ok(())
    }
}

/// Runs one step of `schedule` through a [`Coordinator`] and a [`RankMachine`] per rank, with
/// chunk compute `compute`, communication `comm` and control messages taking `control_s`.
pub fn run_step(
    schedule: &Schedule,
    compute: &Costs,
    comm: &CommCosts,
    control_s: f64,
) -> Result<Choreography, String> {
    let nr = schedule.programs.len();
    let mut w = World {
        schedule,
        compute,
        comm,
        control_s,
        queue: TimeQueue::default(),
        now: 0.0,
        coord: Coordinator::new(nr, 0, TimeoutPolicy::default()),
        ranks: (0..nr).map(|r| RankMachine::new(schedule, r)).collect(),
        spans: vec![Vec::new(); nr],
        done_s: 0.0,
        reduced_s: 0.0,
        committed_s: None,
        messages: 0,
    };
    for rank in 0..nr {
        w.coord(CoordEvent::RankUp { rank })?;
    }
    w.coord(CoordEvent::Begin { step: 1 })?;
    let mut events = 0u64;
    while let Some((at, (), ev)) = w.queue.pop() {
        w.now = at;
        events += 1;
        match ev {
            Ev::Coord(e) => w.coord(e)?,
            Ev::Rank(r, e) => w.rank(r, e)?,
        }
    }
    let committed_s = w
        .committed_s
        .ok_or("the step never committed (the schedule deadlocks)")?;
    let makespan = w
        .spans
        .iter()
        .filter_map(|v| v.last().map(|x| x.end))
        .fold(0.0, f64::max);
    let busy: Vec<f64> = w
        .spans
        .iter()
        .map(|v| v.iter().map(|x| x.end - x.start).sum())
        .collect();
    let bubble = busy.iter().map(|b| makespan - b).collect();
    let complete = w
        .spans
        .iter()
        .zip(&schedule.programs)
        .all(|(s, p)| s.len() == p.len());
    Ok(Choreography {
        timeline: Timeline {
            kind: schedule.kind,
            microbatches: schedule.microbatches,
            ranks: w.spans,
            makespan,
            busy,
            bubble,
            complete,
        },
        done_s: w.done_s,
        reduced_s: w.reduced_s,
        committed_s,
        messages: w.messages,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actors::schedule::{ScheduleKind, build, timeline};

    /// Without communication the choreography is the schedule's timeline: every span starts and
    /// ends where `schedule::timeline` puts it, for every schedule.
    #[test]
    fn free_communication_reproduces_the_timeline() {
        for kind in ScheduleKind::ALL {
            let s = build(kind, 4, 8).unwrap();
            let c = Costs::EXAMPLE;
            let t = timeline(&s, &c);
            let ch = run_step(&s, &c, &CommCosts::default(), 0.0).unwrap();
            assert!(ch.timeline.complete, "{kind}");
            assert_eq!(ch.timeline.ranks, t.ranks, "{kind}");
            assert_eq!(ch.timeline.makespan, t.makespan, "{kind}");
            assert_eq!(ch.committed_s, t.makespan, "{kind}");
        }
    }

    /// 1F1B on 2 ranks, 1 micro-batch: F = 1 s and B = 2 s of compute, all-to-all 0.5 s per
    /// forward and 1 s per backward chunk, sends 0.25 s, control messages 0.125 s, reduction 1 s.
    /// Both ranks open at 0.125; rank 0's F ends at 1.625 (1 + 0.5 exposed), the activation lands
    /// at 1.875; rank 1 runs F to 3.375 and B to 6.375 (2 + 1); the gradient lands at 6.625;
    /// rank 0's B ends at 9.625, its report arrives at 9.75; reduced at 10.75; the install
    /// reaches the ranks at 10.875 and their answers the coordinator at 11: committed.
    #[test]
    fn a_two_rank_step_by_hand() {
        let s = build(ScheduleKind::OneFOneB, 2, 1).unwrap();
        let compute = Costs {
            f: 1.0,
            b: 2.0,
            w: 1.0,
            fb: 3.0,
        };
        let comm = CommCosts {
            a2a_forward_s: 0.5,
            a2a_backward_s: 1.0,
            send_activation_s: 0.25,
            send_gradient_s: 0.25,
            dp_reduce_s: 1.0,
        };
        let ch = run_step(&s, &compute, &comm, 0.125).unwrap();
        let r0: Vec<(f64, f64)> = ch.timeline.ranks[0]
            .iter()
            .map(|x| (x.start, x.end))
            .collect();
        let r1: Vec<(f64, f64)> = ch.timeline.ranks[1]
            .iter()
            .map(|x| (x.start, x.end))
            .collect();
        assert_eq!(r0, vec![(0.125, 1.625), (6.625, 9.625)]);
        assert_eq!(r1, vec![(1.875, 3.375), (3.375, 6.375)]);
        assert_eq!(ch.done_s, 9.75);
        assert_eq!(ch.reduced_s, 10.75);
        assert_eq!(ch.committed_s, 11.0);
        assert_eq!(ch.messages, 2);
    }
}

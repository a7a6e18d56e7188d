//! The timeline: per-instruction costs turn a schedule into start/end times per rank (zero
//! communication latency), a makespan and a bubble per rank. It drives every rank's
//! [`RankExecutor`] in a discrete-event loop in virtual time, so the rule for when an
//! instruction may run lives in the executor alone.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde::Serialize;

use super::{Instr, Schedule, ScheduleKind};
use crate::core::executor::{ExecCommand, ExecEvent, RankExecutor};

/// Costs of one chunk: `f` forward, `b` full backward (input + weight), `w` weight part of `b`,
/// `fb` an overlapped forward+backward pair. `B*` costs `b − w`, `W` costs `w`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Costs {
    pub f: f64,
    pub b: f64,
    pub w: f64,
    pub fb: f64,
}

impl Costs {
    /// F=2, B=4 (W=1 inside), F&B=5: distinct values so every term of the bubble formulas shows.
    pub const EXAMPLE: Costs = Costs {
        f: 2.0,
        b: 4.0,
        w: 1.0,
        fb: 5.0,
    };

    /// Duration of one instruction.
    pub fn of(&self, instr: &Instr) -> f64 {
        match instr {
            Instr::F { .. } => self.f,
            Instr::B { .. } => self.b,
            Instr::BInput { .. } => self.b - self.w,
            Instr::W { .. } => self.w,
            Instr::FB { .. } => self.fb,
        }
    }
}

/// One executed instruction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Span {
    pub instr: Instr,
    /// 1-based step label (see `step_names`).
    pub step: u8,
    /// Local chunk of the (first) stage copy it runs: DualPipe 0 forward / 1 reverse direction,
    /// DualPipeV 0 on the way down / 1 on the way back; always 0 for 1F1B and ZB1P.
    pub chunk: usize,
    pub start: f64,
    pub end: f64,
}

/// Execution of a schedule in time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timeline {
    pub kind: ScheduleKind,
    pub microbatches: usize,
    /// Executed instructions per rank, in program order.
    pub ranks: Vec<Vec<Span>>,
    /// Latest end over all ranks.
    pub makespan: f64,
    /// Sum of instruction durations per rank.
    pub busy: Vec<f64>,
    /// `makespan − busy[r]`: idle time of rank r within the step.
    pub bubble: Vec<f64>,
    /// False if some instruction could never start (the schedule deadlocks; see `check`).
    pub complete: bool,
}

impl Timeline {
    /// The largest per-rank bubble.
    pub fn max_bubble(&self) -> f64 {
        self.bubble.iter().copied().fold(0.0, f64::max)
    }

    /// Time rank `r` is idle between its first start and its last end.
    pub fn inner_bubble(&self, r: usize) -> f64 {
        match (self.ranks[r].first(), self.ranks[r].last()) {
            (Some(a), Some(z)) => z.end - a.start - self.busy[r],
            _ => 0.0,
        }
    }
}

/// Events in virtual time (f64 seconds), taken earliest first, equal times by `key` and then in
/// posting order: a deterministic discrete-event queue for drivers of the machines.
pub struct TimeQueue<K, E> {
    heap: BinaryHeap<Due<K, E>>,
    seq: u64,
}

struct Due<K, E> {
    at: f64,
    key: K,
    seq: u64,
    event: E,
}

impl<K: Ord, E> PartialEq for Due<K, E> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl<K: Ord, E> Eq for Due<K, E> {}

impl<K: Ord, E> PartialOrd for Due<K, E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K: Ord, E> Ord for Due<K, E> {
    /// Reversed, so the max-heap pops the earliest (time, key, seq) first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.key.cmp(&self.key))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl<K: Ord, E> Default for TimeQueue<K, E> {
    fn default() -> Self {
        TimeQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<K: Ord, E> TimeQueue<K, E> {
    pub fn push(&mut self, at: f64, key: K, event: E) {
        self.seq += 1;
        self.heap.push(Due {
            at,
            key,
            seq: self.seq,
            event,
        });
    }

    /// The earliest event: `(time, key, event)`.
    pub fn pop(&mut self) -> Option<(f64, K, E)> {
        self.heap.pop().map(|d| (d.at, d.key, d.event))
    }
}

/// Run `schedule` with `costs` by driving every rank's [`RankExecutor`] in virtual time: events
/// are taken in (time, rank) order; a `Run` handed out at time t occupies its rank (the executor
/// runs one instruction at a time) until t + its cost, when `Completed` is fed back; `Send`s are
/// delivered as `Arrived` at that completion time (communication takes no time). So each
/// instruction starts at max(its rank is free, its inputs have arrived). Bubble of rank r =
/// makespan − busy time of rank r.
pub fn timeline(schedule: &Schedule, costs: &Costs) -> Timeline {
    let s = schedule;
    let nr = s.programs.len();
    let mut ex: Vec<RankExecutor> = (0..nr).map(|r| RankExecutor::new(s, r)).collect();
    let mut finished = vec![false; nr];
    let mut ranks: Vec<Vec<Span>> = s
        .programs
        .iter()
        .map(|p| Vec::with_capacity(p.len()))
        .collect();
    let mut queue: TimeQueue<usize, ExecEvent> = TimeQueue::default();
    for r in 0..nr {
        queue.push(0.0, r, ExecEvent::Start);
    }
    while let Some((now, r, event)) = queue.pop() {
        for cmd in ex[r].on(event) {
            match cmd {
                ExecCommand::Run(instr) => {
                    // A handed-out instruction does not advance the count: it is the next one.
                    let index = ex[r].completed();
                    let end = now + costs.of(&instr);
                    let st = instr.parts()[0].0;
                    ranks[r].push(Span {
                        instr,
                        chunk: s.stages[st].chunk,
                        step: s
                            .steps
                            .get(r)
                            .and_then(|v| v.get(index))
                            .copied()
                            .unwrap_or(0),
                        start: now,
                        end,
                    });
                    queue.push(end, r, ExecEvent::Completed(instr));
                }
                ExecCommand::Send { to, arrival } => {
                    queue.push(now, to, ExecEvent::Arrived(arrival));
                }
                ExecCommand::Finished => finished[r] = true,
            }
        }
    }
    let complete = finished.iter().all(|&f| f);
    let makespan = ranks
        .iter()
        .filter_map(|v| v.last().map(|x| x.end))
        .fold(0.0, f64::max);
    let busy: Vec<f64> = ranks
        .iter()
        .map(|v| v.iter().map(|x| x.end - x.start).sum())
        .collect();
    let bubble = busy.iter().map(|b| makespan - b).collect();
    Timeline {
        kind: s.kind,
        microbatches: s.microbatches,
        ranks,
        makespan,
        busy,
        bubble,
        complete,
    }
}

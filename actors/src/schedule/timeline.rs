//! The timeline: per-instruction costs turn a schedule into start/end times per rank (zero
//! communication latency), a makespan and a bubble per rank.

use serde::Serialize;

use super::{Instr, Schedule, ScheduleKind};

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

/// Cell end times, indexed stage * n + mb.
struct Ends {
    f: Vec<Option<f64>>,
    b: Vec<Option<f64>>,
}

/// When `instr`'s inputs are ready (None if some have not been produced yet).
fn ready_at(s: &Schedule, e: &Ends, instr: &Instr) -> Option<f64> {
    let n = s.microbatches;
    let fwd = |stage: usize, mb: usize| -> Option<f64> {
        match s.stages[stage].prev {
            None => Some(0.0),
            Some(p) => e.f[p * n + mb],
        }
    };
    let bwd = |stage: usize, mb: usize| -> Option<f64> {
        let own = e.f[stage * n + mb]?;
        match s.stages[stage].next {
            None => Some(own),
            Some(nx) => e.b[nx * n + mb].map(|g| g.max(own)),
        }
    };
    match *instr {
        Instr::F { stage, mb } => fwd(stage, mb),
        Instr::B { stage, mb } | Instr::BInput { stage, mb } => bwd(stage, mb),
        Instr::W { stage, mb } => e.b[stage * n + mb],
        Instr::FB { f, b } => Some(fwd(f.0, f.1)?.max(bwd(b.0, b.1)?)),
    }
}

/// Run `schedule` with `costs`: each instruction starts at max(its rank is free, its inputs have
/// arrived), communication takes no time. Bubble of rank r = makespan − busy time of rank r.
pub fn timeline(schedule: &Schedule, costs: &Costs) -> Timeline {
    let s = schedule;
    let n = s.microbatches;
    let cells = s.stages.len() * n;
    let mut e = Ends {
        f: vec![None; cells],
        b: vec![None; cells],
    };
    let mut pc = vec![0usize; s.programs.len()];
    let mut free = vec![0.0f64; s.programs.len()];
    let mut ranks: Vec<Vec<Span>> = s
        .programs
        .iter()
        .map(|p| Vec::with_capacity(p.len()))
        .collect();
    loop {
        let mut progressed = false;
        for (r, prog) in s.programs.iter().enumerate() {
            while let Some(instr) = prog.get(pc[r]) {
                let Some(ready) = ready_at(s, &e, instr) else {
                    break;
                };
                let start = free[r].max(ready);
                let end = start + costs.of(instr);
                if let Some((st, mb)) = instr.forward() {
                    e.f[st * n + mb] = Some(end);
                }
                if let Some((st, mb)) = instr.backward() {
                    e.b[st * n + mb] = Some(end);
                }
                let st = instr.parts()[0].0;
                ranks[r].push(Span {
                    instr: *instr,
                    chunk: s.stages[st].chunk,
                    step: s
                        .steps
                        .get(r)
                        .and_then(|v| v.get(pc[r]))
                        .copied()
                        .unwrap_or(0),
                    start,
                    end,
                });
                free[r] = end;
                pc[r] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    let complete = s.programs.iter().zip(&pc).all(|(p, &c)| c == p.len());
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
        microbatches: n,
        ranks,
        makespan,
        busy,
        bubble,
        complete,
    }
}

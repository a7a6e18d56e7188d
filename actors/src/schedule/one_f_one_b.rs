//! The classic 1F1B schedule: rank r runs P−r−1 warm-up forwards, then alternates one forward
//! and one full backward, then drains the remaining backwards.

use super::{Instr, Schedule, ScheduleKind, linear_placement};

pub(super) fn build(p: usize, n: usize) -> Schedule {
    let (stages, lanes) = linear_placement(p, n);
    let mut programs = Vec::with_capacity(p);
    let mut steps = Vec::with_capacity(p);
    for r in 0..p {
        let warmup = (p - r - 1).min(n);
        let mut prog = Vec::with_capacity(2 * n);
        let mut step = Vec::with_capacity(2 * n);
        for mb in 0..warmup {
            prog.push(Instr::F { stage: r, mb });
            step.push(1);
        }
        for i in 0..n - warmup {
            prog.push(Instr::F {
                stage: r,
                mb: warmup + i,
            });
            prog.push(Instr::B { stage: r, mb: i });
            step.extend([2, 2]);
        }
        for mb in n - warmup..n {
            prog.push(Instr::B { stage: r, mb });
            step.push(3);
        }
        programs.push(prog);
        steps.push(step);
    }
    Schedule {
        kind: ScheduleKind::OneFOneB,
        ranks: p,
        microbatches: n,
        stages,
        lanes,
        programs,
        steps,
        step_counts: None,
    }
}

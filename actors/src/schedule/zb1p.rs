//! The zero-bubble ZB-H1 schedule: 1F1B order with the backward split into `B*` (input grad)
//! and `W` (weight grad); rank r keeps up to r weight passes pending, drained in the cool-down.
//!
//! Deferring r weight passes on rank r gives every rank the same peak stash (P micro-batches, as
//! rank 0 in 1F1B), lets input gradients travel at `B*` speed and fills the cool-down with `W`:
//! with zero-latency links the bubble is (P−1)(F+B−2W) on every rank (B = full backward).

use std::collections::VecDeque;

use super::{Instr, Schedule, ScheduleKind, linear_placement};

pub(super) fn build(p: usize, n: usize) -> Schedule {
    let (stages, lanes) = linear_placement(p, n);
    let mut programs = Vec::with_capacity(p);
    let mut steps = Vec::with_capacity(p);
    for r in 0..p {
        let warmup = (p - r - 1).min(n);
        // Weight passes rank r may keep pending (its stash then peaks at P like rank 0's).
        let defer = r;
        let mut prog = Vec::with_capacity(3 * n);
        let mut step = Vec::with_capacity(3 * n);
        let mut pending: VecDeque<usize> = VecDeque::new();
        // B* of `mb`, then the oldest pending W once more than `defer` are pending.
        let mut backward = |mb: usize, label: u8, prog: &mut Vec<Instr>, step: &mut Vec<u8>| {
            prog.push(Instr::BInput { stage: r, mb });
            step.push(label);
            pending.push_back(mb);
            if pending.len() > defer
                && let Some(w) = pending.pop_front()
            {
                prog.push(Instr::W { stage: r, mb: w });
                step.push(label);
            }
        };
        for mb in 0..warmup {
            prog.push(Instr::F { stage: r, mb });
            step.push(1);
        }
        for i in 0..n - warmup {
            prog.push(Instr::F {
                stage: r,
                mb: warmup + i,
            });
            step.push(2);
            backward(i, 2, &mut prog, &mut step);
        }
        for mb in n - warmup..n {
            backward(mb, 3, &mut prog, &mut step);
        }
        for mb in pending {
            prog.push(Instr::W { stage: r, mb });
            step.push(4);
        }
        programs.push(prog);
        steps.push(step);
    }
    Schedule {
        kind: ScheduleKind::Zb1p,
        ranks: p,
        microbatches: n,
        stages,
        lanes,
        programs,
        steps,
        step_counts: None,
    }
}

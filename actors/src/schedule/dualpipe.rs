//! DualPipe and DualPipeV: placement of the stage copies and the 8-step program of every rank
//! (reference §5), including the zero-bubble `B*` switch, the FIFO `W` queue and step counts.

use std::collections::VecDeque;

use super::{Instr, Lane, Schedule, ScheduleKind, StageSlot};

/// The 8 per-rank repetition counts of DualPipe (`ranks` = P) or DualPipeV (`ranks` = R) for
/// `microbatches` = N, or None when the kind is 1F1B/ZB1P or the configuration is invalid.
///
/// DualPipe: half_ranks = P/2, h = min(r, P−1−r), half_chunks = N/2. DualPipeV: half_ranks = R,
/// h = r, half_chunks = N. Counts: `[(half_ranks−h−1)·2, h+1, half_ranks−h−1,
/// half_chunks−2·half_ranks+h+1, half_ranks−h−1, h+1, half_ranks−h−1, h+1]`.
pub fn step_counts(
    kind: ScheduleKind,
    ranks: usize,
    microbatches: usize,
    rank: usize,
) -> Option<[usize; 8]> {
    super::validate(kind, ranks, microbatches).ok()?;
    if rank >= ranks {
        return None;
    }
    let (half_ranks, h, half_chunks) = match kind {
        ScheduleKind::DualPipe => (ranks / 2, rank.min(ranks - 1 - rank), microbatches / 2),
        ScheduleKind::DualPipeV => (ranks, rank, microbatches),
        _ => return None,
    };
    Some(counts(half_ranks, h, half_chunks))
}

fn counts(half_ranks: usize, h: usize, half_chunks: usize) -> [usize; 8] {
    let a = half_ranks - h - 1;
    [
        2 * a,
        h + 1,
        a,
        half_chunks + h + 1 - 2 * half_ranks,
        a,
        h + 1,
        a,
        h + 1,
    ]
}

/// DualPipe on `p` ranks: copies `0..p` form the forward lane (micro-batches `0..n/2`, copy `v`
/// on rank `v`), copies `p..2p` the reverse lane (micro-batches `n/2..n`, copy `p+s` runs model
/// stage `s` on rank `p−1−s`).
pub(super) fn build_dualpipe(p: usize, n: usize) -> Schedule {
    let half = p / 2;
    let mut stages = Vec::with_capacity(2 * p);
    for v in 0..2 * p {
        let (dir, model_stage) = (v / p, v % p);
        let rank = if dir == 0 { v } else { 2 * p - 1 - v };
        let first_in_lane = dir * p;
        let last_in_lane = dir * p + p - 1;
        stages.push(StageSlot {
            stage: v,
            model_stage,
            rank,
            chunk: dir,
            phase: dir ^ usize::from(rank >= half),
            lane: dir,
            prev: (v > first_in_lane).then(|| v - 1),
            next: (v < last_in_lane).then_some(v + 1),
        });
    }
    let lanes = vec![
        Lane {
            stages: (0..p).collect(),
            microbatches: 0..n / 2,
        },
        Lane {
            stages: (p..2 * p).collect(),
            microbatches: n / 2..n,
        },
    ];
    let mut programs = Vec::with_capacity(p);
    let mut steps = Vec::with_capacity(p);
    let mut all_counts = Vec::with_capacity(p);
    for r in 0..p {
        let h = r.min(p - 1 - r);
        let c = counts(half, h, n / 2);
        let fwd = Source {
            stage: r,
            mb_base: 0,
        };
        let rev = Source {
            stage: 2 * p - 1 - r,
            mb_base: n / 2,
        };
        let phases = if r < half { [fwd, rev] } else { [rev, fwd] };
        let middle = h == half - 1;
        let (prog, step) = eight_steps(&c, phases, middle, h);
        programs.push(prog);
        steps.push(step);
        all_counts.push(c);
    }
    Schedule {
        kind: ScheduleKind::DualPipe,
        ranks: p,
        microbatches: n,
        stages,
        lanes,
        programs,
        steps,
        step_counts: Some(all_counts),
    }
}

/// DualPipeV on `r_count` ranks: one lane of `2R` copies; copy `s` runs model stage `s` on rank
/// `s` for `s < R` and on rank `2R−1−s` otherwise; all micro-batches enter and leave at rank 0.
pub(super) fn build_dualpipev(r_count: usize, n: usize) -> Schedule {
    let s_count = 2 * r_count;
    let stages = (0..s_count)
        .map(|s| {
            let down = s < r_count;
            StageSlot {
                stage: s,
                model_stage: s,
                rank: if down { s } else { s_count - 1 - s },
                chunk: usize::from(!down),
                phase: usize::from(!down),
                lane: 0,
                prev: s.checked_sub(1),
                next: (s + 1 < s_count).then_some(s + 1),
            }
        })
        .collect();
    let lanes = vec![Lane {
        stages: (0..s_count).collect(),
        microbatches: 0..n,
    }];
    let mut programs = Vec::with_capacity(r_count);
    let mut steps = Vec::with_capacity(r_count);
    let mut all_counts = Vec::with_capacity(r_count);
    for r in 0..r_count {
        let c = counts(r_count, r, n);
        let phases = [
            Source {
                stage: r,
                mb_base: 0,
            },
            Source {
                stage: s_count - 1 - r,
                mb_base: 0,
            },
        ];
        let (prog, step) = eight_steps(&c, phases, r == r_count - 1, r);
        programs.push(prog);
        steps.push(step);
        all_counts.push(c);
    }
    Schedule {
        kind: ScheduleKind::DualPipeV,
        ranks: r_count,
        microbatches: n,
        stages,
        lanes,
        programs,
        steps,
        step_counts: Some(all_counts),
    }
}

/// What one phase of a rank runs: its stage copy and the id of its first micro-batch (the k-th
/// forward and the k-th backward of the phase handle micro-batch `mb_base + k`).
#[derive(Clone, Copy)]
struct Source {
    stage: usize,
    mb_base: usize,
}

/// Emits one rank's instructions, keeping per-phase forward/backward cursors and the FIFO of
/// deferred weight passes (reference `WeightGradStore`).
struct Emitter {
    phases: [Source; 2],
    next_f: [usize; 2],
    next_b: [usize; 2],
    deferred: VecDeque<(usize, usize)>,
    prog: Vec<Instr>,
    steps: Vec<u8>,
    step: u8,
}

impl Emitter {
    fn take_f(&mut self, phase: usize) -> (usize, usize) {
        let k = self.next_f[phase];
        self.next_f[phase] += 1;
        (self.phases[phase].stage, self.phases[phase].mb_base + k)
    }

    fn take_b(&mut self, phase: usize) -> (usize, usize) {
        let k = self.next_b[phase];
        self.next_b[phase] += 1;
        (self.phases[phase].stage, self.phases[phase].mb_base + k)
    }

    fn push(&mut self, i: Instr) {
        self.prog.push(i);
        self.steps.push(self.step);
    }

    fn f(&mut self, phase: usize) {
        let (stage, mb) = self.take_f(phase);
        self.push(Instr::F { stage, mb });
    }

    /// A backward chunk; with `zb` its weight gradient is queued for a later `W`.
    fn b(&mut self, phase: usize, zb: bool) {
        let (stage, mb) = self.take_b(phase);
        if zb {
            self.deferred.push_back((stage, mb));
            self.push(Instr::BInput { stage, mb });
        } else {
            self.push(Instr::B { stage, mb });
        }
    }

    fn w(&mut self) {
        let (stage, mb) = self
            .deferred
            .pop_front()
            .expect("DualPipe step logic pops a W only after queueing a B*");
        self.push(Instr::W { stage, mb });
    }

    fn fb(&mut self, f_phase: usize, b_phase: usize) {
        let f = self.take_f(f_phase);
        let b = self.take_b(b_phase);
        self.push(Instr::FB { f, b });
    }
}

/// The 8 steps of `DualPipe.step` for one rank with counts `c`; `middle` marks the rank whose
/// first (F0&B1) of step 4 is not overlapped; `h` decides where step 6 switches to `B*`.
fn eight_steps(
    c: &[usize; 8],
    phases: [Source; 2],
    middle: bool,
    h: usize,
) -> (Vec<Instr>, Vec<u8>) {
    let mut e = Emitter {
        phases,
        next_f: [0, 0],
        next_b: [0, 0],
        deferred: VecDeque::new(),
        prog: Vec::new(),
        steps: Vec::new(),
        step: 1,
    };
    // Step 1: warm-up, phase 0 only.
    for _ in 0..c[0] {
        e.f(0);
    }
    e.step = 2;
    for _ in 0..c[1] {
        e.f(0);
        e.f(1);
    }
    e.step = 3;
    for _ in 0..c[2] {
        e.b(1, true);
        e.w();
        e.f(1);
    }
    e.step = 4;
    for i in 0..c[3] {
        if i == 0 && middle {
            e.f(0);
            e.b(1, false);
        } else {
            e.fb(0, 1);
        }
        e.fb(1, 0);
    }
    e.step = 5;
    for _ in 0..c[4] {
        e.b(1, false);
        e.fb(1, 0);
    }
    e.step = 6;
    let mut zb = false;
    for i in 0..c[5] {
        if i == c[5] / 2 && !h.is_multiple_of(2) {
            zb = true;
        }
        e.b(1, zb);
        if i == c[5] / 2 && h.is_multiple_of(2) {
            zb = true;
        }
        e.b(0, zb);
    }
    e.step = 7;
    for _ in 0..c[6] {
        e.w();
        e.b(0, true);
    }
    e.step = 8;
    for _ in 0..c[7] {
        e.w();
    }
    debug_assert!(e.deferred.is_empty());
    (e.prog, e.steps)
}

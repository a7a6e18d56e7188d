//! The schedule checker: proves completeness (one F, one backward, one W per B*) and
//! deadlock-freedom under buffered message passing; measures activations and messages.

use std::fmt;

use serde::Serialize;

use super::{Instr, Schedule, ScheduleError};

/// At most this many problems are listed in [`ScheduleError::Incomplete`].
const MAX_PROBLEMS: usize = 16;

/// One rank stuck on one instruction in a deadlock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocked {
    pub rank: usize,
    /// Position of the blocked instruction in the rank's program.
    pub index: usize,
    pub instr: Instr,
    /// What it waits for, e.g. `activation of F(s2,m3) from rank 2`.
    pub waiting_for: String,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} blocked at #{} {} waiting for {}",
            self.rank, self.index, self.instr, self.waiting_for
        )
    }
}

/// Per-rank results of a successful check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RankCheck {
    pub instructions: usize,
    pub forwards: usize,
    /// Backward passes (B, B* and the B of F&B).
    pub backwards: usize,
    /// Of those, zero-bubble split ones (B*), each paired with one W.
    pub split_backwards: usize,
    pub weight_passes: usize,
    pub overlapped_pairs: usize,
    /// Peak number of micro-batches whose forward ran here and whose backward (B or B*) has not
    /// (inside an F&B pair the forward is counted before the backward releases).
    pub peak_activations: usize,
    /// Like `peak_activations`, but a B* keeps its stash until its W runs.
    pub peak_stash: usize,
    /// Activation messages sent to another rank.
    pub sent_activations: usize,
    /// Gradient messages sent to another rank.
    pub sent_gradients: usize,
    pub received: usize,
}

/// Result of [`check`]: the schedule is complete and deadlock-free; these are its measures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub ranks: Vec<RankCheck>,
    /// Cross-rank messages (activations + gradients) of one training step.
    pub messages: usize,
    /// `messages_per_step[k]`: messages sent by instructions with step label `k + 1`.
    pub messages_per_step: Vec<usize>,
    /// Local hand-offs between two copies on the same rank (DualPipeV turn), not messages.
    pub local_handoffs: usize,
    /// Number of sweeps over the ranks the message-driven execution needed.
    pub sweeps: usize,
}

/// Status of one (stage copy, micro-batch) cell.
#[derive(Clone, Copy, Default)]
struct Cell {
    f: bool,
    /// Backward done (B, B* or B of F&B).
    b: bool,
    /// The backward was a B* (its W is owed).
    split: bool,
    w: bool,
}

/// Check `schedule`: every stage copy × micro-batch of its lane has exactly one F and exactly one
/// backward (B, or B* plus exactly one later W on the same rank), every instruction sits on the
/// rank holding its stage, and executing each rank's list in order — an instruction runs only
/// once its inputs have arrived, sends are buffered without bound — finishes every list.
pub fn check(schedule: &Schedule) -> Result<CheckReport, ScheduleError> {
    completeness(schedule)?;
    let sweeps = execute(schedule)?;
    Ok(measure(schedule, sweeps))
}

fn completeness(s: &Schedule) -> Result<(), ScheduleError> {
    let n = s.microbatches;
    let nst = s.stages.len();
    let mut problems = Vec::new();
    let mut note = |p: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        }
    };
    if s.programs.len() != s.ranks {
        note(format!(
            "{} programs for {} ranks",
            s.programs.len(),
            s.ranks
        ));
    }
    // Counts per cell, indexed stage * n + mb.
    let mut f = vec![0usize; nst * n];
    let mut b = vec![0usize; nst * n];
    let mut bi = vec![0usize; nst * n];
    let mut w = vec![0usize; nst * n];
    // Position of the B* and W of a cell, to check order.
    let mut bi_at = vec![usize::MAX; nst * n];
    let mut w_at = vec![usize::MAX; nst * n];
    for (rank, prog) in s.programs.iter().enumerate() {
        for (idx, instr) in prog.iter().enumerate() {
            let mut ok = true;
            for (stage, mb) in instr.parts() {
                if stage >= nst || mb >= n {
                    note(format!(
                        "rank {rank} #{idx} {instr}: stage or micro-batch out of range"
                    ));
                    ok = false;
                    continue;
                }
                if s.stages[stage].rank != rank {
                    note(format!(
                        "rank {rank} #{idx} {instr}: stage s{stage} lives on rank {}",
                        s.stages[stage].rank
                    ));
                    ok = false;
                }
                if s.lane_of(mb).map(|l| l.stages.contains(&stage)) != Some(true) {
                    note(format!(
                        "rank {rank} #{idx} {instr}: micro-batch m{mb} does not pass stage s{stage}"
                    ));
                    ok = false;
                }
            }
            if !ok {
                continue;
            }
            if let Some((st, mb)) = instr.forward() {
                f[st * n + mb] += 1;
            }
            match *instr {
                Instr::B { stage, mb } => b[stage * n + mb] += 1,
                Instr::FB { b: (stage, mb), .. } => b[stage * n + mb] += 1,
                Instr::BInput { stage, mb } => {
                    bi[stage * n + mb] += 1;
                    bi_at[stage * n + mb] = idx;
                }
                Instr::W { stage, mb } => {
                    w[stage * n + mb] += 1;
                    w_at[stage * n + mb] = idx;
                }
                Instr::F { .. } => {}
            }
        }
    }
    for lane in &s.lanes {
        for &stage in &lane.stages {
            for mb in lane.microbatches.clone() {
                let c = stage * n + mb;
                let cell = format!("s{stage} m{mb}");
                if f[c] != 1 {
                    note(format!("{cell}: {} forwards, expected 1", f[c]));
                }
                if b[c] + bi[c] != 1 {
                    note(format!(
                        "{cell}: {} backwards ({} B, {} B*), expected 1",
                        b[c] + bi[c],
                        b[c],
                        bi[c]
                    ));
                }
                if w[c] != bi[c] {
                    note(format!(
                        "{cell}: {} W for {} B*, expected one W per B*",
                        w[c], bi[c]
                    ));
                } else if bi[c] == 1 && w_at[c] < bi_at[c] {
                    note(format!("{cell}: W runs before its B*"));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ScheduleError::Incomplete { problems })
    }
}

/// What instruction `instr` still waits for, given the cell table; None when it can run.
fn waiting_for(s: &Schedule, cells: &[Cell], instr: &Instr) -> Option<String> {
    let n = s.microbatches;
    let fwd_ready = |stage: usize, mb: usize| -> Option<String> {
        let prev = s.stages[stage].prev?;
        (!cells[prev * n + mb].f).then(|| {
            format!(
                "activation of F(s{prev},m{mb}) from rank {}",
                s.stages[prev].rank
            )
        })
    };
    let bwd_ready = |stage: usize, mb: usize| -> Option<String> {
        if !cells[stage * n + mb].f {
            return Some(format!("its own F(s{stage},m{mb})"));
        }
        let next = s.stages[stage].next?;
        (!cells[next * n + mb].b).then(|| {
            format!(
                "gradient of B(s{next},m{mb}) from rank {}",
                s.stages[next].rank
            )
        })
    };
    match *instr {
        Instr::F { stage, mb } => fwd_ready(stage, mb),
        Instr::B { stage, mb } | Instr::BInput { stage, mb } => bwd_ready(stage, mb),
        Instr::W { stage, mb } => {
            (!cells[stage * n + mb].b).then(|| format!("its own B*(s{stage},m{mb})"))
        }
        Instr::FB { f, b } => fwd_ready(f.0, f.1).or_else(|| bwd_ready(b.0, b.1)),
    }
}

fn apply(n: usize, cells: &mut [Cell], instr: &Instr) {
    match *instr {
        Instr::F { stage, mb } => cells[stage * n + mb].f = true,
        Instr::B { stage, mb } => cells[stage * n + mb].b = true,
        Instr::BInput { stage, mb } => {
            cells[stage * n + mb].b = true;
            cells[stage * n + mb].split = true;
        }
        Instr::W { stage, mb } => cells[stage * n + mb].w = true,
        Instr::FB { f, b } => {
            cells[f.0 * n + f.1].f = true;
            cells[b.0 * n + b.1].b = true;
        }
    }
}

/// Message-driven execution: sweep over ranks, each running its list in order while the next
/// instruction's inputs are present, until all lists finish or a sweep makes no progress.
/// Returns the number of sweeps.
fn execute(s: &Schedule) -> Result<usize, ScheduleError> {
    let n = s.microbatches;
    let mut cells = vec![Cell::default(); s.stages.len() * n];
    let mut pc = vec![0usize; s.programs.len()];
    let mut sweeps = 0;
    loop {
        sweeps += 1;
        let mut progressed = false;
        for (rank, prog) in s.programs.iter().enumerate() {
            while let Some(instr) = prog.get(pc[rank]) {
                if waiting_for(s, &cells, instr).is_some() {
                    break;
                }
                apply(n, &mut cells, instr);
                pc[rank] += 1;
                progressed = true;
            }
        }
        let done = s.programs.iter().zip(&pc).all(|(p, &c)| c == p.len());
        if done {
            debug_assert!(cells.iter().all(|c| c.w == c.split));
            return Ok(sweeps);
        }
        if !progressed {
            let blocked = s
                .programs
                .iter()
                .enumerate()
                .filter_map(|(rank, prog)| {
                    let instr = prog.get(pc[rank])?;
                    Some(Blocked {
                        rank,
                        index: pc[rank],
                        instr: *instr,
                        waiting_for: waiting_for(s, &cells, instr).unwrap_or_default(),
                    })
                })
                .collect();
            return Err(ScheduleError::Deadlock { blocked });
        }
    }
}

fn measure(s: &Schedule, sweeps: usize) -> CheckReport {
    let labels = s
        .steps
        .iter()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(0) as usize;
    let mut per_step = vec![0usize; labels];
    let mut messages = 0;
    let mut local = 0;
    let mut received = vec![0usize; s.ranks];
    let mut ranks = Vec::with_capacity(s.ranks);
    for (rank, prog) in s.programs.iter().enumerate() {
        let mut rc = RankCheck {
            instructions: prog.len(),
            forwards: 0,
            backwards: 0,
            split_backwards: 0,
            weight_passes: 0,
            overlapped_pairs: 0,
            peak_activations: 0,
            peak_stash: 0,
            sent_activations: 0,
            sent_gradients: 0,
            received: 0,
        };
        let (mut live, mut stash) = (0usize, 0usize);
        for (idx, instr) in prog.iter().enumerate() {
            let label = s
                .steps
                .get(rank)
                .and_then(|v| v.get(idx))
                .copied()
                .unwrap_or(0) as usize;
            let mut send = |to: Option<usize>, kind: &mut usize| {
                if let Some(to) = to {
                    if to == rank {
                        local += 1;
                    } else {
                        *kind += 1;
                        messages += 1;
                        received[to] += 1;
                        if label >= 1 {
                            per_step[label - 1] += 1;
                        }
                    }
                }
            };
            if let Some((stage, _)) = instr.forward() {
                rc.forwards += 1;
                live += 1;
                stash += 1;
                rc.peak_activations = rc.peak_activations.max(live);
                rc.peak_stash = rc.peak_stash.max(stash);
                send(s.next_rank(stage), &mut rc.sent_activations);
            }
            if let Some((stage, _)) = instr.backward() {
                rc.backwards += 1;
                live -= 1;
                if matches!(instr, Instr::BInput { .. }) {
                    rc.split_backwards += 1;
                } else {
                    stash -= 1;
                }
                // The gradient of an entry copy has nowhere to go; a local turn is not a message.
                send(s.prev_rank(stage), &mut rc.sent_gradients);
            }
            match instr {
                Instr::W { .. } => {
                    rc.weight_passes += 1;
                    stash -= 1;
                }
                Instr::FB { .. } => rc.overlapped_pairs += 1,
                _ => {}
            }
        }
        ranks.push(rc);
    }
    for (rc, r) in ranks.iter_mut().zip(received) {
        rc.received = r;
    }
    CheckReport {
        ranks,
        messages,
        messages_per_step: per_step,
        local_handoffs: local,
        sweeps,
    }
}

//! The schedule checker: proves completeness (one F, one backward, one W per B*, each on the
//! rank of its stage) by counting, and deadlock-freedom under buffered message passing by
//! driving every rank's [`RankExecutor`] with instant delivery, so the rule for when an
//! instruction may run lives in the executor alone; measures activations and messages.

use std::collections::VecDeque;
use std::fmt;

use serde::Serialize;

use super::{Instr, Schedule, ScheduleError};
use crate::core::executor::{Arrival, ExecCommand, ExecEvent, RankExecutor};

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

/// Check `schedule`: every stage copy × micro-batch of its lane has exactly one F and exactly one
/// backward (B, or B* plus exactly one later W on the same rank), every instruction sits on the
/// rank holding its stage (structural checks), and every rank's [`RankExecutor`] — the same
/// machine that runs a real step — reaches `Finished` when sends are delivered instantly and
/// buffered without bound and every instruction completes as soon as it is handed out.
pub fn check(schedule: &Schedule) -> Result<CheckReport, ScheduleError> {
    completeness(schedule)?;
    let traffic = execute(schedule)?;
    Ok(measure(schedule, traffic))
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

/// What the execution observed: the sweeps it took and the `Send`s the executors issued.
struct Traffic {
    sweeps: usize,
    sent_activations: Vec<usize>,
    sent_gradients: Vec<usize>,
    received: Vec<usize>,
    local_handoffs: usize,
    /// `per_step[k]`: cross-rank messages sent by instructions with step label `k + 1`.
    per_step: Vec<usize>,
}

/// Instant-delivery execution: every rank gets `Start`; in each sweep over the ranks, a rank
/// takes the events in its inbox in order, completes every `Run` at once (feeding `Completed`
/// back) and posts every `Send` to the target rank's inbox as `Arrived` (a rank later in the
/// sweep sees it in the same sweep). Ends when every executor has said `Finished`, or fails with
/// the stuck ranks when a sweep runs nothing.
fn execute(s: &Schedule) -> Result<Traffic, ScheduleError> {
    let nr = s.programs.len();
    let labels = s
        .steps
        .iter()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(0) as usize;
    let mut t = Traffic {
        sweeps: 0,
        sent_activations: vec![0; nr],
        sent_gradients: vec![0; nr],
        received: vec![0; nr],
        local_handoffs: 0,
        per_step: vec![0; labels],
    };
    let mut ex: Vec<RankExecutor> = (0..nr).map(|r| RankExecutor::new(s, r)).collect();
    let mut inbox: Vec<VecDeque<ExecEvent>> = (0..nr)
        .map(|_| VecDeque::from([ExecEvent::Start]))
        .collect();
    let mut finished = vec![false; nr];
    loop {
        t.sweeps += 1;
        let mut progressed = false;
        for r in 0..nr {
            while let Some(event) = inbox[r].pop_front() {
                for cmd in ex[r].on(event) {
                    match cmd {
                        ExecCommand::Run(instr) => {
                            progressed = true;
                            inbox[r].push_back(ExecEvent::Completed(instr));
                        }
                        ExecCommand::Send { to, arrival } => {
                            // Sends answer a `Completed`: the sender is the last completed one.
                            let index = ex[r].completed() - 1;
                            let label = s
                                .steps
                                .get(r)
                                .and_then(|v| v.get(index))
                                .copied()
                                .unwrap_or(0) as usize;
                            t.count(r, to, arrival, label);
                            inbox[to].push_back(ExecEvent::Arrived(arrival));
                        }
                        ExecCommand::Finished => finished[r] = true,
                    }
                }
            }
        }
        if finished.iter().all(|&f| f) {
            return Ok(t);
        }
        if !progressed {
            let blocked = ex
                .iter()
                .filter(|e| !e.is_finished())
                .map(|e| {
                    let index = e.completed();
                    let instr = e.program()[index];
                    Blocked {
                        rank: e.rank,
                        index,
                        instr,
                        waiting_for: describe_wait(s, e, &instr),
                    }
                })
                .collect();
            return Err(ScheduleError::Deadlock { blocked });
        }
    }
}

impl Traffic {
    fn count(&mut self, from: usize, to: usize, arrival: Arrival, label: usize) {
        if to == from {
            self.local_handoffs += 1;
            return;
        }
        match arrival {
            Arrival::Activation { .. } => self.sent_activations[from] += 1,
            Arrival::Gradient { .. } => self.sent_gradients[from] += 1,
        }
        self.received[to] += 1;
        if label >= 1 {
            self.per_step[label - 1] += 1;
        }
    }
}

/// What the stuck executor `e` (next instruction `instr`) waits for, naming the sender of a
/// missing message: the message is found by offering a copy of the executor each message
/// `instr` could take and keeping the first that changes what it waits for. Otherwise (its own
/// F or B* is missing) the executor's own words.
fn describe_wait(s: &Schedule, e: &RankExecutor, instr: &Instr) -> String {
    let words = e.waiting_for().unwrap_or_default();
    for (stage, mb) in instr.parts() {
        for arrival in [
            Arrival::Activation { stage, mb },
            Arrival::Gradient { stage, mb },
        ] {
            let mut probe = e.clone();
            probe.on(ExecEvent::Arrived(arrival));
            if probe.waiting_for().as_deref() == Some(words.as_str()) {
                continue;
            }
            let from = match arrival {
                Arrival::Activation { .. } => s.stages[stage].prev.map(|p| ("activation", 'F', p)),
                Arrival::Gradient { .. } => s.stages[stage].next.map(|n| ("gradient", 'B', n)),
            };
            if let Some((what, pass, other)) = from {
                let rank = s.stages[other].rank;
                return format!("{what} of {pass}(s{other},m{mb}) from rank {rank}");
            }
        }
    }
    let prefix = format!("rank {}: {instr} waits for ", e.rank);
    words.strip_prefix(&prefix).unwrap_or(&words).to_string()
}

/// Program-order measures per rank (work counts, peak activations and stash) plus the traffic
/// the execution observed.
fn measure(s: &Schedule, t: Traffic) -> CheckReport {
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
            sent_activations: t.sent_activations[rank],
            sent_gradients: t.sent_gradients[rank],
            received: t.received[rank],
        };
        let (mut live, mut stash) = (0usize, 0usize);
        for instr in prog {
            if instr.forward().is_some() {
                rc.forwards += 1;
                live += 1;
                stash += 1;
                rc.peak_activations = rc.peak_activations.max(live);
                rc.peak_stash = rc.peak_stash.max(stash);
            }
            if instr.backward().is_some() {
                rc.backwards += 1;
                live -= 1;
                if matches!(instr, Instr::BInput { .. }) {
                    rc.split_backwards += 1;
                } else {
                    stash -= 1;
                }
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
    CheckReport {
        ranks,
        messages: t.received.iter().sum(),
        messages_per_step: t.per_step,
        local_handoffs: t.local_handoffs,
        sweeps: t.sweeps,
    }
}

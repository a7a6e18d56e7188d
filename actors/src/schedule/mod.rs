//! Pipeline schedules as plain data: 1F1B, ZB1P (ZB-H1), DualPipe and DualPipeV per-rank
//! instruction lists, their stage placement and data flow; checker, timeline and rendering below.
//!
//! # Conventions
//!
//! **Stage ids are virtual stage ids.** Every instruction names a *stage copy*: an index into
//! [`Schedule::stages`]. A [`StageSlot`] says which model stage's layers that copy runs
//! (`model_stage`), which rank holds it, which local module (`chunk` 0/1) it is on that rank,
//! and which copy comes before / after it in its [`Lane`].
//!
//! | kind | ranks | stage copies | copy `v` runs model stage | copy `v` lives on rank | micro-batches |
//! |---|---|---|---|---|---|
//! | 1F1B, ZB1P | `P` | `P` | `v` | `v` | all N flow through copies `0..P` |
//! | DualPipe | `P` (even) | `2P` | `v mod P` | `v` if `v < P`, else `2P−1−v` | `0..N/2` flow through copies `0..P` (forward direction, enter at rank 0); `N/2..N` flow through copies `P..2P` (reverse direction, enter at rank `P−1`) |
//! | DualPipeV | `R` | `2R` | `v` | `v` if `v < R`, else `2R−1−v` | all N flow through copies `0..2R` (enter and leave at rank 0) |
//!
//! So for DualPipe, copy `v < P` is the forward-direction copy of model stage `v` (module 0 of
//! rank `v` in the reference code) and copy `P + s` is the reverse-direction copy of model stage
//! `s` (module 1 of rank `P−1−s`). Gradients of the two copies of a model stage must be summed.
//!
//! A lane is a chain of stage copies that a set of micro-batches traverse in order: the first
//! copy is the *entry* stage (no activation to receive), the last is the *loss* stage (its
//! backward starts from its own forward). Data flows from copy `v` to `stages[v].next`; the rank
//! that holds it is [`Schedule::next_rank`]. A hand-off between two copies on the same rank (the
//! DualPipeV turn on rank `R−1`) is local and is not a message.
//!
//! **Phases** (DualPipe notation): `StageSlot::phase` is the label used by the paper's step
//! table. On DualPipe rank `r`, phase 0 is the direction whose entry point is nearer (forward
//! direction for `r < P/2`, reverse for `r ≥ P/2`); on DualPipeV phase 0 is copy `r` and phase 1
//! is copy `2R−1−r`. 1F1B and ZB1P have only phase 0.
//!
//! **Instructions.** `F` forward; `B` full backward (input and weight gradient); `BInput` the
//! zero-bubble split backward (input gradient now, weight gradient deferred, written `B*`); `W`
//! runs the deferred weight gradient of one earlier `BInput` of the same rank (DualPipe pops them
//! FIFO); `FB` an overlapped forward/backward pair whose backward is a full `B`.
//!
//! **Steps.** Each instruction carries a 1-based step label ([`Schedule::steps`]): the 8 steps of
//! DualPipe / DualPipeV (see [`step_names`]), or warm-up / steady / cool-down (/ W drain) for
//! 1F1B and ZB1P.

mod check;
mod dualpipe;
mod one_f_one_b;
mod render;
mod timeline;
mod zb1p;

#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::Serialize;

pub use check::{Blocked, CheckReport, RankCheck, check};
pub use dualpipe::step_counts;
pub use render::{report, svg};
pub use timeline::{Costs, Span, TimeQueue, Timeline, timeline};

/// Which pipeline schedule to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ScheduleKind {
    /// Classic one-forward-one-backward (PipeDream-flush).
    OneFOneB,
    /// Zero-bubble ZB-H1: backward split into input (`B*`) and weight (`W`) passes, W deferred.
    Zb1p,
    /// DeepSeek-V3 bidirectional DualPipe: `P` ranks, every model stage on two ranks.
    DualPipe,
    /// DualPipe cut in half ("V" shape): `R` ranks hold `2R` stages, no duplication.
    DualPipeV,
}

impl ScheduleKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ScheduleKind; 4] = [
        ScheduleKind::OneFOneB,
        ScheduleKind::Zb1p,
        ScheduleKind::DualPipe,
        ScheduleKind::DualPipeV,
    ];

    /// The name accepted by `FromStr` (and printed by `Display`).
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Zb1p => "zb1p",
            ScheduleKind::DualPipe => "dualpipe",
            ScheduleKind::DualPipeV => "dualpipev",
        }
    }

    /// Number of model stages for a run on `ranks` ranks (`2·ranks` for DualPipeV).
    pub fn model_stages(self, ranks: usize) -> usize {
        match self {
            ScheduleKind::DualPipeV => 2 * ranks,
            _ => ranks,
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScheduleKind {
    type Err = ScheduleError;

    /// Parses `1f1b`, `zb1p`, `dualpipe` or `dualpipev` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        ScheduleKind::ALL
            .into_iter()
            .find(|k| k.name() == lower)
            .ok_or_else(|| ScheduleError::UnknownKind {
                given: s.to_string(),
            })
    }
}

/// One instruction of a rank's program. `stage` is a virtual stage id (an index into
/// [`Schedule::stages`]), `mb` a micro-batch id in `0..N`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
pub enum Instr {
    /// Forward of `mb` through stage copy `stage`.
    F { stage: usize, mb: usize },
    /// Full backward (input gradient and weight gradient).
    B { stage: usize, mb: usize },
    /// Input-gradient-only backward; the weight gradient is deferred to a later `W`.
    BInput { stage: usize, mb: usize },
    /// Run the deferred weight gradient of the earlier `BInput { stage, mb }` on this rank.
    W { stage: usize, mb: usize },
    /// Overlapped pair: forward `f = (stage, mb)` with full backward `b = (stage, mb)`.
    FB {
        f: (usize, usize),
        b: (usize, usize),
    },
}

impl Instr {
    /// The forward part `(stage, mb)`, if any.
    pub fn forward(&self) -> Option<(usize, usize)> {
        match *self {
            Instr::F { stage, mb } => Some((stage, mb)),
            Instr::FB { f, .. } => Some(f),
            _ => None,
        }
    }

    /// The backward part `(stage, mb)` (B, BInput or the B of FB), if any.
    pub fn backward(&self) -> Option<(usize, usize)> {
        match *self {
            Instr::B { stage, mb } | Instr::BInput { stage, mb } => Some((stage, mb)),
            Instr::FB { b, .. } => Some(b),
            _ => None,
        }
    }

    /// Every `(stage, mb)` this instruction touches.
    pub fn parts(&self) -> Vec<(usize, usize)> {
        match *self {
            Instr::F { stage, mb }
            | Instr::B { stage, mb }
            | Instr::BInput { stage, mb }
            | Instr::W { stage, mb } => vec![(stage, mb)],
            Instr::FB { f, b } => vec![f, b],
        }
    }
}

impl fmt::Display for Instr {
    /// `F(s3,m5)`, `B(s3,m5)`, `B*(s3,m5)`, `W(s3,m5)`, `F(s3,m5)&B(s4,m1)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Instr::F { stage, mb } => write!(f, "F(s{stage},m{mb})"),
            Instr::B { stage, mb } => write!(f, "B(s{stage},m{mb})"),
            Instr::BInput { stage, mb } => write!(f, "B*(s{stage},m{mb})"),
            Instr::W { stage, mb } => write!(f, "W(s{stage},m{mb})"),
            Instr::FB {
                f: (fs, fm),
                b: (bs, bm),
            } => {
                write!(f, "F(s{fs},m{fm})&B(s{bs},m{bm})")
            }
        }
    }
}

/// One stage copy: where it lives and where its data comes from and goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StageSlot {
    /// Virtual stage id (its index in [`Schedule::stages`]).
    pub stage: usize,
    /// The model stage whose layers this copy runs (`0..kind.model_stages(ranks)`).
    pub model_stage: usize,
    /// The rank that holds it.
    pub rank: usize,
    /// Local module index on that rank (reference code `module[chunk]`).
    pub chunk: usize,
    /// Phase label on that rank (paper notation `F0`, `B1`…).
    pub phase: usize,
    /// The lane (chain of copies) it belongs to.
    pub lane: usize,
    /// The copy that feeds it activations (None for an entry stage).
    pub prev: Option<usize>,
    /// The copy it feeds activations to (None for a loss stage).
    pub next: Option<usize>,
}

/// A chain of stage copies traversed in order by a contiguous range of micro-batches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lane {
    pub stages: Vec<usize>,
    pub microbatches: Range<usize>,
}

/// A complete pipeline schedule: placement, data flow and one program per rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub ranks: usize,
    pub microbatches: usize,
    /// Stage copies, indexed by virtual stage id.
    pub stages: Vec<StageSlot>,
    pub lanes: Vec<Lane>,
    /// `programs[r]` is the instruction list rank `r` executes in order.
    pub programs: Vec<Vec<Instr>>,
    /// `steps[r][i]` is the 1-based step label of `programs[r][i]` (see [`step_names`]).
    pub steps: Vec<Vec<u8>>,
    /// DualPipe / DualPipeV only: per rank, the repetition counts of the 8 steps.
    pub step_counts: Option<Vec<[usize; 8]>>,
}

impl Schedule {
    /// The lane micro-batch `mb` travels along.
    pub fn lane_of(&self, mb: usize) -> Option<&Lane> {
        self.lanes.iter().find(|l| l.microbatches.contains(&mb))
    }

    /// Where micro-batch `mb` enters (its first stage copy).
    pub fn entry_stage(&self, mb: usize) -> Option<usize> {
        self.lane_of(mb).and_then(|l| l.stages.first().copied())
    }

    /// Where micro-batch `mb`'s loss is computed (its last stage copy).
    pub fn loss_stage(&self, mb: usize) -> Option<usize> {
        self.lane_of(mb).and_then(|l| l.stages.last().copied())
    }

    /// The rank holding stage copy `stage`.
    pub fn rank_of(&self, stage: usize) -> usize {
        self.stages[stage].rank
    }

    /// The rank that receives `stage`'s output activations (None for a loss stage).
    pub fn next_rank(&self, stage: usize) -> Option<usize> {
        self.stages[stage].next.map(|n| self.stages[n].rank)
    }

    /// The rank that receives `stage`'s input gradients (None for an entry stage).
    pub fn prev_rank(&self, stage: usize) -> Option<usize> {
        self.stages[stage].prev.map(|p| self.stages[p].rank)
    }

    /// The stage copies held by `rank`, ordered by local chunk.
    pub fn stages_on(&self, rank: usize) -> Vec<usize> {
        let mut v: Vec<&StageSlot> = self.stages.iter().filter(|s| s.rank == rank).collect();
        v.sort_by_key(|s| (s.chunk, s.stage));
        v.into_iter().map(|s| s.stage).collect()
    }

    /// Paper notation of one instruction: `F0`, `B1`, `B1*`, `W`, `(F0&B1)`; digits are phases.
    pub fn compact(&self, instr: &Instr) -> String {
        let ph = |s: usize| self.stages.get(s).map_or(9, |x| x.phase);
        match *instr {
            Instr::F { stage, .. } => format!("F{}", ph(stage)),
            Instr::B { stage, .. } => format!("B{}", ph(stage)),
            Instr::BInput { stage, .. } => format!("B{}*", ph(stage)),
            Instr::W { .. } => "W".to_string(),
            Instr::FB { f, b } => format!("(F{}&B{})", ph(f.0), ph(b.0)),
        }
    }

    /// Rank `rank`'s program in paper notation, space separated.
    pub fn compact_program(&self, rank: usize) -> String {
        self.programs[rank]
            .iter()
            .map(|i| self.compact(i))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Names of the step labels of a kind (index `k` names step label `k + 1`).
pub fn step_names(kind: ScheduleKind) -> &'static [&'static str] {
    match kind {
        ScheduleKind::OneFOneB => &["warm-up F", "steady F B", "cool-down B"],
        ScheduleKind::Zb1p => &["warm-up F", "steady F B* W", "cool-down B* W", "drain W"],
        ScheduleKind::DualPipe | ScheduleKind::DualPipeV => &[
            "F0",
            "F0 F1",
            "B1* W F1",
            "(F0&B1) (F1&B0)",
            "B1 (F1&B0)",
            "B1 B0",
            "W B0*",
            "W",
        ],
    }
}

/// Everything that can go wrong building or checking a schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleError {
    /// `FromStr` got a name that is not a schedule kind.
    UnknownKind { given: String },
    /// `build` got a (ranks, micro-batches) combination the kind does not support.
    InvalidConfig {
        kind: ScheduleKind,
        ranks: usize,
        microbatches: usize,
        reason: String,
    },
    /// The schedule misses or repeats work (one line per problem, capped).
    Incomplete { problems: Vec<String> },
    /// Message-driven execution stops with these instructions blocked, one per stuck rank.
    Deadlock { blocked: Vec<Blocked> },
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleError::UnknownKind { given } => write!(
                f,
                "unknown schedule kind {given:?}: expected one of 1f1b, zb1p, dualpipe, dualpipev"
            ),
            ScheduleError::InvalidConfig {
                kind,
                ranks,
                microbatches,
                reason,
            } => write!(
                f,
                "invalid {kind} schedule with ranks={ranks}, microbatches={microbatches}: {reason}"
            ),
            ScheduleError::Incomplete { problems } => {
                write!(f, "incomplete schedule: {}", problems.join("; "))
            }
            ScheduleError::Deadlock { blocked } => {
                write!(f, "deadlock: ")?;
                let parts: Vec<String> = blocked.iter().map(|b| b.to_string()).collect();
                f.write_str(&parts.join("; "))
            }
        }
    }
}

impl std::error::Error for ScheduleError {}

/// Build the schedule of `kind` for `ranks` pipeline ranks and `microbatches` micro-batches.
///
/// Constraints: 1F1B / ZB1P need `ranks ≥ 1`, `microbatches ≥ 1`; DualPipe needs `ranks` even
/// (≥ 2), `microbatches` even and `≥ 2·ranks`; DualPipeV needs `ranks ≥ 1` and
/// `microbatches ≥ 2·ranks`.
pub fn build(
    kind: ScheduleKind,
    ranks: usize,
    microbatches: usize,
) -> Result<Schedule, ScheduleError> {
    validate(kind, ranks, microbatches)?;
    Ok(match kind {
        ScheduleKind::OneFOneB => one_f_one_b::build(ranks, microbatches),
        ScheduleKind::Zb1p => zb1p::build(ranks, microbatches),
        ScheduleKind::DualPipe => dualpipe::build_dualpipe(ranks, microbatches),
        ScheduleKind::DualPipeV => dualpipe::build_dualpipev(ranks, microbatches),
    })
}

fn validate(kind: ScheduleKind, ranks: usize, n: usize) -> Result<(), ScheduleError> {
    let err = |reason: String| ScheduleError::InvalidConfig {
        kind,
        ranks,
        microbatches: n,
        reason,
    };
    if ranks == 0 {
        return Err(err("needs at least 1 rank, got 0".into()));
    }
    if n == 0 {
        return Err(err("needs at least 1 micro-batch, got 0".into()));
    }
    match kind {
        ScheduleKind::OneFOneB | ScheduleKind::Zb1p => {}
        ScheduleKind::DualPipe => {
            if !ranks.is_multiple_of(2) {
                return Err(err(format!(
                    "dualpipe needs an even number of ranks, got {ranks}"
                )));
            }
            if !n.is_multiple_of(2) {
                return Err(err(format!(
                    "dualpipe needs an even number of micro-batches, got {n}"
                )));
            }
            if n < 2 * ranks {
                return Err(err(format!(
                    "dualpipe needs micro-batches >= 2*ranks = {}, got {n}",
                    2 * ranks
                )));
            }
        }
        ScheduleKind::DualPipeV => {
            if n < 2 * ranks {
                return Err(err(format!(
                    "dualpipev needs micro-batches >= 2*ranks = {}, got {n}",
                    2 * ranks
                )));
            }
        }
    }
    Ok(())
}

/// A single lane `0..p` on ranks `0..p`, one copy per rank (1F1B, ZB1P).
fn linear_placement(p: usize, n: usize) -> (Vec<StageSlot>, Vec<Lane>) {
    let stages = (0..p)
        .map(|s| StageSlot {
            stage: s,
            model_stage: s,
            rank: s,
            chunk: 0,
            phase: 0,
            lane: 0,
            prev: s.checked_sub(1),
            next: (s + 1 < p).then_some(s + 1),
        })
        .collect();
    let lanes = vec![Lane {
        stages: (0..p).collect(),
        microbatches: 0..n,
    }];
    (stages, lanes)
}

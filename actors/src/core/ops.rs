//! Stage operations: what one schedule instruction asks of the stage copies on a rank (one or
//! two [`StageOp`]s, inputs taken from the rank's inbox) and where each result goes (the
//! [`Arrival`] it satisfies on the receiving copy). Plain data, no compute: the shells run the
//! ops ([`crate::formation::compute::exec_op`]), the rank machine decides which one runs next.

use super::executor::Arrival;
use crate::schedule::{Instr, Schedule};
use kernels::model::stage::StageStats;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One operation on one stage copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageOp {
    /// F: `input` is None on an entry copy.
    Forward { mb: usize, input: Option<Vec<f32>> },
    /// B*: `dy` is None on a loss copy.
    BackwardInput { mb: usize, dy: Option<Vec<f32>> },
    /// W of an earlier B*.
    Weight { mb: usize },
    /// B: B* and W at once.
    Backward { mb: usize, dy: Option<Vec<f32>> },
}

impl StageOp {
    pub fn mb(&self) -> usize {
        match *self {
            StageOp::Forward { mb, .. }
            | StageOp::BackwardInput { mb, .. }
            | StageOp::Weight { mb }
            | StageOp::Backward { mb, .. } => mb,
        }
    }

    /// `forward`, `backward` or `weight` (fault-injection phases).
    pub fn phase(&self) -> &'static str {
        match self {
            StageOp::Forward { .. } => "forward",
            StageOp::BackwardInput { .. } | StageOp::Backward { .. } => "backward",
            StageOp::Weight { .. } => "weight",
        }
    }
}

/// What a stage operation produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageOpResult {
    Forward {
        out: Option<Vec<f32>>,
        stats: StageStats,
    },
    Backward {
        dx: Option<Vec<f32>>,
    },
    Weight,
}

/// What stage copy `copy` answers to `op` when no tensors are computed (drivers that simulate
/// the compute): `(micro-batch, result)` with an empty output where the schedule routes one.
pub fn empty_result(schedule: &Schedule, copy: usize, op: &StageOp) -> (usize, StageOpResult) {
    let st = &schedule.stages[copy];
    let result = match op {
        StageOp::Forward { .. } => StageOpResult::Forward {
            out: st.next.map(|_| Vec::new()),
            stats: StageStats::default(),
        },
        StageOp::BackwardInput { .. } | StageOp::Backward { .. } => StageOpResult::Backward {
            dx: st.prev.map(|_| Vec::new()),
        },
        StageOp::Weight { .. } => StageOpResult::Weight,
    };
    (op.mb(), result)
}

/// The `(stage copy, op)` parts of an instruction, inputs taken from `inbox`.
pub fn ops_of(
    schedule: &Schedule,
    instr: Instr,
    inbox: &mut BTreeMap<Arrival, Vec<f32>>,
) -> Result<Vec<(usize, StageOp)>, String> {
    let mut take = |a: Arrival, needed: bool| -> Result<Option<Vec<f32>>, String> {
        if !needed {
            return Ok(None);
        }
        inbox
            .remove(&a)
            .map(Some)
            .ok_or_else(|| format!("{instr}: input {a:?} is missing"))
    };
    let mut parts = Vec::with_capacity(2);
    if let Some((stage, mb)) = instr.forward() {
        let has_prev = schedule.stages[stage].prev.is_some();
        let input = take(Arrival::Activation { stage, mb }, has_prev)?;
        parts.push((stage, StageOp::Forward { mb, input }));
    }
    let has_next = |stage: usize| schedule.stages[stage].next.is_some();
    match instr {
        Instr::B { stage, mb } | Instr::FB { b: (stage, mb), .. } => {
            let dy = take(Arrival::Gradient { stage, mb }, has_next(stage))?;
            parts.push((stage, StageOp::Backward { mb, dy }));
        }
        Instr::BInput { stage, mb } => {
            let dy = take(Arrival::Gradient { stage, mb }, has_next(stage))?;
            parts.push((stage, StageOp::BackwardInput { mb, dy }));
        }
        Instr::W { stage, mb } => parts.push((stage, StageOp::Weight { mb })),
        Instr::F { .. } => {}
    }
    Ok(parts)
}

/// Where the output of a finished op goes (the arrival it satisfies on the receiving copy), and
/// the payload; None when nothing leaves (a loss copy's forward, an entry copy's backward, W).
pub fn route_of(
    schedule: &Schedule,
    stage: usize,
    mb: usize,
    result: &mut StageOpResult,
) -> Option<(Arrival, Vec<f32>)> {
    match result {
        StageOpResult::Forward { out, .. } => {
            let next = schedule.stages[stage].next?;
            let x = out
                .take()
                .expect("a copy with a successor produces activations");
            Some((Arrival::Activation { stage: next, mb }, x))
        }
        StageOpResult::Backward { dx } => {
            let prev = schedule.stages[stage].prev?;
            let g = dx
                .take()
                .expect("a copy with a predecessor produces an input gradient");
            Some((Arrival::Gradient { stage: prev, mb }, g))
        }
        StageOpResult::Weight => None,
    }
}

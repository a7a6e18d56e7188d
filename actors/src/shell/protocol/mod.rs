//! The messages of the ractor shells, in one place so that the actor files stand side by side
//! without importing each other. Every message is plain data that the control plane's codec
//! ([`crate::core::codec`]) encodes: it names its (step, attempt) and its sender, and carries
//! tensors either as wire frames (activations and gradients between ranks and expert groups,
//! checked by CRC on arrival) or as a [`PayloadKey`] into the formation's payload store (the
//! step's batches, parameters, gradient sums and states). No message holds a reply port or a
//! shared pointer: an answer is a message of its own, sent to an address.

use super::payload::PayloadKey;
use crate::core::coordinator::CoordTimer;
use crate::core::executor::Arrival;
use crate::core::ops::{StageOp, StageOpResult};
use crate::core::rank::RankStats;
use crate::trainer::{StepHyper, StepOutput};
use kernels::model::layers::ExpertSite;
use serde::{Deserialize, Serialize};

/// One expert's backward answer on the wire: dx as a frame, weight gradients (gate, up, down) as
/// they are (they stay with the expert's owner until the reduce).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireGrads {
    pub dx: Vec<u8>,
    pub dw: [Vec<f32>; 3],
}

/// Messages of an ExpertGroupActor. Payloads are transport frames; each request names its call
/// (`call`) and is answered with an [`ExpertReply`] to the stage copy that made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ExpertMsg {
    Forward {
        call: u64,
        step: u64,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<u8>)>,
    },
    Backward {
        call: u64,
        step: u64,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<u8>)>,
    },
    /// Drop kept activations; install the parameters under `restore` when given.
    Reset {
        call: u64,
        restore: Option<PayloadKey>,
    },
    /// Install committed-to-be parameters: the stages' updates of `step` (`TensorUpdates`).
    Install {
        call: u64,
        step: u64,
        attempt: u32,
        updates: Vec<PayloadKey>,
    },
}

/// What an expert group answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ExpertAnswer {
    /// The forward's combine frames, in block order.
    Forward(Vec<Vec<u8>>),
    /// The backward's dx frames and weight gradients, in block order.
    Backward(Vec<WireGrads>),
    /// A reset or an install is done.
    Ack,
}

/// An expert group's answer to call `call` of the stage copy it serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertReply {
    pub call: u64,
    pub group: usize,
    pub answer: ExpertAnswer,
}

/// Messages of a StageActor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageMsg {
    /// Drop every stash, queued W and gradient; install the parameters of the committed state
    /// under `restore` (a `TrainState`) when given.
    Reset { restore: Option<PayloadKey> },
    /// Run one operation; the answer goes to the parent as [`GpuMsg::OpDone`].
    Op {
        op_id: u64,
        step: u64,
        attempt: u32,
        op: StageOp,
        /// The step's micro-batches.
        batches: PayloadKey,
    },
    /// Install committed-to-be parameters (the stages' updates); answered with
    /// [`GpuMsg::StageInstalled`].
    Install {
        step: u64,
        attempt: u32,
        updates: Vec<PayloadKey>,
    },
    /// Hand over the step's gradients; answered with [`GpuMsg::StageGrads`].
    TakeGrads { step: u64, attempt: u32 },
    /// This copy owns its model stage's update: reduce the gradients of its tensors from
    /// `parts` (`GradSums` by the model stage they come from), keep them, and answer their
    /// square sums ([`GpuMsg::Reduced`]).
    Reduce {
        step: u64,
        attempt: u32,
        parts: Vec<(usize, PayloadKey)>,
    },
    /// Update the tensors reduced last with the clip `factor`, reading parameters and moments
    /// from the committed state `state` (a `TrainState`); answered with [`GpuMsg::Applied`].
    Apply {
        step: u64,
        attempt: u32,
        update: ApplyArgs,
    },
}

/// What a stage needs to update its tensors once the global gradient norm is known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyArgs {
    pub factor: f32,
    pub hyper: StepHyper,
    /// Expert loads of the step per MoE layer (the bias update).
    pub loads: Vec<Vec<u32>>,
    pub state: PayloadKey,
}

/// A stage copy's gradient hand-over: its half sums and, apart, its jobs on shared tensors
/// (both `GradSums`), so that each goes to the stage that reduces it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyGrads {
    pub sums: PayloadKey,
    pub shared: Option<PayloadKey>,
}

/// Messages of a GpuActor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GpuMsg {
    /// Start attempt `attempt` of step `step` (restore the stage parameters first when given);
    /// `check` is the coordinator's checksum of (step, attempt).
    Open {
        step: u64,
        attempt: u32,
        check: u32,
        batches: PayloadKey,
        restore: Option<PayloadKey>,
    },
    /// An activation or gradient from a peer rank, as a wire frame.
    Deliver {
        step: u64,
        attempt: u32,
        arrival: Arrival,
        frame: Vec<u8>,
    },
    OpDone {
        op_id: u64,
        copy: usize,
        step: u64,
        attempt: u32,
        mb: usize,
        result: StageOpResult,
    },
    /// A stage copy's gradient sums of the step.
    StageGrads {
        copy: usize,
        step: u64,
        attempt: u32,
        grads: CopyGrads,
    },
    /// The stages' updates of the step (`TensorUpdates`), to install.
    Install {
        step: u64,
        attempt: u32,
        updates: Vec<PayloadKey>,
    },
    /// For owner copy `copy`: see [`StageMsg::Reduce`].
    Reduce {
        copy: usize,
        step: u64,
        attempt: u32,
        parts: Vec<(usize, PayloadKey)>,
    },
    /// For owner copy `copy`: see [`StageMsg::Apply`].
    Apply {
        copy: usize,
        step: u64,
        attempt: u32,
        update: ApplyArgs,
    },
    /// Owner copy `copy` reduced its stage: (tensor id, Σg²) of its trainable tensors.
    Reduced {
        copy: usize,
        step: u64,
        attempt: u32,
        result: Result<Vec<(usize, f64)>, String>,
    },
    /// Owner copy `copy` updated its stage (`TensorUpdates` under the key).
    Applied {
        copy: usize,
        step: u64,
        attempt: u32,
        result: Result<PayloadKey, String>,
    },
    StageInstalled {
        copy: usize,
        step: u64,
        attempt: u32,
    },
    Abort {
        step: u64,
        attempt: u32,
    },
    /// The step timed out: kill whatever stage this rank waits on, then acknowledge.
    Probe {
        step: u64,
        attempt: u32,
    },
    /// A restart backoff ended (the Supervisor machine's timer).
    RestartTimer {
        token: u64,
    },
    /// A step committed: restart budgets count from here.
    Progress,
    /// The failure detector's clock: read the stages' progress, beat to the coordinator.
    Tick,
    /// A (new) coordinator took over: drop the open attempt and report in.
    Hello,
}

/// Messages of the Root (the parent of the Coordinator and the NodeSupervisor).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RootMsg {
    RestartTimer { token: u64 },
}

/// Messages of the NodeSupervisor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeMsg {
    RestartTimer { token: u64 },
    Progress,
}

/// Messages of the DataLoader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataMsg {
    /// The micro-batches of a step (a replay asks again and gets the same); answered to the
    /// coordinator with [`CoordMsg::Batches`].
    Get { step: u64 },
}

/// A step's micro-batches (a `Vec<Batch>` in the payload store) with the loader's CRC32C of
/// their tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checked {
    pub crc: u32,
    pub batches: PayloadKey,
}

/// What the coordinator answers for a committed step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReply {
    /// Every stage's `TensorUpdates` (none for a step the gate refused): with the committed
    /// state they make the new one.
    pub updates: Vec<PayloadKey>,
    pub out: StepOutput,
    pub restarts: u64,
    pub replayed_steps: u64,
}

/// Messages to the engine that drives the formation (it is not an actor: it reads them from
/// its inbox).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EngineMsg {
    /// Step `step` committed, or could not be.
    StepDone {
        step: u64,
        result: Result<StepReply, String>,
    },
    /// The coordinator answers a [`CoordMsg::Ping`].
    Pong,
}

/// A rank's gradient hand-over: per stage copy, its sums.
pub type RankGrads = Vec<(usize, CopyGrads)>;

/// Messages of the Coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordMsg {
    /// Run one step on the committed state under `state` (a `TrainState` in the payload store,
    /// the snapshot a failure rolls back to); answered with [`EngineMsg::StepDone`].
    RunStep {
        step: u64,
        state: PayloadKey,
        hyper: StepHyper,
        /// Restore `state` on every rank first (the run rolled back past the last step).
        restore: bool,
    },
    Done {
        rank: usize,
        step: u64,
        attempt: u32,
        grads: RankGrads,
        stats: RankStats,
    },
    Installed {
        rank: usize,
        step: u64,
        attempt: u32,
    },
    /// Model stage `model_stage` reduced (see [`GpuMsg::Reduced`]).
    Reduced {
        model_stage: usize,
        step: u64,
        attempt: u32,
        result: Result<Vec<(usize, f64)>, String>,
    },
    /// Model stage `model_stage` updated (see [`GpuMsg::Applied`]).
    Applied {
        model_stage: usize,
        step: u64,
        attempt: u32,
        result: Result<PayloadKey, String>,
    },
    /// A rank lost an actor (it is being restarted).
    RankDown {
        rank: usize,
        reason: String,
    },
    /// A rank is complete again.
    RankUp {
        rank: usize,
    },
    /// A message of the attempt was lost (refused on arrival): replay the step.
    Lost {
        rank: usize,
        step: u64,
        attempt: u32,
        reason: String,
    },
    ProbeAck {
        rank: usize,
        step: u64,
        attempt: u32,
    },
    /// The step's micro-batches (or why there are none), from the data loader.
    Batches {
        step: u64,
        result: Result<Checked, String>,
    },
    /// The data loader's answer to request `try_no` of `step` is overdue.
    DataTimeout {
        step: u64,
        try_no: u32,
    },
    /// A rank's heartbeat (sent by its GpuActor on every detector tick).
    Heartbeat {
        rank: usize,
    },
    /// The coordinator's failure-detector clock.
    Tick,
    /// Ask the data loader again for the batches of `step`.
    RetryData {
        step: u64,
    },
    /// The engine's heartbeat: answered at once with [`EngineMsg::Pong`].
    Ping,
    Timer(CoordTimer),
    /// Every rank went down at once (the root restarts the NodeSupervisor).
    AllDown {
        reason: String,
    },
    /// A restart backoff of a coordinator child ended.
    RestartTimer {
        token: u64,
    },
}

// the machines' messages take tags 1 to 12 (core::codec)
crate::core::codec::messages! {
    ExpertMsg => 13,
    ExpertReply => 14,
    StageMsg => 15,
    GpuMsg => 16,
    CoordMsg => 17,
    DataMsg => 18,
    RootMsg => 19,
    NodeMsg => 20,
    EngineMsg => 21,
}

#[cfg(test)]
mod tests;

//! The messages of the ractor shells, in one place so that the actor files stand side by side
//! without importing each other. Every exchange names its (step, attempt); tensors between ranks
//! travel as encoded wire frames (checked by CRC on arrival).

use crate::core::coordinator::CoordTimer;
use crate::core::executor::Arrival;
use crate::core::ops::{StageOp, StageOpResult};
use crate::core::rank::RankStats;
use crate::trainer::{StepHyper, StepOutput, TrainState};
use kernels::model::layers::ExpertSite;
use kernels::model::stage::GradSums;
use kernels::model::{Batch, ParamStore};
use ractor::RpcReplyPort;
use std::sync::Arc;

/// One expert's backward answer on the wire: dx as a frame, weight gradients (gate, up, down) as
/// they are (they stay with the expert's owner until the reduce).
pub struct WireGrads {
    pub dx: Vec<u8>,
    pub dw: [Vec<f32>; 3],
}

/// Messages of an ExpertGroupActor. Payloads are transport frames.
pub enum ExpertMsg {
    Forward {
        step: u64,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<u8>)>,
        reply: RpcReplyPort<Vec<Vec<u8>>>,
    },
    Backward {
        step: u64,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<u8>)>,
        reply: RpcReplyPort<Vec<WireGrads>>,
    },
    /// Drop kept activations; install `restore` when given.
    Reset {
        restore: Option<Arc<ParamStore>>,
        reply: RpcReplyPort<()>,
    },
    /// Install committed-to-be parameters (the optimizer phase of `step`).
    Install {
        step: u64,
        params: Arc<ParamStore>,
        reply: RpcReplyPort<()>,
    },
}

/// Messages of a StageActor.
pub enum StageMsg {
    /// Drop every stash, queued W and gradient; install `restore` when given.
    Reset { restore: Option<Arc<ParamStore>> },
    /// Run one operation; the answer goes to the parent as [`GpuMsg::OpDone`].
    Op {
        op_id: u64,
        step: u64,
        attempt: u32,
        op: StageOp,
        batches: Arc<Vec<Batch>>,
    },
    /// Install committed-to-be parameters; answered with [`GpuMsg::StageInstalled`].
    Install {
        step: u64,
        attempt: u32,
        params: Arc<ParamStore>,
    },
    /// Hand over the step's gradients; answered with [`GpuMsg::StageGrads`].
    TakeGrads { step: u64, attempt: u32 },
}

/// Messages of a GpuActor.
pub enum GpuMsg {
    /// Start attempt `attempt` of step `step` (restore the stage parameters first when given);
    /// `check` is the coordinator's checksum of (step, attempt).
    Open {
        step: u64,
        attempt: u32,
        check: u32,
        batches: Arc<Vec<Batch>>,
        restore: Option<Arc<ParamStore>>,
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
    StageGrads {
        copy: usize,
        step: u64,
        attempt: u32,
        grads: GradSums,
    },
    Install {
        step: u64,
        attempt: u32,
        params: Arc<ParamStore>,
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
pub enum RootMsg {
    RestartTimer { token: u64 },
}

/// Messages of the NodeSupervisor.
pub enum NodeMsg {
    RestartTimer { token: u64 },
    Progress,
}

/// A step's micro-batches with the loader's CRC32C of their tokens.
pub type Checked = (u32, Arc<Vec<Batch>>);

/// Messages of the DataLoader.
pub enum DataMsg {
    /// The micro-batches of a step with their CRC32C (a replay asks again and gets the same).
    Get {
        step: u64,
        reply: RpcReplyPort<Result<Checked, String>>,
    },
}

/// What the coordinator answers for a committed step.
pub struct StepReply {
    pub state: Box<TrainState>,
    pub out: StepOutput,
    pub restarts: u64,
    pub replayed_steps: u64,
}

/// A rank's gradient hand-over: per stage copy, its per-micro-batch gradients.
pub type RankGrads = Vec<(usize, GradSums)>;

/// Messages of the Coordinator.
pub enum CoordMsg {
    /// Run one step on the committed state `state` (the snapshot a failure rolls back to).
    RunStep {
        step: u64,
        state: Arc<TrainState>,
        hyper: StepHyper,
        /// Restore `state` on every rank first (the run rolled back past the last step).
        restore: bool,
        reply: RpcReplyPort<Result<StepReply, String>>,
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
    /// The step's micro-batches (or why there are none), from the loader request task.
    Batches {
        step: u64,
        result: Result<Arc<Vec<Batch>>, String>,
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
    /// The engine's heartbeat: answered at once.
    Ping {
        reply: RpcReplyPort<()>,
    },
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

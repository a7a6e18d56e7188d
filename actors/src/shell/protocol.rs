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
mod tests {
    use super::*;
    use crate::core::codec::{Message, decode, encode};
    use crate::core::monitor::{Spike, SpikeGate};
    use kernels::model::StepStats;
    use kernels::model::stage::StageStats;
    use kernels::ops::adamw::AdamW;

    /// Encodes `msgs` through the control plane's codec and decodes them again; returns which
    /// variants (by `index`) were seen.
    fn round_trips<M: Message + PartialEq + std::fmt::Debug>(
        msgs: Vec<M>,
        index: impl Fn(&M) -> usize,
    ) -> std::collections::BTreeSet<usize> {
        let mut seen = std::collections::BTreeSet::new();
        for m in msgs {
            let bytes = encode(3, &m).expect("encodes");
            let (sender, back) = decode::<M>(&bytes).expect("decodes");
            assert_eq!((sender, &back), (3, &m));
            seen.insert(index(&m));
        }
        seen
    }

    fn all(n: usize) -> std::collections::BTreeSet<usize> {
        (0..n).collect()
    }

    #[test]
    fn every_shell_message_is_plain_data_through_the_codec() {
        let k = PayloadKey(41);
        let site = ExpertSite { layer: 2, mb: 1 };
        let grads = WireGrads {
            dx: vec![1, 2, 3],
            dw: [vec![0.5], vec![-1.0, 2.0], vec![]],
        };
        let seen = round_trips(
            vec![
                ExpertMsg::Forward {
                    call: 1,
                    step: 4,
                    site,
                    blocks: vec![(0, vec![9, 8])],
                },
                ExpertMsg::Backward {
                    call: 2,
                    step: 4,
                    site,
                    blocks: vec![],
                },
                ExpertMsg::Reset {
                    call: 3,
                    restore: Some(k),
                },
                ExpertMsg::Install {
                    call: 4,
                    step: 4,
                    updates: vec![k, PayloadKey(9)],
                },
            ],
            |m| match m {
                ExpertMsg::Forward { .. } => 0,
                ExpertMsg::Backward { .. } => 1,
                ExpertMsg::Reset { .. } => 2,
                ExpertMsg::Install { .. } => 3,
            },
        );
        assert_eq!(seen, all(4));
        let seen = round_trips(
            vec![
                ExpertAnswer::Forward(vec![vec![1, 2]]),
                ExpertAnswer::Backward(vec![grads]),
                ExpertAnswer::Ack,
            ]
            .into_iter()
            .map(|answer| ExpertReply {
                call: 7,
                group: 1,
                answer,
            })
            .collect(),
            |r| match r.answer {
                ExpertAnswer::Forward(_) => 0,
                ExpertAnswer::Backward(_) => 1,
                ExpertAnswer::Ack => 2,
            },
        );
        assert_eq!(seen, all(3));
        let hyper = StepHyper {
            opt: AdamW {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                bf16_moments: false,
            },
            lr: 3e-4,
            clip: 1.0,
            gamma: 1e-3,
            mtp_weight: 0.3,
            gate: SpikeGate::open(),
        };
        let apply = ApplyArgs {
            factor: 0.5,
            hyper,
            loads: vec![vec![2, 0, 1]],
            state: k,
        };
        let seen = round_trips(
            vec![
                StageMsg::Reset { restore: None },
                StageMsg::Op {
                    op_id: 5,
                    step: 2,
                    attempt: 1,
                    op: StageOp::Backward {
                        mb: 1,
                        dy: Some(vec![0.25]),
                    },
                    batches: k,
                },
                StageMsg::Install {
                    step: 2,
                    attempt: 1,
                    updates: vec![k],
                },
                StageMsg::TakeGrads {
                    step: 2,
                    attempt: 1,
                },
                StageMsg::Reduce {
                    step: 2,
                    attempt: 1,
                    parts: vec![(0, k), (3, PayloadKey(8))],
                },
                StageMsg::Apply {
                    step: 2,
                    attempt: 1,
                    update: apply.clone(),
                },
            ],
            |m| match m {
                StageMsg::Reset { .. } => 0,
                StageMsg::Op { .. } => 1,
                StageMsg::Install { .. } => 2,
                StageMsg::TakeGrads { .. } => 3,
                StageMsg::Reduce { .. } => 4,
                StageMsg::Apply { .. } => 5,
            },
        );
        assert_eq!(seen, all(6));
        let seen = round_trips(
            vec![
                GpuMsg::Open {
                    step: 3,
                    attempt: 0,
                    check: 0xdead_beef,
                    batches: k,
                    restore: Some(PayloadKey(2)),
                },
                GpuMsg::Deliver {
                    step: 3,
                    attempt: 0,
                    arrival: Arrival::Activation { stage: 1, mb: 0 },
                    frame: vec![0, 1, 2],
                },
                GpuMsg::OpDone {
                    op_id: 9,
                    copy: 1,
                    step: 3,
                    attempt: 0,
                    mb: 0,
                    result: StageOpResult::Forward {
                        out: Some(vec![1.0, 2.0]),
                        stats: StageStats {
                            loss: 2.5,
                            balance: vec![0.1],
                            loads: vec![vec![3, 1]],
                            ..Default::default()
                        },
                    },
                },
                GpuMsg::StageGrads {
                    copy: 0,
                    step: 3,
                    attempt: 0,
                    grads: CopyGrads {
                        sums: k,
                        shared: Some(PayloadKey(3)),
                    },
                },
                GpuMsg::Install {
                    step: 3,
                    attempt: 0,
                    updates: vec![k],
                },
                GpuMsg::Reduce {
                    copy: 2,
                    step: 3,
                    attempt: 0,
                    parts: vec![(1, k)],
                },
                GpuMsg::Apply {
                    copy: 2,
                    step: 3,
                    attempt: 0,
                    update: apply.clone(),
                },
                GpuMsg::Reduced {
                    copy: 2,
                    step: 3,
                    attempt: 0,
                    result: Ok(vec![(4, 0.125), (7, 2.0)]),
                },
                GpuMsg::Applied {
                    copy: 2,
                    step: 3,
                    attempt: 0,
                    result: Err("no gradients".into()),
                },
                GpuMsg::StageInstalled {
                    copy: 1,
                    step: 3,
                    attempt: 0,
                },
                GpuMsg::Abort {
                    step: 3,
                    attempt: 0,
                },
                GpuMsg::Probe {
                    step: 3,
                    attempt: 0,
                },
                GpuMsg::RestartTimer { token: 6 },
                GpuMsg::Progress,
                GpuMsg::Tick,
                GpuMsg::Hello,
            ],
            |m| match m {
                GpuMsg::Open { .. } => 0,
                GpuMsg::Deliver { .. } => 1,
                GpuMsg::OpDone { .. } => 2,
                GpuMsg::StageGrads { .. } => 3,
                GpuMsg::Install { .. } => 4,
                GpuMsg::StageInstalled { .. } => 5,
                GpuMsg::Abort { .. } => 6,
                GpuMsg::Probe { .. } => 7,
                GpuMsg::RestartTimer { .. } => 8,
                GpuMsg::Progress => 9,
                GpuMsg::Tick => 10,
                GpuMsg::Hello => 11,
                GpuMsg::Reduce { .. } => 12,
                GpuMsg::Apply { .. } => 13,
                GpuMsg::Reduced { .. } => 14,
                GpuMsg::Applied { .. } => 15,
            },
        );
        assert_eq!(seen, all(16));
        let seen = round_trips(
            vec![
                CoordMsg::RunStep {
                    step: 8,
                    state: k,
                    hyper,
                    restore: true,
                },
                CoordMsg::Done {
                    rank: 1,
                    step: 8,
                    attempt: 2,
                    grads: vec![(
                        0,
                        CopyGrads {
                            sums: k,
                            shared: None,
                        },
                    )],
                    stats: vec![(0, 1, StageStats::default())],
                },
                CoordMsg::Installed {
                    rank: 0,
                    step: 8,
                    attempt: 2,
                },
                CoordMsg::RankDown {
                    rank: 1,
                    reason: "panicked".into(),
                },
                CoordMsg::RankUp { rank: 1 },
                CoordMsg::Lost {
                    rank: 0,
                    step: 8,
                    attempt: 2,
                    reason: "bad CRC".into(),
                },
                CoordMsg::ProbeAck {
                    rank: 0,
                    step: 8,
                    attempt: 2,
                },
                CoordMsg::Reduced {
                    model_stage: 1,
                    step: 8,
                    attempt: 2,
                    result: Ok(vec![(0, 1.5)]),
                },
                CoordMsg::Applied {
                    model_stage: 1,
                    step: 8,
                    attempt: 2,
                    result: Ok(k),
                },
                CoordMsg::Batches {
                    step: 8,
                    result: Ok(Checked {
                        crc: 17,
                        batches: k,
                    }),
                },
                CoordMsg::DataTimeout { step: 8, try_no: 2 },
                CoordMsg::Heartbeat { rank: 1 },
                CoordMsg::Tick,
                CoordMsg::RetryData { step: 8 },
                CoordMsg::Ping,
                CoordMsg::Timer(CoordTimer::StepDeadline {
                    step: 8,
                    attempt: 2,
                }),
                CoordMsg::AllDown {
                    reason: "node".into(),
                },
                CoordMsg::RestartTimer { token: 1 },
            ],
            |m| match m {
                CoordMsg::RunStep { .. } => 0,
                CoordMsg::Done { .. } => 1,
                CoordMsg::Installed { .. } => 2,
                CoordMsg::RankDown { .. } => 3,
                CoordMsg::RankUp { .. } => 4,
                CoordMsg::Lost { .. } => 5,
                CoordMsg::ProbeAck { .. } => 6,
                CoordMsg::Batches { .. } => 7,
                CoordMsg::DataTimeout { .. } => 8,
                CoordMsg::Heartbeat { .. } => 9,
                CoordMsg::Tick => 10,
                CoordMsg::RetryData { .. } => 11,
                CoordMsg::Ping => 12,
                CoordMsg::Timer(_) => 13,
                CoordMsg::AllDown { .. } => 14,
                CoordMsg::RestartTimer { .. } => 15,
                CoordMsg::Reduced { .. } => 16,
                CoordMsg::Applied { .. } => 17,
            },
        );
        assert_eq!(seen, all(18));
        let seen = round_trips(vec![DataMsg::Get { step: 8 }], |m| match m {
            DataMsg::Get { .. } => 0,
        });
        assert_eq!(seen, all(1));
        let seen = round_trips(vec![RootMsg::RestartTimer { token: 2 }], |m| match m {
            RootMsg::RestartTimer { .. } => 0,
        });
        assert_eq!(seen, all(1));
        let seen = round_trips(
            vec![NodeMsg::RestartTimer { token: 2 }, NodeMsg::Progress],
            |m| match m {
                NodeMsg::RestartTimer { .. } => 0,
                NodeMsg::Progress => 1,
            },
        );
        assert_eq!(seen, all(2));
        let out = StepOutput {
            stats: StepStats {
                loss: 2.0,
                loads: vec![vec![1, 2]],
                ..Default::default()
            },
            grad_norm: 0.5,
            rejected: Some(Spike::Loss {
                loss: 9.0,
                limit: 4.0,
            }),
        };
        let seen = round_trips(
            vec![
                EngineMsg::StepDone {
                    step: 8,
                    result: Ok(StepReply {
                        updates: vec![k],
                        out,
                        restarts: 2,
                        replayed_steps: 1,
                    }),
                },
                EngineMsg::StepDone {
                    step: 9,
                    result: Err("gave up".into()),
                },
                EngineMsg::Pong,
            ],
            |m| match m {
                EngineMsg::StepDone { .. } => 0,
                EngineMsg::Pong => 1,
            },
        );
        assert_eq!(seen, all(2));
    }

    #[test]
    fn a_message_is_refused_as_another_type_and_when_damaged() {
        let bytes = encode(1, &DataMsg::Get { step: 3 }).expect("encodes");
        assert!(decode::<NodeMsg>(&bytes).is_err());
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode::<DataMsg>(&bad).is_err());
    }
}

//! Every shell message through the control plane's codec: each variant round-trips, a damaged
//! or mistyped one is refused.

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
                attempt: 1,
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
        opt: AdamW::deepseek_v3(false),
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

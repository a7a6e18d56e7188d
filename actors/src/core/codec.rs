//! The control plane's one codec: every machine message (the events and commands of the
//! coordinator, rank, supervisor, transaction, run and detector machines) as postcard bytes inside
//! a `transport::link` envelope (magic, version, sender, a tag naming the message type, length,
//! CRC32C). A damaged, truncated, oversized or mistyped message is refused with the reason, never
//! a panic: the receiver counts it as a lost message, which the step transaction survives.

use super::coordinator::{CoordCommand, CoordEvent};
use super::detector::{DetectorCommand, DetectorEvent};
use super::rank::{RankCommand, RankEvent};
use super::run::{RunCommand, RunEvent};
use super::supervisor::{SupCommand, SupEvent};
use super::txn::{TxnCommand, TxnEvent};
use serde::Serialize;
use serde::de::DeserializeOwned;
use transport::link::{LinkError, decode_envelope, encode_envelope};

/// The largest control message accepted (tensors never travel as control messages).
pub const MAX_CONTROL_BYTES: usize = 16 << 20;

/// A message type of the control plane, with the tag that names it on the wire.
pub trait Message: Serialize + DeserializeOwned {
    const TAG: u32;
    const NAME: &'static str;
}

/// Names message types with their wire tags (the shells register theirs with it too).
macro_rules! messages {
    ($($t:ty => $tag:expr),* $(,)?) => {
        $(impl $crate::core::codec::Message for $t {
            const TAG: u32 = $tag;
            const NAME: &'static str = stringify!($t);
        })*
    };
}
pub(crate) use messages;

messages! {
    CoordEvent => 1,
    CoordCommand => 2,
    RankEvent<()> => 3,
    RankCommand<()> => 4,
    SupEvent<usize> => 5,
    SupCommand<usize> => 6,
    TxnEvent => 7,
    TxnCommand => 8,
    RunEvent => 9,
    RunCommand => 10,
    DetectorEvent => 11,
    DetectorCommand => 12,
}

/// Why a message was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("control message refused: {0}")]
    Envelope(#[from] LinkError),
    #[error("expected a {expected} (tag {tag_expected}), the envelope carries tag {found}")]
    WrongType {
        expected: &'static str,
        tag_expected: u32,
        found: u32,
    },
    #[error("a {what} that does not decode: {why}")]
    Body { what: &'static str, why: String },
    #[error("a {what} cannot be encoded: {why}")]
    Encode { what: &'static str, why: String },
}

/// `msg` from `sender` as envelope bytes.
pub fn encode<M: Message>(sender: u32, msg: &M) -> Result<Vec<u8>, CodecError> {
    let body = postcard::to_allocvec(msg).map_err(|e| CodecError::Encode {
        what: M::NAME,
        why: e.to_string(),
    })?;
    Ok(encode_envelope(sender, M::TAG, &body)?)
}

/// The sender and the message of envelope bytes made by [`encode`].
pub fn decode<M: Message>(bytes: &[u8]) -> Result<(u32, M), CodecError> {
    let env = decode_envelope(bytes, MAX_CONTROL_BYTES)?;
    if env.tag != M::TAG {
        return Err(CodecError::WrongType {
            expected: M::NAME,
            tag_expected: M::TAG,
            found: env.tag,
        });
    }
    let (msg, rest) =
        postcard::take_from_bytes::<M>(env.payload).map_err(|e| CodecError::Body {
            what: M::NAME,
            why: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(CodecError::Body {
            what: M::NAME,
            why: format!("{} bytes after the message", rest.len()),
        });
    }
    Ok((env.sender, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::coordinator::CoordTimer;
    use crate::core::executor::Arrival;
    use crate::core::ops::{StageOp, StageOpResult};
    use kernels::model::stage::StageStats;

    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(msg: M) {
        let bytes = encode(7, &msg).expect("encodes");
        assert_eq!(decode::<M>(&bytes).expect("decodes"), (7, msg));
    }

    #[test]
    fn every_machine_message_round_trips() {
        round_trip(CoordEvent::RankDown {
            rank: 3,
            reason: "stage copy s1 panicked".into(),
        });
        round_trip(CoordEvent::Timer(CoordTimer::ProbeDeadline {
            step: 9,
            attempt: 2,
        }));
        round_trip(CoordCommand::Open {
            step: 4,
            attempt: 1,
            restore: true,
        });
        round_trip(RankEvent::<()>::Deliver {
            step: 4,
            attempt: 1,
            arrival: Arrival::Gradient { stage: 2, mb: 5 },
            data: vec![1.5, -0.25, f32::MIN_POSITIVE],
        });
        round_trip(RankEvent::<()>::OpDone {
            op_id: 12,
            copy: 1,
            step: 4,
            attempt: 1,
            mb: 3,
            result: StageOpResult::Forward {
                out: Some(vec![0.5; 4]),
                stats: StageStats {
                    loss: 2.5,
                    balance: vec![0.01],
                    loads: vec![vec![3, 1, 0, 4]],
                    ..StageStats::default()
                },
            },
        });
        round_trip(RankCommand::<()>::RunOp {
            op_id: 1,
            copy: 0,
            step: 1,
            attempt: 0,
            op: StageOp::Backward {
                mb: 2,
                dy: Some(vec![3.0]),
            },
        });
        round_trip(SupCommand::<usize>::Restart {
            child: 2,
            restart: 3,
        });
        round_trip(TxnEvent::TimedOut {
            step: 5,
            attempt: 0,
        });
        round_trip(RunCommand::Step {
            step: 10,
            lr: 3e-4,
            gate: crate::core::monitor::SpikeGate {
                max_loss: 9.5,
                max_grad_norm: f64::INFINITY,
            },
        });
        round_trip(DetectorEvent::Heartbeat {
            member: 1,
            progress: 99,
        });
    }

    #[test]
    fn damaged_messages_are_refused_never_decoded_wrong() {
        let msg = CoordEvent::Done {
            rank: 1,
            step: 17,
            attempt: 0,
        };
        let bytes = encode(2, &msg).expect("encodes");
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                match decode::<CoordEvent>(&bad) {
                    Err(_) => {}
                    Ok(got) => panic!("byte {i} flipped decoded as {got:?}"),
                }
            }
        }
        for cut in 0..bytes.len() {
            assert!(decode::<CoordEvent>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // the right envelope for another message type is refused by its tag
        let e = decode::<CoordCommand>(&bytes).unwrap_err();
        assert!(matches!(e, CodecError::WrongType { found: 1, .. }), "{e}");
        assert!(e.to_string().contains("CoordCommand"), "{e}");
    }
}

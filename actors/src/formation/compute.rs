//! The compute side of one pipeline rank, shared by the thread executor and the actor shells:
//! turning a schedule instruction into stage operations, and the wire format of the messages.
//!
//! A rank holds one [`StageRunner`] per stage copy placed on it. An instruction becomes one or
//! two [`StageOp`]s (F&B is a forward and a full backward); their inputs come from the rank's
//! inbox and their outputs are addressed by the [`Arrival`] they will satisfy on the receiver.

use crate::core::executor::Arrival;
use crate::core::ops::{StageOp, StageOpResult};
use kernels::fp8::quant::ScaleFormat;
use kernels::model::Batch;
use kernels::model::experts::LocalExpertGroups;
use kernels::model::layers::{ExpertCompute, ExpertGrads, ExpertSite};
use kernels::model::stage::StageRunner;
use std::fmt;
use std::str::FromStr;
use transport::{Frame, FrameMeta};

/// How activations and gradients travel between ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Wire {
    /// Exact f32 (the reference; pipelined training equals single-process training bit for bit).
    #[default]
    F32,
    /// Both directions rounded to BF16 (round to nearest even).
    Bf16,
    /// Activations as FP8 E4M3 in 1×128 tiles with FP32 scales, gradients as BF16.
    Fp8,
}

impl Wire {
    pub fn name(self) -> &'static str {
        match self {
            Wire::F32 => "f32",
            Wire::Bf16 => "bf16",
            Wire::Fp8 => "fp8",
        }
    }

    /// The bytes of `x` on the wire (`d` = row width, for FP8 tiles): a `transport::Frame`
    /// (header, payload, CRC32C) in this wire's format.
    pub fn encode(self, arrival: Arrival, x: Vec<f32>, d: usize) -> Vec<u8> {
        let d = d.max(1);
        let (stage, mb) = match arrival {
            Arrival::Activation { stage, mb } | Arrival::Gradient { stage, mb } => (stage, mb),
        };
        let meta = FrameMeta {
            step: 0,
            micro_batch: mb as u32,
            source: stage as u32,
            destination: stage as u32,
        };
        let shape = [x.len() / d, d];
        let frame = match (self, arrival) {
            (Wire::F32, _) => Frame::from_f32(meta, &shape, x),
            (Wire::Fp8, Arrival::Activation { .. }) => {
                Frame::fp8_from_f32(meta, &shape, &x, ScaleFormat::F32)
            }
            (Wire::Bf16 | Wire::Fp8, _) => Frame::bf16_from_f32(meta, &shape, &x),
        }
        .expect("a [rows, d] tensor always frames");
        frame.encode()
    }

    /// The tensor a frame made by [`Wire::encode`] carries; a damaged frame (bad checksum,
    /// version or length) is refused with the reason.
    pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, transport::FrameError> {
        Frame::decode(bytes).map(|f| f.to_f32())
    }

    /// What `x` looks like after the trip: encoded to a frame and decoded again, so every
    /// message crosses the same byte format a network link would carry. F32 is exact.
    pub fn transmit(self, arrival: Arrival, x: Vec<f32>, d: usize) -> Vec<f32> {
        Wire::decode(&self.encode(arrival, x, d)).expect("a frame decodes from its own encoding")
    }
}

/// Expert-parallel payloads (tokens to an expert group and back) as transport frames: dispatch
/// is FP8 E4M3 in 1×128 tiles under `--wire fp8`, BF16 under `--wire bf16`; combine outputs and
/// the backward's dy and dx are BF16 on both lossy wires; f32 frames on the exact wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpPayload {
    /// Token rows dispatched to an expert.
    Dispatch,
    /// Expert outputs combined back, and backward gradients either way.
    Combine,
}

impl Wire {
    /// Encodes `rows × d` values for the expert-parallel exchange.
    pub fn ep_encode(self, kind: EpPayload, x: &[f32], d: usize) -> Vec<u8> {
        let d = d.max(1);
        let shape = [x.len() / d, d];
        let meta = FrameMeta::default();
        let frame = match (self, kind) {
            (Wire::F32, _) => Frame::from_f32(meta, &shape, x.to_vec()),
            (Wire::Fp8, EpPayload::Dispatch) => {
                Frame::fp8_from_f32(meta, &shape, x, ScaleFormat::F32)
            }
            (Wire::Bf16 | Wire::Fp8, _) => Frame::bf16_from_f32(meta, &shape, x),
        };
        frame.expect("a [rows, d] tensor always frames").encode()
    }

    /// Decodes a payload made by [`Wire::ep_encode`] (CRC checked) where a damaged one cannot
    /// happen (in-process groups); [`Wire::decode`] refuses it with the reason instead.
    pub fn ep_decode(bytes: &[u8]) -> Vec<f32> {
        Wire::decode(bytes).unwrap_or_else(|e| panic!("corrupt expert payload: {e}"))
    }

    /// `x` after the trip to or from an expert group.
    pub fn ep_transmit(self, kind: EpPayload, x: &[f32], d: usize) -> Vec<f32> {
        Wire::ep_decode(&self.ep_encode(kind, x, d))
    }
}

/// In-process expert groups behind the wire: every payload is encoded to bytes and decoded, as
/// it would be between processes (the thread executor's `--ep`).
#[derive(Debug)]
pub struct WiredExperts {
    pub groups: LocalExpertGroups,
    pub wire: Wire,
    pub d: usize,
}

impl ExpertCompute for WiredExperts {
    fn forward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>> {
        let (w, d) = (self.wire, self.d);
        let blocks = blocks
            .into_iter()
            .map(|(i, x)| (i, w.ep_transmit(EpPayload::Dispatch, &x, d)))
            .collect();
        self.groups
            .forward(site, blocks)
            .into_iter()
            .map(|y| w.ep_transmit(EpPayload::Combine, &y, d))
            .collect()
    }

    fn backward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<ExpertGrads> {
        let (w, d) = (self.wire, self.d);
        let blocks = blocks
            .into_iter()
            .map(|(i, x)| (i, w.ep_transmit(EpPayload::Combine, &x, d)))
            .collect();
        self.groups
            .backward(site, blocks)
            .into_iter()
            .map(|mut g| {
                g.dx = w.ep_transmit(EpPayload::Combine, &g.dx, d);
                g
            })
            .collect()
    }

    fn reset(&mut self) {
        self.groups.reset();
    }

    fn load_from(&mut self, full: &dyn kernels::model::params::TensorSource) {
        self.groups.load_from(full);
    }
}

impl fmt::Display for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Wire {
    type Err = String;
    fn from_str(s: &str) -> Result<Wire, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(Wire::F32),
            "bf16" => Ok(Wire::Bf16),
            "fp8" => Ok(Wire::Fp8),
            other => Err(format!(
                "unknown wire format {other:?}: expected f32, bf16 or fp8"
            )),
        }
    }
}

/// Runs one operation on a stage copy; `batches` are the step's micro-batches.
pub fn exec_op(runner: &mut StageRunner, batches: &[Batch], op: StageOp) -> StageOpResult {
    match op {
        StageOp::Forward { mb, input } => {
            let (out, stats) = runner.forward(mb, &batches[mb], input);
            StageOpResult::Forward { out, stats }
        }
        StageOp::BackwardInput { mb, dy } => StageOpResult::Backward {
            dx: runner.backward_input(mb, dy),
        },
        StageOp::Weight { mb } => {
            runner.backward_weight(mb);
            StageOpResult::Weight
        }
        StageOp::Backward { mb, dy } => StageOpResult::Backward {
            dx: runner.backward(mb, dy),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wires_round_as_their_formats() {
        let g = Arrival::Gradient { stage: 1, mb: 0 };
        let a = Arrival::Activation { stage: 1, mb: 0 };
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: BF16 ties to even (1.0)
        let x = vec![1.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5];
        assert_eq!(
            Wire::Bf16.transmit(g, x.clone(), 4),
            vec![1.0, 1.0, 1.0 + 4.0 / 256.0, -2.5]
        );
        assert_eq!(Wire::F32.transmit(a, x.clone(), 2), x);
        // FP8 activations: the tile's amax maps to 448, other values round to E4M3
        let y = Wire::Fp8.transmit(a, vec![448.0, 300.0, -1.0, 0.1], 4);
        assert_eq!(y, vec![448.0, 288.0, -1.0, 0.1015625]);
        assert_eq!(Wire::Fp8.transmit(g, vec![1.0 + 1.0 / 256.0], 1), vec![1.0]);
        assert_eq!("FP8".parse::<Wire>(), Ok(Wire::Fp8));
        assert!(
            "f16"
                .parse::<Wire>()
                .unwrap_err()
                .contains("f32, bf16 or fp8")
        );
    }
}

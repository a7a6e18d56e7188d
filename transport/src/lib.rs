//! Moving bytes between actors: tensor frames, codecs and links.
//! Frames carry dtype, shape and a checksum; nothing travels as an unframed blob.
//!
//! Layers (each module imports only those before it): `error` (FrameError, Dtype) ←
//! `codec` (the frame header's bytes) ← `frame` (tensor frames). `link` (envelopes around any
//! payload, the `Link` trait, the in-process link) stands on its own; a frame travels as an
//! envelope's payload. `handshake` (mutual HMAC authentication of a connection) ← `tcp` (the
//! `Link` between processes, on std sockets and threads). Behind features: `rdma` (queue pairs,
//! RDMA write with immediate) and `cuda` (`nvlink`: GPU peer copies); neither has run on
//! hardware here.

pub mod codec;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod link;
#[cfg(feature = "cuda")]
pub mod nvlink;
pub mod paths;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;

pub use error::{Dtype, FrameError};
pub use frame::{Frame, FrameMeta, Payload};
pub use link::{
    Envelope, InProcEndpoint, Link, LinkConfig, LinkError, LinkStats, Message, Received,
    decode_envelope, encode_envelope, in_process_network,
};

//! Moving bytes between actors: tensor frames, codecs and links.
//! Frames carry dtype, shape and a checksum; nothing travels as an unframed blob.

pub mod codec;
pub mod frame;

pub use frame::{Dtype, Frame, FrameError, FrameMeta, Payload};

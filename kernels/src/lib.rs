//! The math of phalanx: tensors, CPU ops with split backward (input grad B, weight grad W),
//! the DeepSeek-V3 model built from them, and the AdamW optimizer.

pub mod copy;
pub mod fp8;
pub mod matmul;
pub mod model;
pub mod ops;
pub mod rng;
pub mod tensor;

pub use matmul::matmul;
pub use tensor::Tensor;

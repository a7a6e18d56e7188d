//! The math of phalanx: tensors, CPU ops with split backward (input grad B, weight grad W),
//! the DeepSeek-V3 model built from them, the AdamW optimizer, and the device a run asks for
//! (`device`: the CPU, or CUDA kernels that are compile-checked but not yet run).

pub mod copy;
pub mod device;
pub mod fp8;
pub mod matmul;
pub mod model;
pub mod ops;
pub mod rng;
pub mod tensor;

pub use matmul::matmul;
pub use tensor::Tensor;

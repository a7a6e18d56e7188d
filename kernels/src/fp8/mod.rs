//! FP8 mixed precision as DeepSeek-V3 does it: E4M3/E5M2 formats, 1×128 / 128×1 / 128×128
//! tile and block quantisation, and CPU FP8 GEMMs with FP32 promotion per 128-wide K block.

pub mod format;
pub mod gemm;
pub mod quant;

pub use format::{
    E4M3_MAX, E5M2_MAX, Fp8Format, decode_e4m3, decode_e4m3_slice, decode_e5m2, decode_e5m2_slice,
    encode_e4m3, encode_e4m3_slice, encode_e5m2, encode_e5m2_slice,
};
pub use gemm::{
    fp8_gemm_dgrad, fp8_gemm_fprop, fp8_gemm_wgrad, linear_dgrad_fp8, linear_fprop_fp8,
    linear_wgrad_fp8, to_bf16,
};
pub use quant::{Fp8Tensor, ScaleFormat, ScaleLayout, TILE, dequantize, quantize};

//! FP8 mixed precision as DeepSeek-V3 does it: E4M3/E5M2 formats, 1×128 / 128×1 / 128×128
//! tile and block quantisation, and CPU FP8 GEMMs with FP32 promotion per 128-wide K block.

pub use format::{
    E4M3_MAX, E5M2_MAX, Fp8Format, decode_e4m3, decode_e4m3_slice, decode_e5m2, decode_e5m2_slice,
    encode_e4m3, encode_e4m3_slice, encode_e5m2, encode_e5m2_slice,
};
pub use gemm::{
    fp8_gemm_dgrad, fp8_gemm_fprop, fp8_gemm_wgrad, linear_dgrad_fp8, linear_fprop_fp8,
    linear_wgrad_fp8, to_bf16,
};
pub use quant::{Fp8Tensor, ScaleFormat, ScaleLayout, TILE, dequantize, quantize};

/// `simd_fn!(fn name(args…) => body)` defines `name`, which runs the `#[inline(always)]` fn
/// `body` compiled with AVX-512 when this CPU has it (16-lane loops), else for the base target.
macro_rules! simd_fn {
    ($vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) => $body:ident) => {
        $vis fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn avx512($($a: $t),*) {
                    $body($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has every feature `avx512` is compiled for.
                    return unsafe { avx512($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}
// (Defined above the `mod` lines so that the submodules see it by textual scope.)

pub mod bench;
pub mod format;
pub mod gemm;
pub mod grouped;
pub mod pack;
pub mod quant;

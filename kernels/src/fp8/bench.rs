//! FP8 throughput on this machine: 1×128 quantise+encode against memcpy bandwidth, and the FP8
//! Fprop GEMM against the f32 GEMM (`kernels::matmul`). Shared by `cargo bench` and `phalanx bench fp8`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::gemm::{fp8_gemm_fprop, linear_fprop_fp8};
use super::quant::{
    ScaleFormat, ScaleLayout, quantize_1x128, quantize_1x128_into, quantize_128x128,
};
use crate::matmul;
use crate::rng::Rng;

/// Best wall time of `reps` runs of `f` (after one warm-up run).
fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn randn(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.normal()).collect()
}

/// Quantise+encode of a `rows`×`cols` f32 matrix (single thread) and a `gemm`³ Fprop GEMM, as a
/// printable report with the ratios to memcpy and to the f32 GEMM.
pub fn report(rows: usize, cols: usize, gemm: usize) -> String {
    let bytes = (rows * cols * 4) as f64;
    let x = randn(rows * cols, 1);
    let mut copy = vec![0f32; rows * cols];
    let t_copy = best_of(10, || {
        copy.copy_from_slice(black_box(&x));
        black_box(&mut copy);
    });
    let copy_gbs = bytes / t_copy.as_secs_f64() / 1e9;
    let layout = ScaleLayout::Tile1x128;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; layout.num_scales(rows, cols)];
    let mut quant = |fmt| {
        best_of(10, || {
            quantize_1x128_into(black_box(&x), rows, cols, fmt, &mut codes, &mut scales);
            black_box(&mut codes);
        })
    };
    let q_gbs = bytes / quant(ScaleFormat::F32).as_secs_f64() / 1e9;
    let q2_gbs = bytes / quant(ScaleFormat::Ue8m0).as_secs_f64() / 1e9;
    let mut out = format!(
        "fp8 1x128 quantise+encode, {} MiB f32 input ({rows}x{cols}), single thread:\n",
        (rows * cols * 4) >> 20
    );
    out += &format!("  memcpy (copy_from_slice)   {copy_gbs:7.2} GB/s\n");
    out += &format!(
        "  quantise, FP32 scales      {q_gbs:7.2} GB/s of f32 input  = {:5.1}% of memcpy\n",
        100.0 * q_gbs / copy_gbs
    );
    out += &format!(
        "  quantise, UE8M0 scales     {q2_gbs:7.2} GB/s of f32 input  = {:5.1}% of memcpy\n",
        100.0 * q2_gbs / copy_gbs
    );

    // y [m, n] = x [m, k] · Wᵀ, W [n, k]
    let (m, k, n) = (gemm, gemm, gemm);
    let flops = 2.0 * (m * n * k) as f64;
    let a = randn(m * k, 2);
    let w = randn(n * k, 3);
    let mut y = vec![0f32; m * n];
    let t_f32 = best_of(10, || {
        matmul(
            &mut y,
            black_box(&a),
            black_box(&w),
            m,
            k,
            n,
            false,
            true,
            false,
        )
    });
    let aq = quantize_1x128(&a, m, k, ScaleFormat::F32);
    let wq = quantize_128x128(&w, n, k, ScaleFormat::F32);
    let t_fp8 = best_of(10, || {
        fp8_gemm_fprop(&mut y, black_box(&aq), black_box(&wq))
    });
    let t_lin = best_of(10, || {
        black_box(linear_fprop_fp8(black_box(&a), black_box(&w), m, k, n));
    });
    let gf = |t: Duration| flops / t.as_secs_f64() / 1e9;
    out += &format!(
        "gemm {m}x{k}x{n} (y = x·Wᵀ), {} rayon threads, f32 through {}:\n",
        rayon::current_num_threads(),
        crate::matmul::backend()
    );
    out += &format!("  f32 matmul                 {:7.2} GFLOP/s\n", gf(t_f32));
    out += &format!(
        "  fp8 fprop (pre-quantised)  {:7.2} GFLOP/s  = {:5.1}% of f32\n",
        gf(t_fp8),
        100.0 * t_f32.as_secs_f64() / t_fp8.as_secs_f64()
    );
    out += &format!(
        "  fp8 linear (quantise+gemm) {:7.2} GFLOP/s  = {:5.1}% of f32\n",
        gf(t_lin),
        100.0 * t_f32.as_secs_f64() / t_lin.as_secs_f64()
    );
    out
}

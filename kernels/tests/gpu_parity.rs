//! GPU parity (issue 12): the op kernels of `kernels::device::cuda` (the step's own kernels,
//! `tensor.cu`, `moe.cu`, `fp8_gemm.cu`, `fp8_pack.cu` and `router.cu`, are compared through the
//! backend by `gpu_model.rs`), launched through
//! `device::cuda::launch::Gpu`, against the CPU function it mirrors, on fresh random inputs each
//! run (the seed is printed; `PHALANX_PARITY_SEED=N` repeats a run). Kernels whose header claims
//! the CPU's bits are compared bit for bit (a NaN matching any NaN: the GPU writes canonical
//! NaNs); the others within 1e-5 relative (`report::rel_errors`; attention normwise,
//! `report::norm_rel_error`, see `gpu_parity/attention.rs`). Each kernel is also timed
//! (CUDA events, GB/s for the memory-bound ones, TFLOP/s for attention; printed, never
//! asserted). Prints a Markdown table last and fails if any check failed.
//!
//! Without a CUDA driver or device it prints `SKIPPED: <reason>` and passes: CI builds and runs
//! it on machines without a GPU. **It has never run on a GPU yet.**

#![cfg(feature = "cuda")]

#[path = "gpu_parity/attention.rs"]
mod attention;
#[path = "gpu_parity/fp8.rs"]
mod fp8;
#[path = "gpu_parity/ops.rs"]
mod ops;
#[path = "gpu_parity/optim.rs"]
mod optim;
#[path = "gpu_parity/report.rs"]
mod report;

use kernels::device::cuda::launch::Gpu;
use std::time::Instant;

/// One family's checks: they push rows into the report.
type Family = fn(&Gpu, &mut report::Report, u64);

#[test]
fn every_kernel_matches_its_cpu_reference() {
    // no driver or no device: skip with the reason; anything else found by the probe is a failure
    let Some(ordinal) = report::cuda_ordinal() else {
        return;
    };
    let t0 = Instant::now();
    let gpu = Gpu::open(ordinal).unwrap_or_else(|e| panic!("opening cuda:{ordinal}: {e}"));
    let seed = report::seed();
    println!(
        "device {}; kernels compiled for {} and loaded in {:.2} s",
        gpu.info,
        gpu.arch,
        gpu.compile_time.as_secs_f64()
    );
    println!("seed {seed} (repeat with PHALANX_PARITY_SEED={seed})");
    let mut r = report::Report::default();
    let families: [(&str, Family); 4] = [
        ("fp8", fp8::run),
        ("ops", ops::run),
        ("optim", optim::run),
        ("attention", attention::run),
    ];
    for (name, run) in families {
        let t = Instant::now();
        println!("== {name}");
        run(&gpu, &mut r, seed);
        println!("   {name}: {:.1} s", t.elapsed().as_secs_f64());
    }
    r.print();
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(
        r.failures(),
        0,
        "{} parity checks failed (table above)",
        r.failures()
    );
}

/// The harness itself, without a GPU: the comparisons treat NaNs and the floor as documented,
/// and the FP8 inputs hold the adversarial values they promise.
#[test]
fn the_harness_compares_and_generates_as_documented() {
    use report::{code_mismatches, f32_mismatches, norm_rel_error, rel_errors};
    let qnan = f32::from_bits(0x7FC0_0001);
    assert_eq!(f32_mismatches(&[f32::NAN, 1.0], &[qnan, 1.0]), (0, None));
    assert_eq!(f32_mismatches(&[0.0, 1.0], &[-0.0, 1.0]), (1, Some(0)));
    assert_eq!(code_mismatches(&[0x7F, 0x7E], &[0xFF, 0x7E]), (0, None));
    assert_eq!(code_mismatches(&[0x7E], &[0x7F]), (1, Some(0)));
    let (floored, raw) = rel_errors(&[1.0, 1e-9], &[1.0, 0.0]);
    assert!(
        (floored - 1e-6).abs() < 1e-12 && raw.is_infinite(),
        "{floored} {raw}"
    );
    assert_eq!(rel_errors(&[f32::NAN], &[1.0]).0, f64::INFINITY);
    assert_eq!(norm_rel_error(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
    assert!((norm_rel_error(&[3.0, 4.5], &[3.0, 4.0]) - 0.1).abs() < 1e-12);
    assert_eq!(norm_rel_error(&[f32::INFINITY], &[1.0]), f64::INFINITY);
    assert_eq!(norm_rel_error(&[1.0], &[1.0, 2.0]), f64::INFINITY);

    let (rows, cols) = (129, 1000);
    let x = fp8::adversarial(7, rows, cols);
    assert_eq!(x.iter().filter(|v| v.is_nan()).count(), 1);
    assert!(x.iter().any(|v| v.is_infinite()));
    assert!(x.iter().any(|v| v.is_subnormal()));
    assert!(x.iter().any(|v| v.to_bits() == 0x8000_0000));
    let t = kernels::fp8::quantize(
        &x,
        rows,
        cols,
        kernels::fp8::ScaleLayout::Tile1x128,
        kernels::fp8::ScaleFormat::F32,
    );
    assert_eq!(t.scales.iter().filter(|s| s.is_nan()).count(), 1);
    // tie groups: a power-of-two scale, so x/scale lands exactly between two E4M3 values
    let ties = x
        .chunks(128)
        .zip(&t.scales)
        .filter(|(_, s)| s.is_finite() && s.to_bits() & 0x007F_FFFF == 0)
        .flat_map(|(g, s)| g.iter().map(move |v| v / s))
        .filter(|q| {
            let c = kernels::fp8::format::encode_e4m3(*q, true);
            let lo = kernels::fp8::format::decode_e4m3(c & 0x7F);
            let hi = kernels::fp8::format::decode_e4m3((c & 0x7F) + 1);
            let lower = kernels::fp8::format::decode_e4m3((c & 0x7F).saturating_sub(1));
            let a = q.abs();
            a != lo && ((a - lo).abs() == (hi - a).abs() || (a - lo).abs() == (a - lower).abs())
        })
        .count();
    assert!(ties > 100, "only {ties} exact ties");
}

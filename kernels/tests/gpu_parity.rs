//! GPU parity (issue 12): every CUDA C kernel of `kernels::device::cuda`, launched through
//! `device::cuda::launch::Gpu`, against the CPU function it mirrors, on fresh random inputs each
//! run (the seed is printed; `PHALANX_PARITY_SEED=N` repeats a run). Kernels whose header claims
//! the CPU's bits are compared bit for bit (a NaN matching any NaN: the GPU writes canonical
//! NaNs); the others within 1e-5 relative (`report::rel_errors`). Each kernel is also timed
//! (CUDA events, GB/s for the memory-bound ones; printed, never asserted). Prints a Markdown
//! table last and fails if any check failed.
//!
//! Without a CUDA driver or device it prints `SKIPPED: <reason>` and passes: CI builds and runs
//! it on machines without a GPU. **It has never run on a GPU yet.**

#![cfg(feature = "cuda")]

#[path = "gpu_parity/fp8.rs"]
mod fp8;
#[path = "gpu_parity/ops.rs"]
mod ops;
#[path = "gpu_parity/optim.rs"]
mod optim;
#[path = "gpu_parity/report.rs"]
mod report;

use kernels::device::cuda::launch::Gpu;
use kernels::device::{Device, DeviceError};
use std::time::Instant;

/// One family's checks: they push rows into the report.
type Family = fn(&Gpu, &mut report::Report, u64);

fn seed() -> u64 {
    match std::env::var("PHALANX_PARITY_SEED") {
        Ok(s) => s.parse().expect("PHALANX_PARITY_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

#[test]
fn every_kernel_matches_its_cpu_reference() {
    let ordinal = std::env::var("PHALANX_PARITY_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // no driver or no device: skip with the reason; anything else found by the probe is a failure
    match Device::Cuda(ordinal).probe() {
        Err(e @ (DeviceError::NoDriver(_) | DeviceError::NoSuchDevice { .. })) => {
            println!("SKIPPED: {e}");
            return;
        }
        Err(e) => panic!("the CUDA probe failed: {e}"),
        Ok(_) => {}
    }
    let t0 = Instant::now();
    let gpu = Gpu::open(ordinal).unwrap_or_else(|e| panic!("opening cuda:{ordinal}: {e}"));
    let seed = seed();
    println!(
        "device {}; kernels compiled for {} and loaded in {:.2} s",
        gpu.info,
        gpu.arch,
        gpu.compile_time.as_secs_f64()
    );
    println!("seed {seed} (repeat with PHALANX_PARITY_SEED={seed})");
    let mut r = report::Report::default();
    let families: [(&str, Family); 3] =
        [("fp8", fp8::run), ("ops", ops::run), ("optim", optim::run)];
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

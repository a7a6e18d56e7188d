//! The GPU parity table: `common/parity.rs` (rows, comparisons, random inputs; shared with the
//! host emulation) plus what only a GPU run has: failed launches and timings as GB/s or TFLOP/s.

#[path = "../common/parity.rs"]
mod parity;

pub use parity::*;

use kernels::device::cuda::launch::GpuError;

impl Report {
    /// A failed launch or transfer (the rest of the run may fail with it: a faulting kernel
    /// poisons the context).
    pub fn error(&mut self, kernel: &str, shape: &str, e: &GpuError) {
        self.push(kernel, shape, "error", e.to_string(), Verdict::Fail);
    }

    /// Mean time of one launch, and the bandwidth if `bytes` moved (informative only).
    pub fn timing(&mut self, kernel: &str, shape: &str, ms: Result<f64, GpuError>, bytes: f64) {
        let value = match ms {
            Ok(ms) if bytes > 0.0 => format!("{ms:.4} ms, {:.0} GB/s", bytes / (ms * 1e-3) / 1e9),
            Ok(ms) => format!("{ms:.4} ms"),
            Err(e) => format!("timing failed: {e}"),
        };
        self.push(kernel, shape, "time (mean of 20)", value, Verdict::Info);
    }

    /// Mean time of one launch sequence and the TFLOP/s of `flops` (informative only).
    pub fn timing_flops(
        &mut self,
        kernel: &str,
        shape: &str,
        ms: Result<f64, GpuError>,
        flops: f64,
    ) {
        let value = match ms {
            Ok(ms) => format!("{ms:.4} ms, {:.2} TFLOP/s", flops / (ms * 1e-3) / 1e12),
            Err(e) => format!("timing failed: {e}"),
        };
        self.push(kernel, shape, "time (mean of 20)", value, Verdict::Info);
    }
}

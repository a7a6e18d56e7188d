//! The parity table: one row per (kernel, shape, metric) with a verdict, the comparisons that
//! fill it (bit for bit with NaN matching any NaN, max relative error), timings as GB/s or
//! TFLOP/s, and the random inputs (adversarial values included) the checks share.

use kernels::device::cuda::launch::GpuError;
use kernels::rng::Rng;
use rayon::prelude::*;

/// Relative tolerance of the f32 ops whose kernels do not claim the CPU's bits.
pub const REL_TOL: f64 = 1e-5;
/// The floor of the relative error's denominator, as a share of the CPU tensor's largest
/// magnitude: elements that cancel to near zero are judged against the tensor's scale.
pub const REL_FLOOR: f64 = 1e-3;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Fail,
    Info,
}

pub struct Row {
    pub kernel: String,
    pub shape: String,
    pub metric: String,
    pub value: String,
    pub verdict: Verdict,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

/// Max relative error |g − c| / max(|c|, REL_FLOOR·‖c‖∞) and the same without the floor (over
/// elements with c ≠ 0); a NaN or infinity on one side only, or unequal infinities, is ∞.
pub fn rel_errors(gpu: &[f32], cpu: &[f32]) -> (f64, f64) {
    let scale = cpu
        .par_iter()
        .filter(|c| c.is_finite())
        .map(|c| c.abs() as f64)
        .reduce(|| 0.0, f64::max);
    let floor = (scale * REL_FLOOR).max(f64::MIN_POSITIVE);
    gpu.par_iter()
        .zip(cpu)
        .map(|(&g, &c)| {
            if (g.is_nan() && c.is_nan()) || (g.is_infinite() && g == c) {
                return (0.0, 0.0);
            }
            if !g.is_finite() || !c.is_finite() {
                return (f64::INFINITY, f64::INFINITY);
            }
            let d = (g as f64 - c as f64).abs();
            let c = (c as f64).abs();
            let raw = if c > 0.0 {
                d / c
            } else if d > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            (d / c.max(floor), raw)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0.max(b.0), a.1.max(b.1)))
}

/// The normwise relative error ‖g − c‖₂ / ‖c‖₂ in f64 (0 when both are zero); a non-finite
/// element on either side, or unequal lengths, is ∞. For outputs that are long sums with
/// cancellation (attention), where single elements near zero carry the sum's rounding.
pub fn norm_rel_error(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() {
        return f64::INFINITY;
    }
    let (diff, norm) = gpu
        .par_iter()
        .zip(cpu)
        .map(|(&g, &c)| {
            if !g.is_finite() || !c.is_finite() {
                return (f64::INFINITY, 0.0);
            }
            let d = g as f64 - c as f64;
            (d * d, c as f64 * c as f64)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    if diff == 0.0 {
        0.0
    } else {
        (diff / norm).sqrt()
    }
}

/// Elements whose bits differ, a NaN matching any NaN (payload and sign may differ); the first.
pub fn f32_mismatches(gpu: &[f32], cpu: &[f32]) -> (usize, Option<usize>) {
    mismatches(gpu, cpu, |g, c| {
        g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan())
    })
}

/// As `f32_mismatches` for E4M3 codes (0x7F and 0xFF are NaN).
pub fn code_mismatches(gpu: &[u8], cpu: &[u8]) -> (usize, Option<usize>) {
    mismatches(gpu, cpu, |g, c| {
        g == c || (g & 0x7F == 0x7F && c & 0x7F == 0x7F)
    })
}

/// As `f32_mismatches` for bf16 bits.
pub fn bf16_mismatches(gpu: &[u16], cpu: &[u16]) -> (usize, Option<usize>) {
    let nan = |b: u16| b & 0x7F80 == 0x7F80 && b & 0x007F != 0;
    mismatches(gpu, cpu, |g, c| g == c || (nan(g) && nan(c)))
}

fn mismatches<T: Copy + Sync>(
    gpu: &[T],
    cpu: &[T],
    same: impl Fn(T, T) -> bool + Sync,
) -> (usize, Option<usize>) {
    if gpu.len() != cpu.len() {
        return (gpu.len().max(cpu.len()), Some(0));
    }
    let count = gpu
        .par_iter()
        .zip(cpu)
        .filter(|(g, c)| !same(**g, **c))
        .count();
    let first = (count > 0)
        .then(|| gpu.iter().zip(cpu).position(|(g, c)| !same(*g, *c)))
        .flatten();
    (count, first)
}

impl Report {
    pub fn push(&mut self, kernel: &str, shape: &str, metric: &str, value: String, v: Verdict) {
        let row = Row {
            kernel: kernel.to_string(),
            shape: shape.to_string(),
            metric: metric.to_string(),
            value,
            verdict: v,
        };
        println!(
            "  {:<30} {:<22} {:<28} {} {}",
            row.kernel,
            row.shape,
            row.metric,
            row.value,
            verdict_str(v)
        );
        self.rows.push(row);
    }

    pub fn check(&mut self, kernel: &str, shape: &str, metric: &str, value: String, ok: bool) {
        let v = if ok { Verdict::Ok } else { Verdict::Fail };
        self.push(kernel, shape, metric, value, v);
    }

    /// A failed launch or transfer (the rest of the run may fail with it: a faulting kernel
    /// poisons the context).
    pub fn error(&mut self, kernel: &str, shape: &str, e: &GpuError) {
        self.push(kernel, shape, "error", e.to_string(), Verdict::Fail);
    }

    /// Bit-identical f32 outputs (NaN matches NaN).
    pub fn bits(&mut self, kernel: &str, shape: &str, what: &str, gpu: &[f32], cpu: &[f32]) {
        let (n, first) = f32_mismatches(gpu, cpu);
        let value = match first {
            None => format!("0/{} differ", cpu.len()),
            Some(i) => format!(
                "{n}/{} differ; first [{i}] gpu {:e} cpu {:e}",
                cpu.len(),
                gpu.get(i).copied().unwrap_or(f32::NAN),
                cpu.get(i).copied().unwrap_or(f32::NAN)
            ),
        };
        self.check(kernel, shape, &format!("{what} bits"), value, n == 0);
    }

    /// f32 outputs within `REL_TOL` (see `rel_errors`).
    pub fn rel(&mut self, kernel: &str, shape: &str, what: &str, gpu: &[f32], cpu: &[f32]) {
        if gpu.len() != cpu.len() {
            let value = format!("{} values, want {}", gpu.len(), cpu.len());
            return self.check(kernel, shape, what, value, false);
        }
        let (floored, raw) = rel_errors(gpu, cpu);
        let value = format!("max rel {floored:.2e} (unfloored {raw:.2e})");
        self.check(
            kernel,
            shape,
            &format!("{what} rel ≤ 1e-5"),
            value,
            floored <= REL_TOL,
        );
    }

    /// f32 outputs whose normwise relative error (`norm_rel_error`) is within `REL_TOL`; the
    /// element-wise floored error of `rel` is shown beside it, not judged.
    pub fn norm_rel(&mut self, kernel: &str, shape: &str, what: &str, gpu: &[f32], cpu: &[f32]) {
        let norm = norm_rel_error(gpu, cpu);
        let (floored, _) = if gpu.len() == cpu.len() {
            rel_errors(gpu, cpu)
        } else {
            (f64::INFINITY, f64::INFINITY)
        };
        let value =
            format!("‖Δ‖/‖cpu‖ {norm:.2e} (element-wise floored max {floored:.2e}, not judged)");
        let metric = format!("{what} norm rel ≤ 1e-5");
        self.check(kernel, shape, &metric, value, norm <= REL_TOL);
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

    pub fn failures(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Fail)
            .count()
    }

    /// The table, as Markdown.
    pub fn print(&self) {
        println!("\n| kernel | shape | metric | value | verdict |");
        println!("|---|---|---|---|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} | {} |",
                r.kernel,
                r.shape,
                r.metric,
                r.value,
                verdict_str(r.verdict)
            );
        }
        let checks = self
            .rows
            .iter()
            .filter(|r| r.verdict != Verdict::Info)
            .count();
        println!(
            "\nGPU parity: {} of {checks} checks failed, {} timings",
            self.failures(),
            self.rows.len() - checks
        );
    }
}

fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "ok",
        Verdict::Fail => "FAIL",
        Verdict::Info => "info",
    }
}

/// `n` standard normals from `seed` and a purpose, generated in parallel blocks.
pub fn normals(seed: u64, purpose: &str, n: usize) -> Vec<f32> {
    const BLOCK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut rng = Rng::stream(seed ^ (b as u64).wrapping_mul(0x9E37_79B9), purpose);
            chunk.iter_mut().for_each(|v| *v = rng.normal());
        });
    out
}

/// Normals times `scale`.
pub fn scaled(seed: u64, purpose: &str, n: usize, scale: f32) -> Vec<f32> {
    let mut v = normals(seed, purpose, n);
    v.iter_mut().for_each(|x| *x *= scale);
    v
}

/// Sprinkles adversarial values over `x`: zeros, −0.0, subnormals, huge and tiny values.
pub fn sprinkle(x: &mut [f32], seed: u64, purpose: &str, count: usize) {
    if x.is_empty() {
        return;
    }
    let mut rng = Rng::stream(seed, purpose);
    let specials = [
        0.0, -0.0, 1e-40, -3e-42, 1e30, -1e30, 88.7, -88.7, 1e-30, 1e4,
    ];
    for _ in 0..count {
        let i = rng.below(x.len() as u64) as usize;
        x[i] = specials[rng.below(specials.len() as u64) as usize];
    }
}

/// `n` indices below `bound`, half of them among the first 64 (many repeats).
pub fn indices(seed: u64, purpose: &str, n: usize, bound: usize) -> Vec<u32> {
    let mut rng = Rng::stream(seed, purpose);
    (0..n)
        .map(|_| {
            let b = if rng.below(2) == 0 {
                bound.min(64)
            } else {
                bound
            };
            rng.below(b as u64) as u32
        })
        .collect()
}

/// `rows×cols` for the Shape column.
pub fn shape(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

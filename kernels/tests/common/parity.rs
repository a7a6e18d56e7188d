//! The parity table shared by the GPU parity harness (`gpu_parity.rs`) and the host emulation of
//! the CUDA kernels (`cuda_emulation.rs`): one row per (kernel, shape, metric) with a verdict, the
//! comparisons that fill it (bit for bit with NaN matching any NaN, max relative error, normwise
//! error), and the random inputs (adversarial values included) the checks share.

#![allow(dead_code)]

use half::bf16;
use kernels::ops::adamw::{AdamW, Moments};
use kernels::ops::cross_entropy;
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
    kernels::device::norm_rel_error(gpu, cpu)
}

/// The tensor with the worst [`norm_rel_error`] of `got` against `want` (per-tensor gradients, by
/// `names`), and that error; the first tensor when every one matches.
pub fn worst_tensor(
    names: &[String],
    got: &[kernels::Tensor],
    want: &[kernels::Tensor],
) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for (i, (a, w)) in got.iter().zip(want).enumerate() {
        let e = norm_rel_error(&a.data, &w.data);
        if e > worst.0 || worst.1.is_empty() {
            worst = (e, names[i].clone());
        }
    }
    worst
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

/// The CPU's codes and scales of the one-launch quantisers of the experts (`fp8_quant.cu`):
/// each segment of rows of x `[rows, cols]` quantised 128×1 on its own, codes in place and
/// scales band by band (`fp8::grouped::row_bands`).
pub fn quantize_segments(
    x: &[f32],
    offsets: &[usize],
    cols: usize,
    fmt: kernels::fp8::ScaleFormat,
) -> (Vec<u8>, Vec<f32>) {
    let (bands, first) = kernels::fp8::grouped::row_bands(offsets);
    let rows = offsets[offsets.len() - 1];
    let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0f32; bands.len() / 2 * cols]);
    for (e, w) in offsets.windows(2).enumerate() {
        let (lo, hi) = (w[0], w[1]);
        let layout = kernels::fp8::ScaleLayout::Tile128x1;
        let q = kernels::fp8::quantize(&x[lo * cols..hi * cols], hi - lo, cols, layout, fmt);
        codes[lo * cols..hi * cols].copy_from_slice(&q.codes);
        let at = first[e] * cols;
        scales[at..at + q.scales.len()].copy_from_slice(&q.scales);
    }
    (codes, scales)
}

/// The CPU's codes and scales of several matrices `[rows, cols]` quantised 128×128 one after
/// another (the batched quantiser's layout).
pub fn quantize_each_128x128(
    xs: &[Vec<f32>],
    rows: usize,
    cols: usize,
    fmt: kernels::fp8::ScaleFormat,
) -> (Vec<u8>, Vec<f32>) {
    let layout = kernels::fp8::ScaleLayout::Block128x128;
    let qs: Vec<_> = xs
        .iter()
        .map(|x| kernels::fp8::quantize(x, rows, cols, layout, fmt))
        .collect();
    (
        qs.iter().flat_map(|q| q.codes.clone()).collect(),
        qs.iter().flat_map(|q| q.scales.clone()).collect(),
    )
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
    /// Two rows: a quantiser's codes and scales against the CPU's, bit for bit (`note` says which
    /// scale format).
    #[allow(clippy::too_many_arguments)]
    pub fn codes_and_scales(
        &mut self,
        kernel: &str,
        shape: &str,
        note: &str,
        (codes, scales): (&[u8], &[f32]),
        (want_codes, want_scales): (&[u8], &[f32]),
    ) {
        let (bad, _) = code_mismatches(codes, want_codes);
        let ok = bad == 0 && codes.len() == want_codes.len();
        let value = format!("{bad}/{} differ ({note})", want_codes.len());
        self.check(kernel, shape, "codes bits", value, ok);
        let (bad, _) = f32_mismatches(scales, want_scales);
        let ok = bad == 0 && scales.len() == want_scales.len();
        let value = format!("{bad}/{} differ ({note})", want_scales.len());
        self.check(kernel, shape, "scales bits", value, ok);
    }

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
            "\nparity: {} of {checks} checks failed, {} timings",
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

/// The CUDA device the GPU harnesses run on, `PHALANX_PARITY_DEVICE` (default 0), or None
/// after printing `SKIPPED: <reason>` when there is no driver or no such device; any other probe
/// failure is a test failure.
pub fn cuda_ordinal() -> Option<usize> {
    use kernels::device::{Device, DeviceError};
    let ordinal = std::env::var("PHALANX_PARITY_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    match Device::Cuda(ordinal).probe() {
        Err(e @ (DeviceError::NoDriver(_) | DeviceError::NoSuchDevice { .. })) => {
            println!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("the CUDA probe failed: {e}"),
        Ok(_) => Some(ordinal),
    }
}

/// The run's seed: `PHALANX_PARITY_SEED`, else the clock (fresh inputs each run).
pub fn seed() -> u64 {
    match std::env::var("PHALANX_PARITY_SEED") {
        Ok(s) => s.parse().expect("PHALANX_PARITY_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// The AdamW kernel for the moments' type.
pub fn adamw_kernel(bf16_moments: bool) -> &'static str {
    if bf16_moments {
        "adamw_step_bf16"
    } else {
        "adamw_step_f32"
    }
}

/// The step the AdamW checks take: learning rate, 1-based step and gradient scale (a clip factor).
pub const ADAMW_STEP: (f32, u64, f32) = (3e-4, 7, 0.37);

/// One AdamW case of `n` elements: the optimizer, parameters, gradients (adversarial values and
/// one NaN) and moments (F32 or BF16).
pub fn adamw_case(seed: u64, n: usize, bf16_moments: bool) -> (AdamW, Vec<f32>, Vec<f32>, Moments) {
    let opt = AdamW::deepseek_v3(bf16_moments);
    let param = normals(seed, "adamw p", n);
    let mut grad = scaled(seed, "adamw g", n, 1e-3);
    sprinkle(&mut grad, seed, "adamw g specials", n / 1000 + 3);
    grad[n / 2] = f32::NAN;
    let m = scaled(seed, "adamw m", n, 1e-3);
    let v: Vec<f32> = normals(seed, "adamw v", n)
        .iter()
        .map(|x| x * x * 1e-6)
        .collect();
    let moments = if bf16_moments {
        let conv = |x: &[f32]| x.iter().map(|&y| bf16::from_f32(y)).collect();
        Moments::Bf16 {
            m: conv(&m),
            v: conv(&v),
        }
    } else {
        Moments::F32 { m, v }
    };
    (opt, param, grad, moments)
}

impl Report {
    /// The cross-entropy total: the device's f64 sum of its own row losses bit for bit against
    /// the host's sum of those rows in row order, and within 1e-5 of the CPU's total.
    pub fn ce_total(&mut self, s: &str, loss: &[f32], device: f64, cpu: f64) {
        let host_sum: f64 = loss.iter().map(|&l| l as f64).sum();
        let value = format!("device {device:e}, host sum of its rows {host_sum:e}");
        let same = device.to_bits() == host_sum.to_bits();
        self.check("cross_entropy_sum", s, "total bits", value, same);
        let rel = (device - cpu).abs() / cpu.abs().max(f64::MIN_POSITIVE);
        let value = format!("device {device:.9e}, cpu {cpu:.9e}, rel {rel:.2e}");
        self.check(
            "cross_entropy (both)",
            s,
            "total rel ≤ 1e-5",
            value,
            rel <= 1e-5,
        );
    }
}

/// One cross-entropy case: logits `[rows, v]` (a row with one dominant logit, a row of large
/// ones), targets, the CPU's per-row losses (its forward on one row, as f32) and its total.
pub fn ce_case(seed: u64, rows: usize, v: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>, f64) {
    let mut logits = scaled(seed, "ce logits", rows * v, 3.0);
    logits[7 % rows * v] = 80.0;
    if rows > 1 {
        logits[v..2 * v].iter_mut().for_each(|x| *x *= 30.0);
    }
    let targets = indices(seed, "ce targets", rows, v);
    let per_row = (0..rows)
        .map(|i| cross_entropy::forward(&logits[i * v..(i + 1) * v], &targets[i..i + 1], v) as f32)
        .collect();
    let total = cross_entropy::forward(&logits, &targets, v);
    (logits, targets, per_row, total)
}

/// Gradient tensors of the given lengths for the global norm, with adversarial values.
pub fn norm_tensors(seed: u64, lens: &[usize]) -> Vec<Vec<f32>> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut t = normals(seed, &format!("norm {i}"), n);
            sprinkle(&mut t, seed, &format!("norm specials {i}"), n / 5000 + 1);
            t
        })
        .collect()
}

/// One 128-wide group of a row for the FP8 quantisers, of a random kind: Gaussians at magnitudes
/// 1e-6..1e4, zeros and −0.0, subnormals, exact round-to-nearest-even ties, huge values, specials.
fn fp8_group(rng: &mut Rng, out: &mut [f32]) {
    let sign = |rng: &mut Rng| if rng.below(2) == 0 { 1.0f32 } else { -1.0 };
    match rng.below(8) {
        0..=2 => {
            let mag = 10f32.powf(rng.uniform() * 10.0 - 6.0);
            out.iter_mut().for_each(|v| *v = rng.normal() * mag);
        }
        3 => out
            .iter_mut()
            .for_each(|v| *v = if rng.below(2) == 0 { 0.0 } else { -0.0 }),
        4 => out.iter_mut().for_each(|v| {
            *v = sign(rng) * f32::from_bits(1 + rng.below(0x007F_FFFF) as u32);
        }),
        5 => {
            // amax = 448·2^k makes the scale exactly 2^k, so midpoints between E4M3 codes
            // (times 2^k) are exact ties for the round-to-nearest-even encoder
            let pow = 2f32.powi(rng.below(40) as i32 - 20);
            for v in out.iter_mut() {
                let c = rng.below(0x7D) as u8;
                let mid = (kernels::fp8::format::decode_e4m3(c)
                    + kernels::fp8::format::decode_e4m3(c + 1))
                    / 2.0;
                *v = sign(rng) * mid * pow;
            }
            out[rng.below(out.len() as u64) as usize] = sign(rng) * 448.0 * pow;
        }
        6 => out.iter_mut().for_each(|v| {
            *v = if rng.below(64) == 0 {
                sign(rng) * f32::MAX
            } else {
                rng.normal() * 1e37
            };
        }),
        _ => {
            let specials = [0.0, -0.0, 1e-40, -1e-45, 3e38, -2.5e-3, 1e-30];
            out.iter_mut().for_each(|v| {
                *v = if rng.below(4) == 0 {
                    specials[rng.below(specials.len() as u64) as usize]
                } else {
                    rng.normal()
                };
            });
        }
    }
}

/// Adversarial FP8 input `rows × cols`: row-wise groups of random kinds (`fp8_group`), then one
/// NaN and one +∞.
pub fn adversarial(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = vec![0f32; rows * cols];
    x.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut rng = Rng::stream(seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), "fp8");
            row.chunks_mut(128).for_each(|g| fp8_group(&mut rng, g));
        });
    let mut rng = Rng::stream(seed, "fp8 specials");
    let n = x.len() as u64;
    if n > 1 {
        x[rng.below(n) as usize] = f32::INFINITY;
    }
    if n > 0 {
        x[rng.below(n) as usize] = f32::NAN;
    }
    x
}

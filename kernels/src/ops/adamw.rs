//! AdamW on FP32 master weights with decoupled weight decay, global grad-norm clipping and the
//! warm-up / constant / cosine learning-rate schedule of DeepSeek-V3's pre-training.

use half::bf16;
use rayon::prelude::*;

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Store the moments in BF16 (DeepSeek-V3's FP8 recipe): each is computed in f32 from its
    /// stored value and rounded to the nearest bf16 when stored back. Halves optimizer memory.
    pub bf16_moments: bool,
}

impl AdamW {
    /// DeepSeek-V3's AdamW (β1 0.9, β2 0.95, ε 1e-8, weight decay 0.1; the configs' defaults),
    /// its moments in BF16 or f32.
    pub fn deepseek_v3(bf16_moments: bool) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            bf16_moments,
        }
    }
}

/// Per-parameter optimizer state: first and second moments, in f32 or in BF16.
#[derive(Clone, Debug, PartialEq)]
pub enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    Bf16 { m: Vec<bf16>, v: Vec<bf16> },
}

impl Moments {
    /// Zero moments; they switch to BF16 storage on the first step of an optimizer with
    /// `bf16_moments` (zeros convert exactly).
    pub fn zeros(n: usize) -> Moments {
        Moments::F32 {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// The stored moments as f32 (for inspection and tests).
    pub fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            Moments::F32 { m, v } => (m.clone(), v.clone()),
            Moments::Bf16 { m, v } => (
                m.iter().map(|x| x.to_f32()).collect(),
                v.iter().map(|x| x.to_f32()).collect(),
            ),
        }
    }

    pub(crate) fn ensure_bf16(&mut self) {
        if let Moments::F32 { m, v } = self {
            let conv = |x: &Vec<f32>| x.iter().map(|&y| bf16::from_f32(y)).collect();
            *self = Moments::Bf16 {
                m: conv(m),
                v: conv(v),
            };
        }
    }
}

/// The new first and second moments of one element, in f32.
#[inline(always)]
fn moments(g: f32, m: f32, v: f32, c: &StepConsts) -> (f32, f32) {
    let mi = c.b1 * m + (1.0 - c.b1) * g;
    let vi = c.b2 * v + (1.0 - c.b2) * g * g;
    (mi, vi)
}

/// Per-step constants of an update (`#[repr(C)]`: the CUDA kernels of `device::cuda` take the
/// same seven f32 by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConsts {
    pub b1: f32,
    pub b2: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
    pub lr: f32,
    pub wd: f32,
}

impl StepConsts {
    #[inline(always)]
    fn apply(&self, p: &mut f32, mi: f32, vi: f32) {
        *p -= self.wd * *p + self.lr * (mi / self.bc1) / ((vi / self.bc2).sqrt() + self.eps);
    }
}

impl AdamW {
    /// The constants of step `t` (1-based) at learning rate `lr`: bias corrections by f32
    /// `powi`, weight decay folded into `wd` when `decay`.
    pub fn consts(&self, lr: f32, t: u64, decay: bool) -> StepConsts {
        StepConsts {
            b1: self.beta1,
            b2: self.beta2,
            bc1: 1.0 - self.beta1.powi(t as i32),
            bc2: 1.0 - self.beta2.powi(t as i32),
            eps: self.eps,
            lr,
            wd: if decay { lr * self.weight_decay } else { 0.0 },
        }
    }

    /// One update of `param` from the gradient `grad · grad_scale` (the clip factor; 1 for none) at
    /// 1-based step `t`, leaving `grad` zeroed for the next accumulation: one pass over the memory.
    /// `decay` says whether weight decay applies to this tensor (matrices yes, norms no).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        param: &mut [f32],
        grad: &mut [f32],
        grad_scale: f32,
        st: &mut Moments,
        lr: f32,
        t: u64,
        decay: bool,
    ) {
        let c = self.consts(lr, t, decay);
        if self.bf16_moments {
            st.ensure_bf16();
        }
        // one plain loop per chunk (vectorisable); elementwise, so the split cannot change a bit
        const CHUNK: usize = 1 << 14;
        let chunks = param.par_chunks_mut(CHUNK).zip(grad.par_chunks_mut(CHUNK));
        match st {
            Moments::F32 { m, v } => chunks
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| step_f32(p, g, m, v, grad_scale, &c)),
            Moments::Bf16 { m, v } => chunks
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| step_bf16(p, g, m, v, grad_scale, &c)),
        }
    }
}

/// One AdamW update with f32 moments of `p` from `g · grad_scale` under the constants `c`,
/// zeroing `g`: the element rule of [`AdamW::step`] (and of the `adamw_step_f32` kernel).
pub fn step_f32(
    p: &mut [f32],
    g: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad_scale: f32,
    c: &StepConsts,
) {
    for i in 0..p.len() {
        let (mi, vi) = moments(g[i] * grad_scale, m[i], v[i], c);
        g[i] = 0.0;
        m[i] = mi;
        v[i] = vi;
        c.apply(&mut p[i], mi, vi);
    }
}

/// [`step_f32`] with BF16 moments: each computed in f32 from its stored value and rounded to the
/// nearest BF16 when stored; the update reads the rounded moments (the `adamw_step_bf16` kernel's
/// rule).
pub fn step_bf16(
    p: &mut [f32],
    g: &mut [f32],
    m: &mut [bf16],
    v: &mut [bf16],
    grad_scale: f32,
    c: &StepConsts,
) {
    for i in 0..p.len() {
        let gi = g[i] * grad_scale;
        g[i] = 0.0;
        let (mi, vi) = moments(gi, m[i].to_f32(), v[i].to_f32(), c);
        m[i] = bf16::from_f32(mi);
        v[i] = bf16::from_f32(vi);
        c.apply(&mut p[i], m[i].to_f32(), v[i].to_f32());
    }
}

/// The L2 norm of all gradients together, in f64: each tensor in fixed 16 Ki-element chunks, each
/// chunk over 8 interleaved lanes, chunk sums then tensor sums added in order. The order depends
/// only on the shapes, so the value is the same on any number of threads.
pub fn global_norm<'a>(grads: impl Iterator<Item = &'a [f32]>) -> f64 {
    norm_from_square_sums(grads.map(square_sum))
}

/// One tensor's term of [`global_norm`]: Σg² in f64 over fixed chunks, added in order. A
/// pipeline stage computes the terms of its own tensors; [`norm_from_square_sums`] puts them
/// together in tensor order, bit for bit [`global_norm`].
pub fn square_sum(g: &[f32]) -> f64 {
    const CHUNK: usize = 1 << 14;
    let chunks: Vec<f64> = g.par_chunks(CHUNK).map(sum_of_squares).collect();
    sum_of_chunks(&chunks)
}

/// A tensor's term of [`global_norm`] from its chunks' sums of squares, in order.
fn sum_of_chunks(chunks: &[f64]) -> f64 {
    chunks.iter().sum::<f64>()
}

/// [`global_norm`] from every tensor's chunk sums of squares (a device's first pass: tensor i's
/// chunks are `chunk_sums[ends[i − 1]..ends[i]]`), finished as [`square_sum`] and
/// [`norm_from_square_sums`] finish them.
pub fn norm_from_chunk_sums(chunk_sums: &[f64], ends: &[usize]) -> f64 {
    let starts = std::iter::once(0).chain(ends.iter().copied());
    norm_from_square_sums(
        starts
            .zip(ends)
            .map(|(a, &b)| sum_of_chunks(&chunk_sums[a..b])),
    )
}

/// The global norm from the tensors' [`square_sum`]s, in tensor order.
pub fn norm_from_square_sums(terms: impl Iterator<Item = f64>) -> f64 {
    terms.sum::<f64>().sqrt()
}

/// Σx² in f64 over 8 lanes (lane i takes elements i, i+8, …), lanes added in order.
fn sum_of_squares(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut blocks = x.chunks_exact(8);
    for b in &mut blocks {
        for (l, &v) in lanes.iter_mut().zip(b) {
            *l += v as f64 * v as f64;
        }
    }
    for (l, &v) in lanes.iter_mut().zip(blocks.remainder()) {
        *l += v as f64 * v as f64;
    }
    lanes.iter().sum()
}

/// The factor that brings a gradient of norm `norm` under `max_norm` (1 when already under).
pub fn clip_factor(norm: f64, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm as f64 {
        (max_norm as f64 / (norm + 1e-6)) as f32
    } else {
        1.0
    }
}

/// Warm-up (linear from 0), constant until `decay_start`, cosine down to `min_ratio·peak` at `total`.
#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    pub peak: f32,
    pub warmup: u64,
    pub decay_start: u64,
    pub total: u64,
    pub min_ratio: f32,
}

impl LrSchedule {
    /// Learning rate for 1-based step `t`.
    pub fn at(&self, t: u64) -> f32 {
        if t <= self.warmup {
            return self.peak * t as f32 / self.warmup.max(1) as f32;
        }
        if t <= self.decay_start || self.total <= self.decay_start {
            return self.peak;
        }
        let progress =
            ((t - self.decay_start) as f32 / (self.total - self.decay_start) as f32).min(1.0);
        let min = self.peak * self.min_ratio;
        min + (self.peak - min) * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_shape() {
        let s = LrSchedule {
            peak: 1.0,
            warmup: 10,
            decay_start: 50,
            total: 100,
            min_ratio: 0.1,
        };
        assert_eq!(s.at(5), 0.5);
        assert_eq!(s.at(10), 1.0);
        assert_eq!(s.at(50), 1.0);
        assert!((s.at(75) - 0.55).abs() < 1e-6);
        assert!((s.at(100) - 0.1).abs() < 1e-6);
    }

    fn test_opt(weight_decay: f32, bf16_moments: bool) -> AdamW {
        AdamW {
            weight_decay,
            ..AdamW::deepseek_v3(bf16_moments)
        }
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let opt = test_opt(0.1, false);
        let mut p = vec![1.0f32, -2.0];
        let mut st = Moments::zeros(2);
        let mut g = [0.5, -3.0];
        opt.step(&mut p, &mut g, 1.0, &mut st, 0.01, 1, true);
        assert_eq!(g, [0.0, 0.0], "the gradient is consumed");
        assert!(matches!(st, Moments::F32 { .. }));
        // decay 1.0·0.001, then the bias-corrected step is sign(g)·lr
        assert!((p[0] - (1.0 - 0.001 - 0.01)).abs() < 1e-6);
        assert!((p[1] - (-2.0 + 0.002 + 0.01)).abs() < 1e-6);
    }

    #[test]
    fn bf16_moments_are_stored_in_bf16_and_round_to_nearest() {
        let opt = test_opt(0.0, true);
        let g = [0.123_456_7f32, -3.3];
        let mut p = vec![1.0f32, 1.0];
        let mut st = Moments::zeros(2);
        opt.step(&mut p, &mut g.clone(), 1.0, &mut st, 0.01, 1, false);
        let Moments::Bf16 { m, v } = &st else {
            panic!("moments not stored as bf16")
        };
        assert_eq!(m[0], bf16::from_f32(0.1 * g[0]));
        assert_eq!(v[1], bf16::from_f32(0.05 * g[1] * g[1]));
        // the f32 reference differs only by that rounding
        let mut st32 = Moments::zeros(2);
        let mut p32 = vec![1.0f32, 1.0];
        AdamW {
            bf16_moments: false,
            ..opt
        }
        .step(&mut p32, &mut g.clone(), 1.0, &mut st32, 0.01, 1, false);
        let (m32, _) = st32.to_f32();
        assert_ne!(m32[0], m[0].to_f32());
        assert!((m32[0] - m[0].to_f32()).abs() <= m32[0].abs() / 256.0);
    }

    #[test]
    fn clipping() {
        let n = global_norm([&[3.0f32][..], &[4.0f32][..]].into_iter());
        assert_eq!(n, 5.0);
        assert!((clip_factor(n, 1.0) - 0.2).abs() < 1e-6);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        // lanes, chunks and tensors: the value is the plain sum up to rounding
        let big: Vec<f32> = (0..40_003)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.25)
            .collect();
        let plain: f64 = big.iter().map(|&x| x as f64 * x as f64).sum();
        let n = global_norm([&big[..], &big[..7]].into_iter());
        let want = (plain + big[..7].iter().map(|&x| x as f64 * x as f64).sum::<f64>()).sqrt();
        assert!((n - want).abs() <= 1e-12 * want, "{n} vs {want}");
    }

    #[test]
    fn clipped_step_equals_step_on_scaled_gradient() {
        let opt = test_opt(0.1, false);
        let g: Vec<f32> = (0..50_000)
            .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
            .collect();
        let (mut p1, mut p2) = (vec![0.5f32; g.len()], vec![0.5f32; g.len()]);
        let (mut s1, mut s2) = (Moments::zeros(g.len()), Moments::zeros(g.len()));
        let mut scaled: Vec<f32> = g.iter().map(|&x| x * 0.3).collect();
        opt.step(&mut p1, &mut g.clone(), 0.3, &mut s1, 0.01, 1, true);
        opt.step(&mut p2, &mut scaled, 1.0, &mut s2, 0.01, 1, true);
        assert_eq!(p1, p2);
        assert_eq!(s1, s2);
    }
}

//! AdamW on FP32 master weights with decoupled weight decay, global grad-norm clipping and the
//! warm-up / constant / cosine learning-rate schedule of DeepSeek-V3's pre-training.

use rayon::prelude::*;

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Keep the moments at BF16 precision (DeepSeek-V3's FP8 recipe): each is rounded to the
    /// nearest bf16 after its update.
    pub bf16_moments: bool,
}

/// Per-parameter optimizer state: first and second moments.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn zeros(n: usize) -> Moments {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

impl AdamW {
    /// One update of `param` from `grad` (already clipped) at 1-based step `t`.
    /// `decay` says whether weight decay applies to this tensor (matrices yes, norms no).
    pub fn step(
        &self,
        param: &mut [f32],
        grad: &[f32],
        st: &mut Moments,
        lr: f32,
        t: u64,
        decay: bool,
    ) {
        let bc1 = 1.0 - self.beta1.powi(t as i32);
        let bc2 = 1.0 - self.beta2.powi(t as i32);
        let wd = if decay { lr * self.weight_decay } else { 0.0 };
        let (b1, b2, eps, bf16) = (self.beta1, self.beta2, self.eps, self.bf16_moments);
        // one plain loop per chunk (vectorisable); elementwise, so the split cannot change a bit
        const CHUNK: usize = 1 << 14;
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(st.m.par_chunks_mut(CHUNK))
            .zip(st.v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let g = g[i];
                    let mut mi = b1 * m[i] + (1.0 - b1) * g;
                    let mut vi = b2 * v[i] + (1.0 - b2) * g * g;
                    if bf16 {
                        mi = half::bf16::from_f32(mi).to_f32();
                        vi = half::bf16::from_f32(vi).to_f32();
                    }
                    m[i] = mi;
                    v[i] = vi;
                    p[i] -= wd * p[i] + lr * (mi / bc1) / ((vi / bc2).sqrt() + eps);
                }
            });
    }
}

/// The L2 norm of all gradients together, summed in the given (fixed) order in f64.
pub fn global_norm<'a>(grads: impl Iterator<Item = &'a [f32]>) -> f64 {
    grads
        .map(|g| g.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .sum::<f64>()
        .sqrt()
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

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            bf16_moments: false,
        };
        let mut p = vec![1.0f32, -2.0];
        let mut st = Moments::zeros(2);
        opt.step(&mut p, &[0.5, -3.0], &mut st, 0.01, 1, true);
        // decay 1.0·0.001, then the bias-corrected step is sign(g)·lr
        assert!((p[0] - (1.0 - 0.001 - 0.01)).abs() < 1e-6);
        assert!((p[1] - (-2.0 + 0.002 + 0.01)).abs() < 1e-6);
    }

    #[test]
    fn clipping() {
        let n = global_norm([&[3.0f32][..], &[4.0f32][..]].into_iter());
        assert_eq!(n, 5.0);
        assert!((clip_factor(n, 1.0) - 0.2).abs() < 1e-6);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
    }
}

//! Shared helpers of the kernels integration tests: directional finite-difference checks (a
//! gradient g of f at x passes when (f(x+εu) − f(x−εu))/2ε ≈ g·u for random unit directions u),
//! and the device-step tests' random batches and routing held apart.

#![allow(dead_code)]

use kernels::model::{Batch, DeepSeekV3};
use kernels::rng::Rng;
use std::path::PathBuf;

pub fn random(n: usize, std: f32, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// `b` random windows of `t + 1` tokens below `vocab`, as a batch.
pub fn random_batch(rng: &mut Rng, vocab: usize, b: usize, t: usize) -> Batch {
    let w: Vec<u32> = (0..b * (t + 1))
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    Batch::from_windows(&w, b, t)
}

/// Routing biases 2 apart (expert 0 highest): every token picks the same experts whatever the
/// rounding, so a BF16 step and an f32 step route alike and their gradients are comparable. With
/// the natural small biases a few near-tied tokens pick other experts under BF16, and those
/// experts' gradients differ at O(1).
pub fn separate_routing(m: &mut DeepSeekV3) {
    for id in m.moe_biases() {
        let t = &mut m.params.tensors[id.0];
        let e = t.data.len();
        for (i, b) in t.data.iter_mut().enumerate() {
            *b = 2.0 * (e - i) as f32;
        }
    }
}

pub fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// Checks `grad` against central differences of `f` around `x` along three random directions.
/// Returns the worst relative error |fd − g·u| / max(|fd|, floor).
pub fn check_directional(
    name: &str,
    x: &[f32],
    grad: &[f32],
    f: impl Fn(&[f32]) -> f64,
    eps: f32,
    tol: f64,
    seed: u64,
) -> f64 {
    check_directional_piecewise(name, x, grad, |v| Some(f(v)), eps, tol, seed)
}

/// As `check_directional`, for a piecewise-smooth `f` that returns `None` when the point crossed a
/// discontinuity (e.g. the router picked other experts); ε then shrinks until both sides are smooth.
pub fn check_directional_piecewise(
    name: &str,
    x: &[f32],
    grad: &[f32],
    f: impl Fn(&[f32]) -> Option<f64>,
    eps: f32,
    tol: f64,
    seed: u64,
) -> f64 {
    assert_eq!(x.len(), grad.len(), "{name}: gradient has the wrong length");
    let mut rng = Rng::new(seed);
    let mut worst = 0.0f64;
    for _ in 0..3 {
        let mut u: Vec<f32> = (0..x.len()).map(|_| rng.normal()).collect();
        let norm = dot(&u, &u).sqrt() as f32;
        u.iter_mut().for_each(|v| *v /= norm);
        let mut e = eps;
        let fd = loop {
            let plus: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a + e * b).collect();
            let minus: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a - e * b).collect();
            if let (Some(fp), Some(fm)) = (f(&plus), f(&minus)) {
                break (fp - fm) / (2.0 * e as f64);
            }
            e /= 3.0;
            assert!(e > eps / 100.0, "{name}: no smooth neighbourhood found");
        };
        let an = dot(grad, &u);
        let floor = 1e-3f64.max(0.05 * dot(grad, grad).sqrt());
        let rel = (fd - an).abs() / fd.abs().max(floor);
        assert!(
            rel < tol,
            "{name}: finite difference {fd:.6e} vs analytic {an:.6e} (rel {rel:.2e})"
        );
        worst = worst.max(rel);
    }
    worst
}

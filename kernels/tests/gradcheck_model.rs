//! Whole-model finite-difference check on configs/micro.toml: every parameter tensor's gradient
//! (main blocks, MoE experts and router, MTP module, embedding, head) against the objective.

mod common;

use common::{check_directional_piecewise, configs_dir};
use kernels::model::{Batch, DeepSeekV3, RunConfig};
use kernels::rng::Rng;

#[test]
fn every_parameter_group_matches_finite_differences() {
    let mut cfg = RunConfig::load(&configs_dir().join("micro.toml"))
        .unwrap()
        .model;
    cfg.aux_loss_alpha = 0.05; // make the balance loss visible in the check
    let mut model = DeepSeekV3::new(&cfg, 0.2, 7);
    // non-trivial norms and routing biases
    let mut rng = Rng::new(11);
    for (i, name) in model.params.names.clone().iter().enumerate() {
        if name.contains("norm") {
            model.params.tensors[i]
                .data
                .iter_mut()
                .for_each(|v| *v = 1.0 + 0.2 * rng.normal());
        }
        if name.ends_with("e_score_correction_bias") {
            model.params.tensors[i]
                .data
                .iter_mut()
                .for_each(|v| *v = 0.05 * rng.normal());
        }
    }
    let (b, t) = (2, 8);
    let windows: Vec<u32> = (0..b * (t + 1))
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let batch = Batch::from_windows(&windows, b, t);
    let lambda = 0.3;
    let mut grads = model.params.zeros_like();
    let base = model.forward_backward(&batch, lambda, &mut grads);
    assert!(base.mtp_loss > 0.0 && base.balance_loss > 0.0);
    let mut checked = 0;
    // `i` indexes four parallel arrays (flags, names, tensors, grads) and seeds the check
    #[allow(clippy::needless_range_loop)]
    for i in 0..model.params.len() {
        if !model.params.trainable[i] {
            continue;
        }
        let name = model.params.names[i].clone();
        let x0 = model.params.tensors[i].data.clone();
        let f = |x: &[f32]| {
            let mut m = model.clone();
            m.params.tensors[i].data.copy_from_slice(x);
            let mut g = m.params.zeros_like();
            let s = m.forward_backward(&batch, lambda, &mut g);
            (s.loads == base.loads).then_some(s.objective)
        };
        check_directional_piecewise(&name, &x0, &grads[i].data, f, 1e-2, 2e-2, i as u64);
        checked += 1;
    }
    assert_eq!(
        checked,
        model.params.len() - 2,
        "all but the two routing biases"
    );
}

/// DeepGEMM's measure: 1 − 2·Σxy / Σ(x² + y²), 0 for identical tensors.
fn calc_diff(x: &[f32], y: &[f32]) -> f64 {
    let (mut xy, mut sq) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        xy += a as f64 * b as f64;
        sq += a as f64 * a as f64 + b as f64 * b as f64;
    }
    if sq == 0.0 { 0.0 } else { 1.0 - 2.0 * xy / sq }
}

#[test]
fn fp8_gradients_track_f32_gradients() {
    let cfg = RunConfig::load(&configs_dir().join("micro.toml"))
        .unwrap()
        .model;
    let reference = DeepSeekV3::new(&cfg, 0.02, 3);
    let mut fp8 = reference.clone();
    fp8.set_precision(kernels::model::Precision::Fp8);
    let mut rng = Rng::new(5);
    let (b, t) = (2, 16);
    let windows: Vec<u32> = (0..b * (t + 1))
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let batch = Batch::from_windows(&windows, b, t);
    let mut g32 = reference.params.zeros_like();
    let s32 = reference.forward_backward(&batch, 0.3, &mut g32);
    let mut g8 = fp8.params.zeros_like();
    let s8 = fp8.forward_backward(&batch, 0.3, &mut g8);
    assert_ne!(s32.loss, s8.loss, "fp8 must change the arithmetic");
    assert!(
        (s32.loss - s8.loss).abs() / s32.loss < 1e-2,
        "{} vs {}",
        s32.loss,
        s8.loss
    );
    // a few tokens may route differently under fp8, so compare all gradients together
    let all8: Vec<f32> = g8.iter().flat_map(|g| g.data.iter().copied()).collect();
    let all32: Vec<f32> = g32.iter().flat_map(|g| g.data.iter().copied()).collect();
    let d = calc_diff(&all8, &all32);
    println!(
        "fp8 vs f32: loss {} vs {}, gradients calc_diff {d:.2e}, same routing: {}",
        s8.loss,
        s32.loss,
        s8.loads == s32.loads
    );
    assert!(d > 0.0 && d < 1e-2, "calc_diff {d}");
}

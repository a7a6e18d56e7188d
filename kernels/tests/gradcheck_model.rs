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

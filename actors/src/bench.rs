//! `phalanx bench train`: training throughput of a config beside this machine's own GEMM peak,
//! measured with the same GEMM library on large square matrices, printed as ratios.

use crate::trainer::TrainState;
use anyhow::Result;
use kernels::matmul::{flops_executed, matmul};
use kernels::model::{Batch, DeepSeekV3, RunConfig};
use kernels::ops::adamw::AdamW;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// This machine's f32 GEMM peak through `kernels::matmul` (best of `reps` on n×n×n).
pub fn gemm_peak_gflops(n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; n * n];
    matmul(&mut c, &a, &b, n, n, n, false, false, false);
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        matmul(&mut c, &a, &b, n, n, n, false, false, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// Throughput of one config's training step.
#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    pub config: String,
    pub parameters: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub gemm_gflop_per_step: f64,
    pub achieved_gflops: f64,
    pub peak_gflops: f64,
    pub ratio_to_peak: f64,
}

/// Times `steps` full training steps (forward, backward, AdamW, bias update) after one warm-up.
pub fn train_step_throughput(
    config: &Path,
    batch: usize,
    seq: usize,
    steps: usize,
    peak: f64,
) -> Result<TrainBench> {
    let rc = RunConfig::load(config)?;
    let t = &rc.training;
    let model = DeepSeekV3::new(&rc.model, t.init_std, 0);
    let parameters = model.num_params();
    let mut state = TrainState::new(model);
    let opt = AdamW {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.adam_eps,
        weight_decay: t.weight_decay,
        bf16_moments: false,
    };
    let data = storage::dataset::Dataset::synthetic(rc.model.vocab_size, 0, 1 << 18);
    let mut run = |step: u64| -> Result<()> {
        let w = data
            .train_batch(0, step, batch, seq)
            .map_err(anyhow::Error::msg)?;
        let b = Batch::from_windows(&w, batch, seq);
        let stats = state
            .model
            .forward_backward(&b, t.mtp_loss_weight, &mut state.grads);
        state.apply(&opt, 1e-4, t.grad_clip, t.bias_update_speed, &stats.loads);
        Ok(())
    };
    run(1)?;
    let f0 = flops_executed();
    let started = Instant::now();
    for s in 0..steps {
        run(2 + s as u64)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let flops = (flops_executed() - f0) as f64;
    let achieved = flops / secs / 1e9;
    Ok(TrainBench {
        config: config.display().to_string(),
        parameters,
        batch,
        seq,
        steps,
        tokens_per_s: (steps * batch * seq) as f64 / secs,
        gemm_gflop_per_step: flops / steps as f64 / 1e9,
        achieved_gflops: achieved,
        peak_gflops: peak,
        ratio_to_peak: achieved / peak,
    })
}

/// The cost of the choreography: the same steps run by the actor formation and by the plain
/// single-process loop over the same micro-batches (same compute threads, same math).
#[derive(Clone, Debug, Serialize)]
pub struct PipelineBench {
    pub config: String,
    pub schedule: String,
    pub pp: usize,
    pub microbatches: usize,
    pub steps: u64,
    pub plain_step_s: f64,
    pub formation_step_s: f64,
    pub ratio: f64,
    pub messages_per_step: usize,
    pub same_weights: bool,
}

/// Seconds per step between the first and the last step callback of a run.
fn step_seconds(
    run: impl FnOnce(
        &mut dyn FnMut(&crate::trainer::StepRecord, u64),
    ) -> Result<crate::trainer::TrainSummary>,
) -> Result<(f64, String)> {
    let mut marks = Vec::new();
    let summary = run(&mut |_, _| marks.push(Instant::now()))?;
    let secs = marks.last().unwrap().duration_since(marks[0]).as_secs_f64();
    Ok((
        secs / (marks.len() - 1).max(1) as f64,
        summary.params_sha256,
    ))
}

pub fn pipeline_overhead(
    opts: &crate::trainer::TrainOptions,
    layout: &crate::formation::Layout,
) -> Result<PipelineBench> {
    let steps = opts.config.training.steps;
    anyhow::ensure!(steps >= 2, "the pipeline benchmark needs at least 2 steps");
    let (plain, plain_sha) =
        step_seconds(|f| crate::trainer::train_microbatched(opts, layout.microbatches, f))?;
    let (formation, formation_sha) =
        step_seconds(|f| crate::formation::train(opts, layout, None, f))?;
    let schedule = crate::schedule::build(layout.schedule, layout.pp, layout.microbatches)?;
    let report = crate::schedule::check(&schedule)?;
    Ok(PipelineBench {
        config: opts.config_path.clone(),
        schedule: layout.schedule.to_string(),
        pp: layout.pp,
        microbatches: layout.microbatches,
        steps,
        plain_step_s: plain,
        formation_step_s: formation,
        ratio: formation / plain,
        messages_per_step: report.messages,
        same_weights: plain_sha == formation_sha,
    })
}

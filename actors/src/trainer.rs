//! The single-process training loop: data → forward/backward → clip → AdamW → bias update → eval,
//! writing metrics and a summary. The actor formation drives the same pieces step by step.

use anyhow::{Context, Result, bail};
use kernels::model::{Batch, DeepSeekV3, Precision, RunConfig, StepStats};
use kernels::ops::adamw::{self, AdamW, LrSchedule, Moments};
use kernels::ops::balance;
use kernels::tensor::Tensor;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use storage::dataset::{DataFormat, Dataset};
use storage::metrics::MetricsLog;

/// Everything `phalanx train` decides before the first step.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub config: RunConfig,
    pub config_path: String,
    pub seed: u64,
    pub data: Option<PathBuf>,
    pub data_format: DataFormat,
    pub out_dir: PathBuf,
    pub init_from_hf: Option<PathBuf>,
    pub precision: Precision,
}

/// One finished step, as logged to metrics.jsonl and shown on the progress bar.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub mtp_loss: f64,
    pub balance_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    pub lr: f32,
    pub grad_norm: f64,
    pub expert_load_max_over_mean: f64,
    pub tokens_per_s: f64,
}

/// The end-of-run summary (`--summary-json`).
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub final_loss_avg10: f64,
    pub initial_eval_loss: f64,
    pub eval_loss: f64,
    pub tokens_per_s: f64,
    pub params_sha256: String,
    pub parameters: usize,
    pub expert_load_max_over_mean: f64,
    pub seed: u64,
    pub config: String,
    pub data: String,
    pub wall_seconds: f64,
    pub metrics: String,
}

/// Model plus optimizer state: what a step changes.
pub struct TrainState {
    pub model: DeepSeekV3,
    pub moments: Vec<Option<Moments>>,
    pub grads: Vec<Tensor>,
    pub step: u64,
}

impl TrainState {
    pub fn new(model: DeepSeekV3) -> TrainState {
        let moments = model
            .params
            .tensors
            .iter()
            .zip(&model.params.trainable)
            .map(|(t, &tr)| tr.then(|| Moments::zeros(t.numel())))
            .collect();
        let grads = model.params.zeros_like();
        TrainState { model, moments, grads, step: 0 }
    }

    /// Clips the accumulated gradients, applies AdamW at `lr` and the bias update with γ; zeroes
    /// the gradients. Returns the pre-clip global gradient norm.
    pub fn apply(&mut self, opt: &AdamW, lr: f32, clip: f32, gamma: f32, loads: &[Vec<u32>]) -> f64 {
        self.step += 1;
        let p = &mut self.model.params;
        let norm = adamw::global_norm(
            self.grads.iter().zip(&p.trainable).filter(|(_, t)| **t).map(|(g, _)| g.data.as_slice()),
        );
        let factor = adamw::clip_factor(norm, clip);
        for i in 0..p.len() {
            if let Some(m) = self.moments[i].as_mut() {
                let g = &mut self.grads[i].data;
                if factor != 1.0 {
                    g.iter_mut().for_each(|v| *v *= factor);
                }
                let decay = p.tensors[i].shape.len() >= 2;
                opt.step(&mut p.tensors[i].data, g, m, lr, self.step, decay);
            }
            self.grads[i].zero_();
        }
        for (bias, l) in self.model.moe_biases().into_iter().zip(loads) {
            balance::bias_update(&mut self.model.params.tensors[bias.0].data, l, gamma);
        }
        norm
    }
}

/// Mean held-out main loss over up to `batches` eval batches.
pub fn evaluate(model: &DeepSeekV3, data: &Dataset, batches: usize, batch: usize, seq: usize) -> Result<f64> {
    let mut total = 0.0;
    let mut n = 0;
    for i in 0..batches {
        let Some(w) = data.eval_batch(i, batch, seq) else { break };
        total += model.eval_loss(&Batch::from_windows(&w, batch, seq));
        n += 1;
    }
    if n == 0 {
        bail!("the held-out split ({} tokens) is shorter than one eval batch of {batch}×{}", data.eval_len(), seq + 1);
    }
    Ok(total / n as f64)
}

/// Opens the data the options name (the synthetic corpus when none).
pub fn open_data(opts: &TrainOptions) -> Result<Dataset> {
    let vocab = opts.config.model.vocab_size;
    Ok(match &opts.data {
        Some(p) => Dataset::open(p, opts.data_format, vocab)?,
        None => {
            let t = &opts.config.training;
            let want = (t.steps as usize * t.batch_size * (t.seq_len + 1)).clamp(1 << 18, 1 << 23);
            Dataset::synthetic(vocab, opts.seed, want)
        }
    })
}

/// Runs a whole training job; `on_step` sees every step (the CLI draws its progress bar from it).
pub fn train(opts: &TrainOptions, mut on_step: impl FnMut(&StepRecord, u64)) -> Result<TrainSummary> {
    let t = &opts.config.training;
    let data = open_data(opts)?;
    tracing::info!(data = %data.description, "data ready");
    let model = match &opts.init_from_hf {
        Some(dir) => {
            let (m, report) = storage::hf::load_dir(dir, opts.seed)?;
            if m.cfg.vocab_size != opts.config.model.vocab_size {
                tracing::warn!("--init-from-hf: the directory's config replaces {}", opts.config_path);
            }
            tracing::info!(loaded = report.loaded, fresh = report.fresh.len(), "initialised from {}", dir.display());
            m
        }
        None => DeepSeekV3::new(&opts.config.model, t.init_std, opts.seed),
    };
    let mut model = model;
    model.set_precision(opts.precision);
    tracing::info!(parameters = model.num_params(), precision = ?opts.precision, "model built");
    let mut state = TrainState::new(model);
    let opt = AdamW {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.adam_eps,
        weight_decay: t.weight_decay,
        bf16_moments: opts.precision == Precision::Fp8,
    };
    let schedule = LrSchedule {
        peak: t.lr,
        warmup: t.warmup_steps,
        decay_start: (t.steps as f32 * t.decay_start_frac) as u64,
        total: t.steps,
        min_ratio: t.min_lr_ratio,
    };
    let mut log = MetricsLog::create(&opts.out_dir).with_context(|| format!("cannot write metrics in {}", opts.out_dir.display()))?;
    let initial_eval = evaluate(&state.model, &data, t.eval_batches, t.batch_size, t.seq_len)?;
    tracing::info!(eval_loss = initial_eval, "before training");
    let started = Instant::now();
    let mut tokens = 0u64;
    let mut last_losses = Vec::new();
    let mut eval_loss = initial_eval;
    let mut last_stats = StepStats::default();
    for step in 1..=t.steps {
        let windows = data.train_batch(opts.seed, step, t.batch_size, t.seq_len).map_err(anyhow::Error::msg)?;
        let batch = Batch::from_windows(&windows, t.batch_size, t.seq_len);
        let stats = state.model.forward_backward(&batch, t.mtp_loss_weight, &mut state.grads);
        if !stats.objective.is_finite() {
            bail!("step {step}: the loss is {} (diverged); lower --lr", stats.objective);
        }
        let lr = schedule.at(step);
        let norm = state.apply(&opt, lr, t.grad_clip, t.bias_update_speed, &stats.loads);
        tokens += (t.batch_size * t.seq_len) as u64;
        let eval = (step % t.eval_every == 0 || step == t.steps)
            .then(|| evaluate(&state.model, &data, t.eval_batches, t.batch_size, t.seq_len))
            .transpose()?;
        if let Some(e) = eval {
            eval_loss = e;
        }
        let record = StepRecord {
            step,
            loss: stats.loss,
            mtp_loss: stats.mtp_loss,
            balance_loss: stats.balance_loss,
            eval_loss: eval,
            lr,
            grad_norm: norm,
            expert_load_max_over_mean: stats.load_imbalance(),
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64(),
        };
        log.write(&serde_json::to_value(&record)?)?;
        on_step(&record, t.steps);
        last_losses.push(stats.loss);
        last_stats = stats;
    }
    let wall = started.elapsed().as_secs_f64();
    let tail = &last_losses[last_losses.len().saturating_sub(10)..];
    Ok(TrainSummary {
        steps: t.steps,
        final_loss: last_losses.last().copied().unwrap_or(f64::NAN),
        final_loss_avg10: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        initial_eval_loss: initial_eval,
        eval_loss,
        tokens_per_s: tokens as f64 / wall,
        params_sha256: state.model.params.sha256(),
        parameters: state.model.num_params(),
        expert_load_max_over_mean: last_stats.load_imbalance(),
        seed: opts.seed,
        config: opts.config_path.clone(),
        data: data.description.clone(),
        wall_seconds: wall,
        metrics: log.path().display().to_string(),
    })
}

//! `phalanx bench train`: training throughput of a config beside this machine's own GEMM peak,
//! measured with the same GEMM library on large square matrices, printed as ratios.

use crate::trainer::TrainState;
use anyhow::Result;
use kernels::matmul::{flops_executed, matmul};
use kernels::model::{Batch, DeepSeekV3, RunConfig};
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
    let opt = crate::trainer::optimizer(t, kernels::model::Precision::F32);
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
    /// Peak resident memory of each run (VmHWM, reset before each; 0 where /proc is missing).
    pub plain_peak_rss_bytes: u64,
    pub formation_peak_rss_bytes: u64,
    pub rss_ratio: f64,
}

/// Resets this process's peak-RSS mark (Linux `clear_refs` 5); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's peak resident set since start or the last [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Seconds per step between the first and the last step callback of a run.
#[cfg(feature = "runtime")]
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

#[cfg(feature = "runtime")]
pub fn pipeline_overhead(
    opts: &crate::trainer::TrainOptions,
    layout: &crate::formation::Layout,
) -> Result<PipelineBench> {
    let steps = opts.config.training.steps;
    anyhow::ensure!(steps >= 2, "the pipeline benchmark needs at least 2 steps");
    reset_peak_rss();
    let (plain, plain_sha) =
        step_seconds(|f| crate::trainer::train_microbatched(opts, layout.microbatches, f))?;
    let plain_rss = peak_rss_bytes();
    reset_peak_rss();
    let (formation, formation_sha) =
        step_seconds(|f| crate::formation::train(opts, layout, None, f))?;
    let formation_rss = peak_rss_bytes();
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
        plain_peak_rss_bytes: plain_rss,
        formation_peak_rss_bytes: formation_rss,
        rss_ratio: formation_rss as f64 / plain_rss.max(1) as f64,
    })
}

/// What a checkpoint costs: the in-memory copy the step loop pays (against a training step; the
/// first copy into fresh buffers, then the steady state, into the last snapshot's buffers), the
/// write to a local-directory store as one shard and as one shard per stage of a 2-stage
/// pipeline (against a plain fsynced file write of the same bytes), and the verified read back.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointBench {
    pub config: String,
    pub checkpoint_bytes: u64,
    /// The first snapshot (fresh buffers: every page touched for the first time).
    pub first_snapshot_s: f64,
    /// Every later snapshot (into the buffers the uploader gave back).
    pub snapshot_s: f64,
    pub step_s: f64,
    /// snapshot_s / step_s: the stall as a fraction of one step.
    pub stall_per_step: f64,
    pub file_write_gb_per_s: f64,
    /// One shard (the plain loop).
    pub store_write_gb_per_s: f64,
    pub write_ratio: f64,
    /// One shard per stage of a 2-stage pipeline, written side by side.
    pub store_write_2_shards_gb_per_s: f64,
    pub write_ratio_2_shards: f64,
    pub store_read_gb_per_s: f64,
    pub same_after_read: bool,
}

/// Best wall time of `reps` runs of `f`.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

pub fn checkpoint_costs(config: &Path, batch: usize, seq: usize) -> Result<CheckpointBench> {
    use crate::checkpoint::{snapshot_into, stage_owners};
    use storage::checkpoint::{self, Shard};
    use storage::store::{Store, block_on};
    let step_s =
        (batch * seq) as f64 / train_step_throughput(config, batch, seq, 2, 1.0)?.tokens_per_s;
    let rc = RunConfig::load(config)?;
    let state = TrainState::new(DeepSeekV3::new(&rc.model, rc.training.init_std, 0));
    let one = stage_owners(&state, 1);
    let t = Instant::now();
    let mut snap = snapshot_into(&state, &one, Vec::new());
    let first_snapshot_s = t.elapsed().as_secs_f64();
    let snapshot_s = best_of(3, || {
        snap = snapshot_into(&state, &one, std::mem::take(&mut snap))
    });
    let bytes: u64 = snap
        .iter()
        .flatten()
        .map(|t| t.data.as_bytes().len() as u64)
        .sum();
    let dir = std::env::temp_dir().join(format!("phalanx-bench-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir.display().to_string())?;
    let whole = snap.pop().unwrap_or_default();
    let sorted = {
        let mut t = whole.clone();
        t.sort_by(|a, b| a.name.cmp(&b.name));
        t
    };
    let one_shard = vec![Shard::new(whole).map_err(anyhow::Error::msg)?];
    let two_shards = snapshot_into(&state, &stage_owners(&state, 2), Vec::new())
        .into_iter()
        .map(Shard::new)
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let raw = vec![7u8; bytes as usize];
    let file = dir.join("plain-write.bin");
    // the store fsyncs (a committed checkpoint must be on disk), so the baseline does too
    let plain = || {
        use std::io::Write;
        let t = Instant::now();
        let mut f = std::fs::File::create(&file)?;
        f.write_all(&raw)?;
        f.sync_all()?;
        Ok::<f64, std::io::Error>(t.elapsed().as_secs_f64())
    };
    // rounds of the three writes in turn (best of each), each checkpoint removed after it is
    // timed, so that all three meet the same page cache and disk
    let (mut file_s, mut write_s, mut write_2_s) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let mut step = 0;
    for round in 0..3 {
        file_s = file_s.min(plain()?);
        for (shards, best) in [(&one_shard, &mut write_s), (&two_shards, &mut write_2_s)] {
            step += 1;
            let t = Instant::now();
            block_on(checkpoint::write_shards(
                &store,
                "bench",
                step,
                shards,
                serde_json::Value::Null,
            ))?;
            *best = best.min(t.elapsed().as_secs_f64());
            let keep = round == 2 && shards.len() == 2;
            if !keep {
                let at = dir.join(format!("bench/checkpoints/step-{step:010}"));
                std::fs::remove_dir_all(at)?;
            }
        }
    }
    let last = step;
    drop((raw, one_shard, two_shards));
    let mut back = Vec::new();
    let read_s = best_of(3, || {
        back = block_on(async {
            let m = checkpoint::read_manifest(&store, "bench", last).await?;
            checkpoint::read_tensors(&store, &m).await
        })
        .unwrap_or_default();
    });
    let _ = std::fs::remove_dir_all(&dir);
    let gb = bytes as f64 / 1e9;
    Ok(CheckpointBench {
        config: config.display().to_string(),
        checkpoint_bytes: bytes,
        first_snapshot_s,
        snapshot_s,
        step_s,
        stall_per_step: snapshot_s / step_s,
        file_write_gb_per_s: gb / file_s,
        store_write_gb_per_s: gb / write_s,
        write_ratio: file_s / write_s,
        store_write_2_shards_gb_per_s: gb / write_2_s,
        write_ratio_2_shards: file_s / write_2_s,
        store_read_gb_per_s: gb / read_s,
        same_after_read: back == sorted,
    })
}

/// Throughput of the device step (`kernels::device::model`) on one config: forward, backward,
/// clipped AdamW and the bias update, all on the backend; losses and routing read back each step
/// as training needs them.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceBench {
    pub config: String,
    pub device: String,
    pub parameters: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    /// Whether the MTP modules ran (λ > 0).
    pub mtp: bool,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// The last timed step's loss (a check that it trained, not a figure of merit).
    pub loss: f64,
    /// When asked for: one more step, profiled (`kernels::device::profile`).
    pub profile: Option<DeviceProfile>,
}

/// Where one profiled device step's time went.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceProfile {
    /// The profiled step's wall time (slower than a timed step: every region synchronises).
    pub step_ms: f64,
    /// The five largest regions and their shares of the step, on one line.
    pub top: String,
    /// Every region: calls, milliseconds and share, the largest first.
    pub table: String,
}

/// Times `steps` device steps after one warm-up step on `backend`; with `profile`, then runs one
/// more step with its regions profiled.
#[allow(clippy::too_many_arguments)]
pub fn device_step_throughput<B: kernels::device::backend::Backend>(
    backend: B,
    config: &Path,
    batch: usize,
    seq: usize,
    steps: usize,
    mtp: bool,
    precision: kernels::model::Precision,
    profile: bool,
) -> Result<DeviceBench> {
    use kernels::device::backend::GemmPrecision;
    use kernels::device::model::DeviceModel;
    let dev = |e: kernels::device::backend::BackendError| anyhow::anyhow!("device step: {e}");
    let rc = RunConfig::load(config)?;
    let t = &rc.training;
    let mut model = DeepSeekV3::new(&rc.model, t.init_std, 0);
    // FP8: the recipe's Linears (`set_precision`) and its BF16 moments, as `phalanx train` runs it
    model.set_precision(precision);
    let parameters = model.num_params();
    let device = backend.describe();
    let mut m = DeviceModel::new(backend, model).map_err(dev)?;
    // FP8 over BF16, as `phalanx train --device` runs it
    m.set_gemm_precision(GemmPrecision::device_baseline(precision));
    let opt = crate::trainer::optimizer(t, precision);
    let lambda = if mtp { t.mtp_loss_weight } else { 0.0 };
    let data = storage::dataset::Dataset::synthetic(rc.model.vocab_size, 0, 1 << 20);
    let run = |m: &mut DeviceModel<B>, step: u64| -> Result<f64> {
        let w = data
            .train_batch(0, step, batch, seq)
            .map_err(anyhow::Error::msg)?;
        let b = Batch::from_windows(&w, batch, seq);
        let stats = m.forward_backward(&b, lambda).map_err(dev)?;
        m.apply(
            &opt,
            1e-4,
            t.grad_clip,
            t.bias_update_speed,
            &stats.loads,
            step,
        )
        .map_err(dev)?;
        Ok(stats.loss)
    };
    run(&mut m, 1)?;
    m.backend.synchronize().map_err(dev)?;
    let started = Instant::now();
    let mut loss = f64::NAN;
    for s in 0..steps {
        loss = run(&mut m, 2 + s as u64)?;
    }
    m.backend.synchronize().map_err(dev)?;
    let secs = started.elapsed().as_secs_f64();
    let profile = if profile {
        m.set_profiling(true);
        let started = Instant::now();
        run(&mut m, 2 + steps as u64)?;
        m.backend.synchronize().map_err(dev)?;
        let wall = started.elapsed().as_secs_f64();
        let p = m.profile().expect("profiling was turned on");
        Some(DeviceProfile {
            step_ms: wall * 1e3,
            top: p.top(5, wall),
            table: p.table(wall),
        })
    } else {
        None
    };
    Ok(DeviceBench {
        config: config.display().to_string(),
        device,
        parameters,
        batch,
        seq,
        steps,
        mtp,
        tokens_per_s: (steps * batch * seq) as f64 / secs,
        step_ms: secs * 1e3 / steps.max(1) as f64,
        loss,
        profile,
    })
}

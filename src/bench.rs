//! `phalanx bench`: the benchmarks behind one subcommand (training throughput on the CPU or a
//! device, the pipeline, the transport, checkpoints, FP8), each printing ratios against this
//! machine's own limits. Flags in, one library call per measurement, results printed.

use anyhow::{Result, bail};
use clap::Args;
use kernels::model::RunConfig;
use std::path::PathBuf;
use storage::dataset::DataFormat;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: `transport` (TCP link vs a plain tokio socket; bytes per step with FP8
    /// and F32 activations), `checkpoint` (snapshot stall, store write and read), `train` (training step throughput of tiny and small vs the GEMM peak) or
    /// `pipeline` (the actor formation's step time vs the plain loop, same micro-batches) or `fp8`
    /// (FP8 quantise+encode vs memcpy, FP8 GEMM vs f32 GEMM).
    #[arg(default_value = "train")]
    what: String,
    /// Configs to measure (default: configs/tiny.toml and configs/small.toml).
    #[arg(long)]
    config: Vec<PathBuf>,
    /// Timed steps per config.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Where the measured steps run: cpu, cuda or cuda:N (`bench train` only: the whole device
    /// step, tokens/s, model TFLOP/s and the share of the device's measured SGEMM ceiling).
    #[arg(long, default_value = "cpu")]
    device: kernels::device::Device,
    /// `bench train --device cuda`: skip the MTP modules (λ = 0), as the PyTorch figures of
    /// scripts/bench_pytorch.py do.
    #[arg(long)]
    no_mtp: bool,
    /// `bench train --device cuda`: f32, bf16 (mixed precision: f32 master weights and moments)
    /// or fp8 (DeepSeek-V3's recipe as `phalanx train` runs it, BF16 moments).
    #[arg(long, default_value = "f32")]
    precision: kernels::model::Precision,
    /// `bench train --device cuda`: after the timed steps, profile one more step (each region of
    /// the step timed between device synchronisations: attention, the MoE layer's routing, routed
    /// and shared experts, the head, the optimizer, …) and print where its time went.
    #[arg(long)]
    profile: bool,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    a.device.ensure_can_train()?;
    if a.device != kernels::device::Device::Cpu && a.what != "train" {
        bail!(
            "--device cuda measures `bench train` only (got `bench {}`)",
            a.what
        );
    }
    if a.profile && (a.device == kernels::device::Device::Cpu || a.what != "train") {
        bail!(
            "--profile is for `bench train --device cuda` (the device step's regions); got `bench {}` on {}",
            a.what,
            a.device
        );
    }
    if a.device == kernels::device::Device::Cpu && a.precision != kernels::model::Precision::F32 {
        bail!(
            "--precision {} is for `bench train --device cuda`; the CPU benchmarks run f32",
            a.precision
        );
    }
    match a.what.as_str() {
        "train" if a.device != kernels::device::Device::Cpu => bench_train_device(a),
        "train" => bench_train(a),
        "pipeline" => bench_pipeline(a),
        "fp8" => {
            print!("{}", kernels::fp8::bench::report(4096, 4096, 1024));
            Ok(())
        }
        "checkpoint" => bench_checkpoint(a),
        "transport" => bench_transport(a),
        other => bail!(
            "unknown benchmark {other:?}: expected `train`, `pipeline`, `fp8`, `checkpoint` or `transport`"
        ),
    }
}

/// The configs a benchmark measures: `--config` (repeatable), else tiny and small.
fn bench_configs(a: &BenchArgs) -> Vec<PathBuf> {
    if a.config.is_empty() {
        vec![
            PathBuf::from("configs/tiny.toml"),
            PathBuf::from("configs/small.toml"),
        ]
    } else {
        a.config.clone()
    }
}

/// The TCP link on loopback beside a plain tokio socket, and the bytes one step puts on the wire.
fn bench_transport(a: BenchArgs) -> Result<()> {
    use actors::cluster::bench::{link_throughput, wire_bytes_per_step};
    for (size, frames) in [(1usize << 20, 512usize), (16 << 20, 48)] {
        let r = link_throughput(size, frames, 5)?;
        println!(
            "tcp link, {} MiB frames ×{}: {:.2} GB/s vs plain tokio socket {:.2} GB/s = {:.2}",
            r.frame_bytes >> 20,
            r.frames,
            r.link_gb_s,
            r.tokio_gb_s,
            r.link_gb_s / r.tokio_gb_s
        );
    }
    for c in bench_configs(&a) {
        let c = c.display().to_string();
        let w = wire_bytes_per_step(&c, a.batch_size, a.seq_len, 4)?;
        println!(
            "{}: --pp {} --schedule dualpipe --microbatches {}: {} activation messages per step: f32 {:.2} MB, fp8 {:.2} MB = {:.2}x fewer; gradients up, parameters and mirrors down (f32): {:.1} MB per step",
            w.config,
            w.pp,
            w.microbatches,
            w.messages,
            w.f32_bytes as f64 / 1e6,
            w.fp8_bytes as f64 / 1e6,
            w.f32_bytes as f64 / w.fp8_bytes as f64,
            w.coordinator_bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// Snapshot stall, store write and read of a checkpoint of tiny and small (or `--config`).
fn bench_checkpoint(a: BenchArgs) -> Result<()> {
    let configs = bench_configs(&a);
    for c in configs {
        let r = actors::bench::checkpoint_costs(&c, a.batch_size, a.seq_len)?;
        println!(
            "{}: checkpoint {:.1} MB; snapshot copy {:.3} s = {:.1}% of a {:.2} s step (the first, into fresh buffers: {:.3} s); plain fsynced file write {:.2} GB/s; store write, 1 shard {:.2} GB/s = {:.0}%, 2 shards side by side {:.2} GB/s = {:.0}%; verified read {:.2} GB/s; read back equal: {}",
            r.config,
            r.checkpoint_bytes as f64 / 1e6,
            r.snapshot_s,
            100.0 * r.stall_per_step,
            r.step_s,
            r.first_snapshot_s,
            r.file_write_gb_per_s,
            r.store_write_gb_per_s,
            100.0 * r.write_ratio,
            r.store_write_2_shards_gb_per_s,
            100.0 * r.write_ratio_2_shards,
            r.store_read_gb_per_s,
            r.same_after_read
        );
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `--pp 4 --schedule dualpipe` (8 micro-batches) on tiny against the plain loop.
fn bench_pipeline(a: BenchArgs) -> Result<()> {
    let config = a
        .config
        .first()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("configs/tiny.toml"));
    let mut rc = RunConfig::load(&config)?;
    rc.training.steps = a.steps.max(2) as u64;
    rc.training.batch_size = a.batch_size;
    rc.training.seq_len = a.seq_len;
    rc.training.eval_every = u64::MAX;
    rc.training.eval_batches = 1;
    let opts = actors::trainer::TrainOptions {
        config: rc,
        config_path: config.display().to_string(),
        seed: 0,
        data: None,
        data_format: DataFormat::Auto,
        out_dir: std::env::temp_dir().join("phalanx-bench-pipeline"),
        init_from_hf: None,
        precision: kernels::model::Precision::F32,
        checkpoints: None,
        store_outages: Vec::new(),
    };
    let layout = actors::formation::Layout {
        pp: 4,
        ep: 1,
        schedule: actors::schedule::ScheduleKind::DualPipe,
        microbatches: 8,
        wire: actors::formation::Wire::F32,
        compute: Default::default(),
    };
    let r = actors::bench::pipeline_overhead(&opts, &layout)?;
    println!(
        "{} --pp {} --schedule {} --microbatches {}: {:.3} s/step vs plain loop {:.3} s/step = {:.3}x; {} messages per step; same weights: {}; peak RSS {:.2} GB vs plain loop {:.2} GB = {:.2}x",
        r.config,
        r.pp,
        r.schedule,
        r.microbatches,
        r.formation_step_s,
        r.plain_step_s,
        r.ratio,
        r.messages_per_step,
        r.same_weights,
        r.formation_peak_rss_bytes as f64 / 1e9,
        r.plain_peak_rss_bytes as f64 / 1e9,
        r.rss_ratio
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn bench_train(a: BenchArgs) -> Result<()> {
    let configs = bench_configs(&a);
    let peak = actors::bench::gemm_peak_gflops(2048, 10);
    println!(
        "machine GEMM peak: {peak:.1} GFLOP/s (f32 2048x2048x2048 through kernels::matmul = {}, {} threads)",
        kernels::matmul::backend(),
        rayon_threads()
    );
    for c in &configs {
        let r = actors::bench::train_step_throughput(c, a.batch_size, a.seq_len, a.steps, peak)?;
        println!(
            "{}: {} params, batch {}x{}: {:.0} tokens/s, {:.2} GFLOP/step of GEMM, {:.1} GFLOP/s achieved = {:.1}% of peak",
            r.config,
            r.parameters,
            r.batch,
            r.seq,
            r.tokens_per_s,
            r.gemm_gflop_per_step,
            r.achieved_gflops,
            100.0 * r.ratio_to_peak
        );
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `bench train --device cuda[:N]`: the device step per config, beside the SGEMM ceiling of the
/// same cuBLAS call measured on the device (f32: the model runs in FP32, TF32 off).
#[cfg(feature = "cuda")]
fn bench_train_device(a: BenchArgs) -> Result<()> {
    use kernels::device::backend::GemmPrecision;
    use kernels::device::cuda::backend::CudaBackend;
    let kernels::device::Device::Cuda(ordinal) = a.device else {
        bail!("bench_train_device needs a CUDA device")
    };
    let open =
        || CudaBackend::open(ordinal).map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"));
    // the ceiling a precision is measured against: its own GEMM's (FP8: cuBLASLt's block-scaled
    // FP8 when the backend runs FP8 on the tensor cores; on the CUDA cores it is held against the
    // BF16 tensor-core ceiling)
    let backend = open()?;
    let gemm = GemmPrecision::device_baseline(a.precision);
    let fp8_ceiling = (a.precision == kernels::model::Precision::Fp8)
        .then(|| backend.fp8.gemm_tflops(&backend.gpu, 8192, 5).ok())
        .flatten();
    let (ceiling, ceiling_name) = match fp8_ceiling {
        Some(t) => (t, "fp8"),
        None => {
            let t = backend
                .gemm_tflops(4096, 5, gemm)
                .map_err(|e| anyhow::anyhow!("GEMM ceiling: {e}"))?;
            (
                t,
                if gemm == GemmPrecision::F32 {
                    "f32"
                } else {
                    "bf16"
                },
            )
        }
    };
    drop(backend);
    let how = if fp8_ceiling.is_some() {
        "8192³ through cuBLASLt, E4M3 with 1×128 and 128×128 FP32 scales"
    } else {
        "4096³ through cuBLAS, f32 accumulation, TF32 off"
    };
    println!("device {ceiling_name} GEMM ceiling: {ceiling:.1} TFLOP/s ({how})");
    for c in &bench_configs(&a) {
        let r = actors::bench::device_step_throughput(
            open()?,
            c,
            a.batch_size,
            a.seq_len,
            a.steps,
            !a.no_mtp,
            a.precision,
            a.profile,
        )?;
        let rc = kernels::model::RunConfig::load(c)?;
        let mut cfg = rc.model.clone();
        if a.no_mtp {
            cfg.num_nextn_predict_layers = 0;
        }
        let per_token = simulations::cost::training_flops_per_token(&cfg, a.seq_len as u64);
        let tflops = per_token * r.tokens_per_s / 1e12;
        println!(
            "{} on {}, {}: {} params, batch {}x{}, MTP {}: {:.0} tokens/s, {:.1} ms/step, {:.2} model TFLOP/s = {:.1}% of the {} GEMM ceiling",
            r.config,
            r.device,
            a.precision,
            r.parameters,
            r.batch,
            r.seq,
            if r.mtp { "on" } else { "off" },
            r.tokens_per_s,
            r.step_ms,
            tflops,
            100.0 * tflops / ceiling,
            ceiling_name
        );
        let mut j = serde_json::to_value(&r)?;
        j["model_tflops"] = serde_json::json!(tflops);
        j["gemm_ceiling_tflops"] = serde_json::json!(ceiling);
        j["precision"] = serde_json::json!(a.precision.to_string());
        if let Some(p) = &r.profile {
            println!(
                "profile of one more step ({:.1} ms, every region synchronised; self time, nested regions apart):\n{}",
                p.step_ms, p.table
            );
            // the table is printed above; the JSON keeps the one-line summary
            j["profile"] = serde_json::json!({"step_ms": p.step_ms, "top": p.top});
        }
        println!("{j}");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_train_device(_: BenchArgs) -> Result<()> {
    unreachable!("Device::ensure_can_train refuses cuda in a build without the feature")
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

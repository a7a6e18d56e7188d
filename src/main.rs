//! The `phalanx` command line: parses flags and hands work to the library crates.
//! Nothing here computes, moves bytes or keeps state.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;

mod bench;
mod cluster;
mod commands;
mod tools;

/// phalanx: fault-tolerant DeepSeek-V3 training as a formation of supervised actors.
#[derive(Parser, Debug)]
#[command(name = "phalanx", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a DeepSeek-V3 model (defaults: configs/tiny.toml on the built-in synthetic corpus).
    Train(Box<TrainArgs>),
    /// Continue a run from the newest checkpoint of its store (`phalanx train --resume`).
    Resume(Box<TrainArgs>),
    /// Mean main-head cross-entropy of a Hugging Face model over a u32 token file.
    Eval(EvalArgs),
    /// Print and draw a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev).
    Schedule(commands::ScheduleArgs),
    /// Measure training throughput against this machine's GEMM peak.
    Bench(bench::BenchArgs),
    /// List the runs recorded in a run directory's journal (status, steps, losses, checkpoints).
    Runs(commands::RunsArgs),
    /// Draw a run as an SVG: loss and eval loss, checkpoints, restarts, rollbacks, tokens/s.
    Report(tools::ReportArgs),
    /// Replay a failure scenario at cluster scale in virtual time (simulations/scenarios/*.toml).
    Simulate(tools::SimulateArgs),
    /// Run `train` as a coordinator process and N worker processes on this machine (one per
    /// pipeline rank), replacing any that dies: `phalanx launch --local 4 -- train --pp 4 ...`.
    Launch(cluster::LaunchArgs),
    /// List a checkpoint store's runs and committed checkpoints (`ls`), read them all back
    /// (`verify`), or remove orphans and all but the newest N intact checkpoints (`gc`).
    Ckpt(commands::CkptArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model + training config (TOML with Hugging Face DeepseekV3Config keys and a [training]
    /// table). Default: configs/tiny.toml as built into the binary, so it runs from any directory.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of optimizer steps (default: the config's training.steps).
    #[arg(long)]
    steps: Option<u64>,
    /// Seed of initialisation, data order and synthetic corpus [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Sequences per step (default: training.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (default: training.seq_len).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate (default: training.lr).
    #[arg(long)]
    lr: Option<f32>,
    /// γ of the auxiliary-loss-free bias update (default: training.bias_update_speed; 0 disables).
    #[arg(long)]
    bias_update_speed: Option<f32>,
    /// Token file: raw text (bytes), .bin/.u16 (u16, llm.c header understood) or .u32. Default: synthetic corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// How to read --data: auto (by extension), text, u16, u32 [default: auto].
    #[arg(long)]
    data_format: Option<String>,
    /// Directory for metrics.jsonl (and the default checkpoint store, DIR/store).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Checkpoint store: a directory, file://DIR or memory:// (default: DIR/store of --out).
    #[arg(long)]
    store: Option<String>,
    /// Checkpoint every N steps; the last step is always checkpointed (0: only the last).
    /// Default 100, or on resume the resumed run's own interval.
    #[arg(long)]
    ckpt_every: Option<u64>,
    /// Write no checkpoints.
    #[arg(long)]
    no_checkpoint: bool,
    /// Continue from the newest checkpoint in the store (its config, seed, data and precision;
    /// --steps may extend the run). `phalanx resume` is the same as `phalanx train --resume`.
    #[arg(long)]
    resume: bool,
    /// With --resume: the run to continue, by its name in the store (default: the newest run
    /// that has a checkpoint).
    #[arg(long)]
    run: Option<String>,
    /// Write the end-of-run summary JSON here (also printed).
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Start from a Hugging Face DeepseekV3 directory (config.json + model.safetensors).
    #[arg(long)]
    init_from_hf: Option<PathBuf>,
    /// Pipeline ranks. With --pp, --microbatches, --schedule or --inject the run uses the actor
    /// formation (Coordinator, NodeSupervisor, GpuActor, StageActor) instead of the plain loop.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Expert-parallel groups: each stage copy's routed experts split over this many
    /// ExpertGroupActors (must divide n_routed_experts and n_group; with --device, on the copy's
    /// GPU). 1 keeps the experts in their stage.
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Pipeline schedule: 1f1b, zb1p, dualpipe, dualpipev (dualpipev runs 2·pp stages on pp ranks).
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Micro-batches per step (must divide the batch size; dualpipe needs an even number).
    /// Default: 2·pp for dualpipe (its full overlap), 1 otherwise.
    #[arg(long)]
    microbatches: Option<usize>,
    /// Encoding of activations and gradients between stages: f32, bf16, fp8.
    #[arg(long, default_value = "f32")]
    wire: String,
    /// Fault-injection plan (TOML [[fault]] tables: at_step, phase, actor, rank, kind).
    #[arg(long)]
    inject: Option<PathBuf>,
    /// Run the formation on plain threads (no actors, no fault handling): the pipeline reference.
    #[arg(long)]
    threads: bool,
    /// Linear layers in f32 (bitwise-deterministic reference), fp8 (DeepSeek-V3's E4M3 recipe;
    /// on a device over a BF16 baseline, as DeepSeek-V3 trains) or bf16 (mixed precision with
    /// f32 master weights, `--device cuda` only) [default: f32].
    #[arg(long)]
    precision: Option<String>,
    /// Where the math runs: cpu, cuda or cuda:N (built with `--features cuda`): every step on
    /// that GPU in one process, or with --pp/--schedule/--inject/--threads the formation with
    /// pipeline rank r's stage copies (and their --ep expert groups) on cuda:N+r (modulo the
    /// devices there are).
    #[arg(long, default_value = "cpu")]
    device: kernels::device::Device,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face DeepseekV3 directory (config.json + model.safetensors, fp32 or bf16).
    #[arg(long, conflicts_with = "store", required_unless_present = "store")]
    hf: Option<PathBuf>,
    /// Or a phalanx checkpoint store: its newest intact checkpoint (see --run, --step), in f32.
    #[arg(long)]
    store: Option<String>,
    /// With --store: the run (default: the newest run that has a checkpoint).
    #[arg(long, requires = "store")]
    run: Option<String>,
    /// With --store: the checkpoint step (default: the newest intact one).
    #[arg(long, requires = "store")]
    step: Option<u64>,
    /// Little-endian u32 token file.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per window; windows of seq-len+1 tokens are taken from the start, the last partial dropped.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
}

/// Keeps large buffers in the heap instead of fresh mmaps: a training step allocates and frees
/// many multi-megabyte activations, and returning each to the kernel costs page faults and TLB
/// shootdowns across the compute threads (≈10% of a step on 2 cores). Two arenas: each arena
/// keeps up to the trim threshold of freed memory, and the formation's many threads (actors,
/// the blocking pool, rayon) would each get one (peak RSS of `bench pipeline` on small: 13.8 GB
/// with glibc's default, 11.0 GB with two). With `GLIBC_TUNABLES` set, glibc's own settings
/// are left alone (measured on small, `bench pipeline`: a 256 KiB mmap threshold lowers the
/// formation's peak RSS by about 0.4 GB and slows the plain loop by about 20%).
fn tune_allocator() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() {
    tune_allocator();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "phalanx=info,actors=info,warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut cli = Cli::parse();
    if cli.command.is_none() {
        // `phalanx` alone runs the main job on its defaults, as `phalanx train` does
        cli = Cli::parse_from(["phalanx", "train"]);
    }
    let result = match cli.command {
        None => unreachable!("filled in above"),
        Some(Command::Train(a)) => train(*a),
        Some(Command::Resume(mut a)) => {
            a.resume = true;
            train(*a)
        }
        Some(Command::Eval(a)) => commands::eval(a),
        Some(Command::Schedule(a)) => commands::schedule(a),
        Some(Command::Bench(a)) => bench::bench(a),
        Some(Command::Runs(a)) => commands::runs(a),
        Some(Command::Report(a)) => tools::report(a),
        Some(Command::Simulate(a)) => tools::simulate(a),
        Some(Command::Ckpt(a)) => commands::ckpt(a),
        Some(Command::Launch(a)) => cluster::launch(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn train(a: TrainArgs) -> Result<()> {
    a.device.ensure_can_train()?;
    let opts = commands::train_options(&a)?;
    let layout = commands::layout(&a)?;
    if let kernels::device::Device::Cuda(ordinal) = a.device {
        return train_cuda(&a, &opts, &layout, ordinal);
    }
    if opts.precision == kernels::model::Precision::Bf16 {
        anyhow::bail!(
            "--precision bf16 is the GPU's mixed precision (--device cuda); the CPU trains f32 or fp8"
        );
    }
    if let Some(world) = actors::cluster::launch::world_from_env(&|k| std::env::var(k).ok())? {
        return cluster::train_in_world(&a, &opts, &layout, &world);
    }
    let inject = inject_plan(a.inject.as_deref())?;
    let summary = with_progress(opts.config.training.steps, |on_step| {
        actors::formation::train_with(&opts, &layout, inject, a.threads, on_step)
    })?;
    print_summary(&summary, a.summary_json.as_deref())
}

/// `--device cuda[:N]`: the single-process run with every step on the GPU (the device step of
/// `kernels::device::model`); with formation flags (`--pp`, `--schedule`, `--inject`,
/// `--threads`), the formation with every stage copy on a GPU (rank r on cuda:N+r, modulo the
/// devices there are), in one process or under `phalanx launch` (each worker process opens its
/// rank's device), expert groups (`--ep`) on their stage copy's device.
#[cfg(feature = "cuda")]
fn train_cuda(
    a: &TrainArgs,
    opts: &actors::trainer::TrainOptions,
    layout: &actors::formation::Layout,
    ordinal: usize,
) -> Result<()> {
    use kernels::device::backend::GemmPrecision;
    let world = actors::cluster::launch::world_from_env(&|k| std::env::var(k).ok())?;
    let plain = actors::formation::Layout {
        microbatches: layout.microbatches,
        ..actors::formation::Layout::default()
    };
    if *layout == plain && a.inject.is_none() && !a.threads && world.is_none() {
        let backend = kernels::device::cuda::backend::CudaBackend::open(ordinal)
            .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"))?;
        let summary = with_progress(opts.config.training.steps, |on_step| {
            actors::engine::train_on_device(opts, backend, layout.microbatches, on_step)
        })?;
        return print_summary(&summary, a.summary_json.as_deref());
    }
    let gemm = GemmPrecision::device_baseline(opts.precision);
    let layout = actors::formation::Layout {
        compute: actors::formation::StagePlacement::Backend {
            device: kernels::device::Device::Cuda(ordinal),
            gemm,
        },
        ..*layout
    };
    if let Some(world) = world {
        // each process's rank on cuda:N+rank (the workers open their devices)
        return cluster::train_in_world(a, opts, &layout, &world);
    }
    let inject = inject_plan(a.inject.as_deref())?;
    let summary = with_progress(opts.config.training.steps, |on_step| {
        actors::formation::train_with(opts, &layout, inject, a.threads, on_step)
    })?;
    print_summary(&summary, a.summary_json.as_deref())
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(
    _: &TrainArgs,
    _: &actors::trainer::TrainOptions,
    _: &actors::formation::Layout,
    _: usize,
) -> Result<()> {
    unreachable!("Device::ensure_can_train refuses cuda in a build without the feature")
}

/// The `--inject` plan, when one is named.
fn inject_plan(path: Option<&std::path::Path>) -> Result<Option<actors::formation::InjectPlan>> {
    path.map(|p| actors::formation::InjectPlan::load(p).map_err(anyhow::Error::msg))
        .transpose()
}

/// Runs `f` with a step callback that draws a progress bar on a terminal and logs evaluations.
fn with_progress<T>(
    steps: u64,
    f: impl FnOnce(&mut dyn FnMut(&actors::trainer::StepRecord, u64)) -> Result<T>,
) -> Result<T> {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(steps)
    } else {
        ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::hidden())
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .context("progress bar template")?,
    );
    let mut last_eval = f64::NAN;
    let mut on_step = |r: &actors::trainer::StepRecord, total: u64| {
        if let Some(e) = r.eval_loss {
            last_eval = e;
            // the log line goes above the bar instead of through it
            bar.suspend(|| {
                tracing::info!(
                    step = r.step,
                    loss = format!("{:.4}", r.loss),
                    eval_loss = format!("{e:.4}"),
                    tokens_per_s = format!("{:.0}", r.tokens_per_s),
                    "eval"
                )
            });
        }
        bar.set_position(r.step);
        bar.set_message(format!(
            "loss {:.4}  eval {:.4}  {:.0} tok/s",
            r.loss, last_eval, r.tokens_per_s
        ));
        if r.step == total {
            bar.finish_and_clear();
        }
    };
    f(&mut on_step)
}

/// Prints the summary JSON and writes it to `path` when given.
fn print_summary(
    summary: &actors::trainer::TrainSummary,
    path: Option<&std::path::Path>,
) -> Result<()> {
    let json = serde_json::to_string_pretty(summary)?;
    if let Some(p) = path {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(p, &json)
            .with_context(|| format!("cannot write summary {}", p.display()))?;
    }
    println!("{json}");
    Ok(())
}

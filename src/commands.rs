//! The subcommands behind `phalanx`: turning flags into library calls and printing results.
//! Only argument handling and output formatting live here.

use crate::{EvalArgs, TrainArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use kernels::model::RunConfig;
use std::path::PathBuf;
use storage::dataset::DataFormat;

/// `configs/tiny.toml` as it was when this binary was built: the default of `phalanx train`.
const EMBEDDED_TINY: &str = include_str!("../configs/tiny.toml");

/// What a run is made of before the flags that tune it: config, seed, data, precision.
struct RunBase {
    config: RunConfig,
    file: String,
    seed: u64,
    data: Option<PathBuf>,
    data_format: DataFormat,
    precision: kernels::model::Precision,
    /// The checkpoint interval the run was started with (resume only).
    ckpt_every: Option<u64>,
}

/// The run as the flags describe it.
fn base_from_flags(a: &TrainArgs) -> Result<RunBase> {
    let precision = a
        .precision
        .as_deref()
        .unwrap_or("f32")
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--precision")?;
    let (config, file) = match &a.config {
        Some(path) => (RunConfig::load(path)?, path.display().to_string()),
        None => {
            let file = "configs/tiny.toml (built in)".to_string();
            (RunConfig::parse(EMBEDDED_TINY, &file)?, file)
        }
    };
    let data_format = a
        .data_format
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--data-format")?;
    Ok(RunBase {
        config,
        file,
        seed: a.seed.unwrap_or(0),
        data: a.data.clone(),
        data_format,
        precision,
        ckpt_every: None,
    })
}

/// The run as the newest checkpoint of `store` recorded it, and that run's name in the store.
fn base_from_checkpoint(store: &str, run: Option<&str>) -> Result<(RunBase, String)> {
    let r = actors::checkpoint::recorded_run(store, run)?;
    let base = RunBase {
        config: r.config,
        file: r.config_file,
        seed: r.seed,
        data: r.data,
        data_format: r.data_format,
        precision: r.precision,
        ckpt_every: r.ckpt_every,
    };
    Ok((base, r.run))
}

pub fn train_options(a: &TrainArgs) -> Result<actors::trainer::TrainOptions> {
    let mut plan = checkpoint_plan(a)?;
    let RunBase {
        mut config,
        file,
        seed,
        data,
        data_format,
        precision,
        ckpt_every,
    } = match plan.as_ref().filter(|p| p.resume) {
        Some(p) => {
            let (base, run) = base_from_checkpoint(&p.store, p.run.as_deref())?;
            // the weights are read from the same run the config came from
            if let Some(p) = plan.as_mut() {
                p.run = Some(run);
            }
            base
        }
        None => base_from_flags(a)?,
    };
    if let (Some(p), None, Some(every)) = (plan.as_mut(), a.ckpt_every, ckpt_every) {
        p.every = every;
    }
    let t = &mut config.training;
    if let Some(s) = a.steps {
        t.steps = s;
    }
    if let Some(b) = a.batch_size {
        t.batch_size = b;
    }
    if let Some(s) = a.seq_len {
        t.seq_len = s;
    }
    if let Some(lr) = a.lr {
        t.lr = lr;
    }
    if let Some(g) = a.bias_update_speed {
        t.bias_update_speed = g;
    }
    config
        .validate_run(&file)
        .context("after applying command-line flags")?;
    let t = &config.training;
    if t.steps == 0 {
        bail!("--steps must be at least 1");
    }
    Ok(actors::trainer::TrainOptions {
        config,
        config_path: file,
        seed,
        data,
        data_format,
        out_dir: a.out.clone(),
        init_from_hf: if a.resume {
            None
        } else {
            a.init_from_hf.clone()
        },
        precision,
        checkpoints: plan,
        store_outages: Vec::new(),
    })
}

/// The store a run checkpoints to: `--store`, else the directory `store` inside `--out`.
fn checkpoint_plan(a: &TrainArgs) -> Result<Option<actors::trainer::CheckpointPlan>> {
    if a.run.is_some() && !a.resume {
        bail!("--run names the run to resume; add --resume (or use phalanx resume)");
    }
    if a.no_checkpoint {
        if a.resume {
            bail!("--no-checkpoint: resuming reads and writes checkpoints");
        }
        return Ok(None);
    }
    if a.resume && (a.config.is_some() || a.init_from_hf.is_some() || a.data.is_some()) {
        bail!(
            "resume: the config, weights and data come from the checkpoint; drop --config, --init-from-hf and --data"
        );
    }
    if a.resume {
        // a resumed run is the run it continues: what would make it another run is refused
        let changed: Vec<&str> = [
            ("--seed", a.seed.is_some()),
            ("--precision", a.precision.is_some()),
            ("--data-format", a.data_format.is_some()),
            ("--batch-size", a.batch_size.is_some()),
            ("--seq-len", a.seq_len.is_some()),
            ("--lr", a.lr.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if !changed.is_empty() {
            bail!(
                "resume: {} would change the run being continued (the checkpoint records its own); drop {} or start a new run with `phalanx train`",
                changed.join(", "),
                if changed.len() == 1 { "it" } else { "them" }
            );
        }
    }
    Ok(Some(actors::trainer::CheckpointPlan {
        store: a
            .store
            .clone()
            .unwrap_or_else(|| a.out.join("store").display().to_string()),
        every: a.ckpt_every.unwrap_or(100),
        resume: a.resume,
        run: a.run.clone(),
    }))
}

/// The formation layout named by `--pp --ep --schedule --microbatches --wire`, its stage copies
/// on the CPU model, or on the device-stage path over the CPU backend when `PHALANX_STAGE_BACKEND`
/// is `cpu` (the path a GPU runs, checkable without one; `--device cuda` puts them on GPUs).
pub fn layout(a: &TrainArgs) -> Result<actors::formation::Layout> {
    let schedule: actors::schedule::ScheduleKind = a.schedule.parse().context("--schedule")?;
    let microbatches = a.microbatches.unwrap_or(match schedule {
        actors::schedule::ScheduleKind::DualPipe => 2 * a.pp,
        _ => 1,
    });
    Ok(actors::formation::Layout {
        pp: a.pp,
        ep: a.ep,
        schedule,
        microbatches,
        wire: a
            .wire
            .parse()
            .map_err(anyhow::Error::msg)
            .context("--wire")?,
        compute: stage_backend(std::env::var("PHALANX_STAGE_BACKEND").ok().as_deref())?,
    })
}

/// Where `PHALANX_STAGE_BACKEND` puts the stage copies: unset, the CPU model; `cpu`, device
/// stages on the CPU backend (f32); anything else is refused by name.
fn stage_backend(v: Option<&str>) -> Result<actors::formation::StagePlacement> {
    use actors::formation::StagePlacement;
    match v {
        None | Some("") => Ok(StagePlacement::Model),
        Some("cpu") => Ok(StagePlacement::Backend {
            device: kernels::device::Device::Cpu,
            gemm: kernels::device::backend::GemmPrecision::F32,
        }),
        Some(other) => bail!(
            "PHALANX_STAGE_BACKEND={other:?}: expected `cpu` (device stages on the CPU backend) or \
             unset (the CPU model); GPUs are chosen with --device cuda[:N]"
        ),
    }
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if a.seq_len == 0 {
        bail!("--seq-len must be at least 1");
    }
    let model = match (&a.hf, &a.store) {
        (Some(dir), _) => {
            let (model, report) = storage::hf::load_dir(dir, 0)?;
            tracing::info!(loaded = report.loaded, "loaded {}", dir.display());
            model
        }
        (None, Some(url)) => {
            let (model, m) = actors::export::model(url, a.run.as_deref(), a.step)?;
            tracing::info!(run = %m.run, step = m.step, "loaded the checkpoint from {url}");
            model
        }
        (None, None) => bail!("give --hf DIR or --store URL"),
    };
    let (windows, loss) = actors::trainer::eval_token_file(&model, &a.data, a.seq_len)?;
    println!("windows={windows} seq_len={}", a.seq_len);
    println!("loss={loss:.6}");
    Ok(())
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// 1f1b, zb1p, dualpipe or dualpipev.
    #[arg(long)]
    kind: String,
    /// Pipeline ranks.
    #[arg(long)]
    ranks: usize,
    /// Micro-batches per step.
    #[arg(long)]
    microbatches: usize,
    /// Write a Gantt chart SVG here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

pub fn schedule(a: ScheduleArgs) -> Result<()> {
    use actors::schedule;
    let kind: schedule::ScheduleKind = a.kind.parse().context("--kind")?;
    let s = schedule::build(kind, a.ranks, a.microbatches)?;
    let report = schedule::check(&s)?;
    let tl = schedule::timeline(&s, &schedule::Costs::EXAMPLE);
    print!("{}", schedule::report(&s, &report, &tl));
    if let Some(path) = &a.svg {
        std::fs::write(path, schedule::svg(&tl))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("Gantt chart written to {}", path.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    /// The run directory whose journal to read (`--out` of `phalanx train`).
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
}

/// `phalanx runs`: the runs recorded in a run directory's journal, oldest first.
pub fn runs(a: RunsArgs) -> Result<()> {
    let dir = a.out.join("journal");
    if !dir.exists() {
        bail!(
            "{}: no journal (no run has used --out {})",
            dir.display(),
            a.out.display()
        );
    }
    // a training run holds the journal: read the list it exports at every change instead
    let runs = match storage::journal::Journal::open(&dir) {
        Ok(journal) => journal.runs_observed()?,
        Err(e) => match storage::journal::Journal::read_export(&dir) {
            Ok(runs) => {
                eprintln!(
                    "{}: held by a running process; showing the list it exports",
                    dir.display()
                );
                runs
            }
            Err(why) => bail!("{e} (and no exported list: {why})"),
        },
    };
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
    println!(
        "{:<24} {:<9} {:>11} {:>8} {:>8} {:>12} {:>8}  config",
        "run", "status", "step", "loss", "eval", "checkpoints", "restarts"
    );
    for r in runs {
        let ckpt = match r.checkpoints.last() {
            Some(last) => format!("{} (last {last})", r.checkpoints.len()),
            None => "0".into(),
        };
        let resumed = r
            .resumed_from
            .map(|s| format!(", resumed from {s}"))
            .unwrap_or_default();
        println!(
            "{:<24} {:<9} {:>11} {:>8} {:>8} {:>12} {:>8}  {}{resumed}",
            r.id,
            r.status,
            format!("{}/{}", r.last_step, r.total_steps),
            fmt(r.last_loss),
            fmt(r.eval_loss),
            ckpt,
            r.restarts,
            r.config,
        );
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CkptArgs {
    /// `ls` (runs and their committed checkpoints), `verify` (read every committed checkpoint
    /// back, checking sizes and checksums), `gc` (remove orphans and old checkpoints) or
    /// `export-hf DIR` (a checkpoint as a Hugging Face DeepseekV3 directory).
    pub what: String,
    /// The store (a directory, file://, memory://, s3://, gs://, az://); default: DIR/store of --out.
    #[arg(long)]
    pub store: Option<String>,
    /// Run directory whose store to use when --store is not given.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Only this run (by its name in the store).
    #[arg(long)]
    pub run: Option<String>,
    /// gc: intact checkpoints kept per run (default 3; 0 is taken as 1, the newest intact one
    /// is never removed).
    #[arg(long)]
    pub keep: Option<usize>,
    /// gc: list what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// export-hf: the checkpoint step (default: the newest intact one).
    #[arg(long)]
    pub step: Option<u64>,
    /// export-hf: the directory to write (config.json, model.safetensors).
    pub dir: Option<PathBuf>,
}

/// `phalanx ckpt ls|verify|gc`: what a store holds, whether it reads back intact, and removing
/// what is no longer needed.
pub fn ckpt(a: CkptArgs) -> Result<()> {
    use storage::checkpoint;
    use storage::store::{Store, block_on};
    let url = a
        .store
        .clone()
        .unwrap_or_else(|| a.out.join("store").display().to_string());
    let verify = match a.what.as_str() {
        "ls" => false,
        "verify" => true,
        "gc" => return ckpt_gc(&a, &url),
        "export-hf" => {
            let dir = a
                .dir
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("ckpt export-hf: give the directory to write"))?;
            let e = actors::export::export_hf(&url, a.run.as_deref(), a.step, dir)?;
            println!(
                "{}: run {} step {}: {} tensors in config.json + model.safetensors ({} MTP tensors left out: transformers' DeepseekV3 has no MTP)",
                dir.display(),
                e.run,
                e.step,
                e.tensors,
                e.mtp_left_out
            );
            return Ok(());
        }
        other => {
            bail!("unknown ckpt command {other:?}: expected `ls`, `verify`, `gc` or `export-hf`")
        }
    };
    if a.step.is_some() || a.dir.is_some() {
        bail!("--step and a directory are for `phalanx ckpt export-hf`");
    }
    if a.keep.is_some() || a.dry_run {
        bail!("--keep and --dry-run are for `phalanx ckpt gc`");
    }
    let store = Store::open(&url)?;
    let mut bad = 0;
    block_on(async {
        let runs = match &a.run {
            Some(r) => vec![r.clone()],
            None => checkpoint::runs(&store).await?,
        };
        if runs.is_empty() {
            println!("{url}: no checkpoints");
        }
        for run in runs {
            let steps = checkpoint::committed_steps(&store, &run).await?;
            let shown = |s: &[u64]| {
                s.iter()
                    .rev()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!("{url}/{run}: {} committed: {}", steps.len(), shown(&steps));
            for &step in steps.iter().take(if verify { usize::MAX } else { 1 }) {
                let m = checkpoint::read_manifest(&store, &run, step).await?;
                let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
                let status = if verify {
                    match checkpoint::read_tensors(&store, &m).await {
                        Ok(_) => "ok".to_string(),
                        Err(e) => {
                            bad += 1;
                            format!("FAILED: {e}")
                        }
                    }
                } else {
                    "newest".to_string()
                };
                let sum = m.shards.first().map_or("", |s| s.checksum());
                println!(
                    "  step {step}: {} tensors in {} shard(s), {:.1} MB, checksum {}…  {status}",
                    m.tensors,
                    m.shards.len(),
                    bytes as f64 / 1e6,
                    &sum[..sum.len().min(12)]
                );
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    if bad > 0 {
        bail!("{bad} checkpoint(s) in {url} failed verification");
    }
    Ok(())
}

/// `phalanx ckpt gc`: the flags to [`storage::gc::gc`], its report printed.
fn ckpt_gc(a: &CkptArgs, url: &str) -> Result<()> {
    let opts = storage::gc::GcOptions {
        run: a.run.clone(),
        keep: a.keep.unwrap_or(3),
        dry_run: a.dry_run,
        lease_expiry: actors::checkpoint::UploadPolicy::from_env()?.lease_expiry,
    };
    let store = storage::store::Store::open(url)?;
    let report = storage::store::block_on(storage::gc::gc(&store, &opts))?;
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!(
        "{url}: gc keeping the newest {} intact checkpoint(s) per run{}",
        report.keep,
        if report.dry_run { " (dry run)" } else { "" }
    );
    for note in &report.notes {
        println!("note: {note}");
    }
    if report.runs.is_empty() {
        println!("{url}: no checkpoints");
    }
    for r in &report.runs {
        let kept: Vec<String> = r.kept.iter().map(u64::to_string).collect();
        println!("{url}/{}: kept step(s) {}", r.run, kept.join(", "));
        for note in &r.notes {
            println!("  note: {note}");
        }
        for c in &r.corrupt {
            println!("  corrupt: {c}");
        }
        for x in &r.removed {
            println!("  {verb} {} ({} bytes): {}", x.key, x.bytes, x.why);
        }
    }
    let freed = report.bytes_freed();
    println!(
        "{verb} {} object(s), {} {freed} bytes ({:.1} MB)",
        report.removed().count(),
        if report.dry_run {
            "would free"
        } else {
            "freed"
        },
        freed as f64 / 1e6
    );
    Ok(())
}

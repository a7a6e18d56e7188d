//! `phalanx launch` and `phalanx train` as one process of a multi-process run (under a launcher,
//! torchrun or Slurm): flags and environment in, one `actors::cluster` call out.

use crate::{TrainArgs, print_summary, with_progress};
use actors::cluster::launch::{self as cl, LaunchSpec, WorldEnv};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser};
use std::io::Read;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Worker processes on 127.0.0.1, one per pipeline rank (must equal the train command's --pp).
    #[arg(long)]
    local: usize,
    /// The coordinator's port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Job id the workers must present (default: phalanx-<pid>). The shared secret comes from
    /// PHALANX_SECRET, or is drawn at random for this job.
    #[arg(long)]
    job_id: Option<String>,
    /// A worker silent this long (heartbeats every 100 ms) is declared dead and replaced.
    #[arg(long, default_value_t = 2000)]
    heartbeat_timeout_ms: u64,
    /// The command each worker runs: `-- train [train flags]`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `train`'s flags, parsed as the workers will parse them.
#[derive(Parser, Debug)]
#[command(name = "train", no_binary_name = true)]
struct TrainCommand {
    #[command(flatten)]
    args: TrainArgs,
}

fn random_secret() -> Result<String> {
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("drawing a job secret from /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub fn launch(a: LaunchArgs) -> Result<()> {
    let (first, rest) = a
        .command
        .split_first()
        .ok_or_else(|| anyhow!("launch needs a command after `--`: `-- train ...`"))?;
    if first != "train" {
        bail!("launch runs `train` (after `--`), not {first:?}");
    }
    let t = TrainCommand::try_parse_from(rest).map_err(|e| anyhow!("the train command: {e}"))?;
    if t.args.inject.is_some() || t.args.threads {
        bail!("--inject and --threads are for one-process runs; kill the workers to test faults");
    }
    let opts = crate::commands::train_options(&t.args)?;
    let layout = crate::commands::layout(&t.args)?;
    let secret = match std::env::var("PHALANX_SECRET") {
        Ok(s) => s,
        Err(_) => random_secret()?,
    };
    let spec = LaunchSpec {
        workers: a.local,
        listen: format!("127.0.0.1:{}", a.port).parse().context("--port")?,
        job: a
            .job_id
            .unwrap_or_else(|| format!("phalanx-{}", std::process::id())),
        secret: secret.into_bytes(),
        worker_args: a.command.clone(),
        heartbeat_bound: Duration::from_millis(a.heartbeat_timeout_ms),
        heartbeat: Duration::from_millis(100),
    };
    let summary = actors::cluster::supervisor::launch(&opts, &layout, spec)?;
    print_summary(&summary, t.args.summary_json.as_deref())
}

/// `phalanx train` as process `world.rank` of `world.world`: rank 0 of a torchrun/Slurm job
/// also coordinates; a launched worker or any other rank serves its pipeline rank.
pub fn train_in_world(
    a: &TrainArgs,
    opts: &actors::trainer::TrainOptions,
    layout: &actors::formation::Layout,
    world: &WorldEnv,
) -> Result<()> {
    if a.inject.is_some() || a.threads {
        bail!(
            "--inject and --threads are for one-process runs (WORLD_SIZE is {})",
            world.world
        );
    }
    let role = std::env::var(cl::ENV_ROLE).ok();
    match role.as_deref() {
        Some("coordinator") => {
            let summary = with_progress(opts.config.training.steps, |on_step| {
                cl::serve_coordinator(opts, layout, world, on_step)
            })?;
            let out = std::env::var_os(cl::ENV_SUMMARY_OUT).map(std::path::PathBuf::from);
            print_summary(&summary, out.as_deref().or(a.summary_json.as_deref()))
        }
        Some("worker") => serve_rank(opts, layout, world),
        Some(other) => bail!("{}={other:?}: expected coordinator or worker", cl::ENV_ROLE),
        None if world.rank != 0 => serve_rank(opts, layout, world),
        None => {
            let summary = with_progress(opts.config.training.steps, |on_step| {
                cl::serve_rank0(opts, layout, world, on_step)
            })?;
            print_summary(&summary, a.summary_json.as_deref())
        }
    }
}

/// This process as one pipeline rank until the run is over.
fn serve_rank(
    opts: &actors::trainer::TrainOptions,
    layout: &actors::formation::Layout,
    world: &WorldEnv,
) -> Result<()> {
    match cl::run_worker(opts, layout, world) {
        Ok(reason) => {
            tracing::info!("rank {}: {reason}", world.rank);
            Ok(())
        }
        Err(e) if e.downcast_ref::<actors::cluster::worker::Stale>().is_some() => {
            eprintln!("rank {}: {e}", world.rank);
            std::process::exit(actors::cluster::worker::EXIT_STALE)
        }
        Err(e) => Err(e),
    }
}

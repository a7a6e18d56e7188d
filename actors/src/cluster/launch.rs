//! The processes of a multi-process run, from the environment: which part this process plays
//! (`PHALANX_ROLE` under `phalanx launch`, else rank 0 coordinates) and where it stands, from
//! torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or Slurm's
//! (SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST, SLURM_LOCALID). A worker serves its pipeline rank;
//! a coordinator runs the training loop around a `ProcessEngine`, rebuilding the run from the
//! ranks' mirrors when it replaces a dead one (from the store when a mirror is gone too). The
//! process keeper of `phalanx launch` is `supervisor`.

use super::engine::{EngineSpec, Keeper, ProcessEngine};
use super::worker::{self, WorkerSpec};
use crate::core::coordinator::TimeoutPolicy;
use crate::formation::Layout;
use crate::schedule::{build, check};
use crate::trainer::{self, StepRecord, TrainOptions, TrainSummary};
use anyhow::{Context, Result, anyhow, bail};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use transport::tcp::{TcpConfig, TcpLink};

/// The variables a launcher sets for its workers (besides torchrun's names).
pub const ENV_JOB: &str = "PHALANX_JOB_ID";
pub const ENV_SECRET: &str = "PHALANX_SECRET";
pub const ENV_INCARNATION: &str = "PHALANX_INCARNATION";
pub const ENV_HEARTBEAT_MS: &str = "PHALANX_HEARTBEAT_MS";
pub const ENV_HEARTBEAT_TIMEOUT_MS: &str = "PHALANX_HEARTBEAT_TIMEOUT_MS";
/// How long a worker waits for an unreachable coordinator before it stops (default 60 s).
pub const ENV_COORDINATOR_TIMEOUT_MS: &str = "PHALANX_COORDINATOR_TIMEOUT_MS";
/// `coordinator` or `worker`: the process's part in a launched run.
pub const ENV_ROLE: &str = "PHALANX_ROLE";
/// The launcher's address, for its coordinator.
pub const ENV_SUPERVISOR: &str = "PHALANX_SUPERVISOR";
/// Where a launched coordinator writes its summary for the launcher.
pub const ENV_SUMMARY_OUT: &str = "PHALANX_SUMMARY_OUT";

/// How a multi-process run is set up.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// Worker processes (one per pipeline rank: must equal `--pp`).
    pub workers: usize,
    /// The coordinator's address (port 0: any free port).
    pub listen: SocketAddr,
    pub job: String,
    pub secret: Vec<u8>,
    /// The worker's command line after the program name (`train ...`).
    pub worker_args: Vec<String>,
    /// A rank silent this long is dead.
    pub heartbeat_bound: Duration,
    /// How often workers send heartbeats.
    pub heartbeat: Duration,
}

/// The worker side of one process, from the environment.
#[derive(Clone, Debug, PartialEq)]
pub struct WorldEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master: String,
    pub port: u16,
}

fn var(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    get(name)
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| anyhow!("{name}={v:?} is not a non-negative integer"))
        })
        .transpose()
}

/// The first host of a Slurm node list (`node[01-04],other` → `node01`).
pub fn first_slurm_host(list: &str) -> Result<String> {
    let first = list.split(',').next().unwrap_or("").trim();
    let Some(open) = first.find('[') else {
        if first.is_empty() {
            bail!("SLURM_NODELIST is empty");
        }
        return Ok(first.to_string());
    };
    let prefix = &first[..open];
    let inner = list[open + 1..]
        .split(']')
        .next()
        .ok_or_else(|| anyhow!("SLURM_NODELIST={list:?}: unclosed '['"))?;
    let lo = inner
        .split([',', '-'])
        .next()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("SLURM_NODELIST={list:?}: empty range"))?;
    Ok(format!("{prefix}{lo}"))
}

/// The process's place in a multi-process run, from torchrun's or Slurm's variables (torchrun's
/// win where both are set); `None` for a single process. `get` reads a variable.
pub fn world_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>> {
    let (rank, world, local, master) = if let Some(world) = var(get, "WORLD_SIZE")? {
        let rank = var(get, "RANK")?.ok_or_else(|| anyhow!("WORLD_SIZE is set but RANK is not"))?;
        let master = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        (rank, world, var(get, "LOCAL_RANK")?.unwrap_or(0), master)
    } else if let Some(world) = var(get, "SLURM_NTASKS")? {
        let rank = var(get, "SLURM_PROCID")?
            .ok_or_else(|| anyhow!("SLURM_NTASKS is set but SLURM_PROCID is not"))?;
        let master = match get("MASTER_ADDR") {
            Some(m) => m,
            None => first_slurm_host(
                &get("SLURM_NODELIST")
                    .ok_or_else(|| anyhow!("SLURM_NTASKS is set but SLURM_NODELIST is not"))?,
            )?,
        };
        (rank, world, var(get, "SLURM_LOCALID")?.unwrap_or(0), master)
    } else {
        return Ok(None);
    };
    if world <= 1 {
        return Ok(None);
    }
    if rank >= world {
        bail!("RANK {rank} is not below WORLD_SIZE {world}");
    }
    let port = match get("MASTER_PORT") {
        Some(p) => p
            .trim()
            .parse::<u16>()
            .map_err(|_| anyhow!("MASTER_PORT={p:?} is not a port number"))?,
        None => 29500,
    };
    Ok(Some(WorldEnv {
        rank,
        world,
        local_rank: local,
        master,
        port,
    }))
}

/// Resolves `host:port`, naming what failed.
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("MASTER_ADDR {host:?} does not resolve"))?
        .next()
        .ok_or_else(|| anyhow!("MASTER_ADDR {host:?} has no address"))
}

/// The address of this machine's interface that reaches `peer` (never all interfaces).
fn local_ip_towards(peer: SocketAddr) -> Result<IpAddr> {
    if peer.ip().is_loopback() {
        return Ok(peer.ip());
    }
    let any: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let probe = std::net::UdpSocket::bind(any).context("finding the local interface")?;
    probe
        .connect(peer)
        .with_context(|| format!("MASTER_ADDR {peer} is unreachable from this machine"))?;
    Ok(probe.local_addr()?.ip())
}

/// Runs this process as worker `env.rank` of a launched (or torchrun/Slurm-started) run.
pub fn run_worker(opts: &TrainOptions, layout: &Layout, env: &WorldEnv) -> Result<String> {
    let get = |k: &str| std::env::var(k).ok();
    let coordinator = resolve(&env.master, env.port)?;
    let incarnation = match get(ENV_INCARNATION) {
        Some(v) => v
            .parse()
            .map_err(|_| anyhow!("{ENV_INCARNATION}={v:?} is not an integer"))?,
        // no launcher: a restarted process (Kubernetes, Slurm requeue) is newer by its clock
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    let listen = local_ip_towards(coordinator)?;
    let spec = WorkerSpec {
        rank: env.rank,
        ranks: env.world,
        coordinator,
        listen,
        incarnation,
        job: get(ENV_JOB).unwrap_or_else(|| "phalanx".into()),
        secret: get(ENV_SECRET).unwrap_or_default().into_bytes(),
        heartbeat: Duration::from_millis(
            get(ENV_HEARTBEAT_MS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(100),
        ),
        coordinator_timeout: Duration::from_millis(
            get(ENV_COORDINATOR_TIMEOUT_MS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(60_000),
        ),
    };
    worker::run(opts, layout, spec)
}

fn bind_coordinator(spec: &LaunchSpec, incarnation: u64) -> Result<TcpLink> {
    let link = TcpLink::bind(
        spec.workers,
        incarnation,
        spec.workers + 2,
        spec.listen,
        TcpConfig::new(&spec.job, &spec.secret),
    )
    .map_err(|e| anyhow!("coordinator on {}: {e}", spec.listen))?;
    tracing::info!(
        "coordinator (incarnation {incarnation}) listening on {}, job {}",
        link.local_addr(),
        spec.job
    );
    Ok(link)
}

/// The spec of a coordinator started by torchrun/Slurm variables or by the launcher.
fn spec_from_env(env: &WorldEnv) -> Result<LaunchSpec> {
    let get = |k: &str| std::env::var(k).ok();
    Ok(LaunchSpec {
        workers: env.world,
        listen: resolve(&env.master, env.port)?,
        job: get(ENV_JOB).unwrap_or_else(|| "phalanx".into()),
        secret: get(ENV_SECRET).unwrap_or_default().into_bytes(),
        worker_args: Vec::new(),
        heartbeat_bound: Duration::from_millis(
            get(ENV_HEARTBEAT_TIMEOUT_MS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000),
        ),
        heartbeat: Duration::from_millis(100),
    })
}

/// A coordinator's settings, once the world and the layout agree.
fn coordinator_spec(opts: &TrainOptions, layout: &Layout, env: &WorldEnv) -> Result<LaunchSpec> {
    if env.world != layout.pp {
        bail!(
            "WORLD_SIZE is {} but --pp is {}: a multi-process run has one process per pipeline rank",
            env.world,
            layout.pp
        );
    }
    layout.validate(opts)?;
    spec_from_env(env)
}

/// Rank 0 of a run started by torchrun or Slurm: the coordinator on MASTER_ADDR:MASTER_PORT and
/// rank 0's worker on a thread of this process.
pub fn serve_rank0(
    opts: &TrainOptions,
    layout: &Layout,
    env: &WorldEnv,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    let spec = coordinator_spec(opts, layout, env)?;
    let link = bind_coordinator(&spec, 0)?;
    let (o, l, e) = (opts.clone(), *layout, env.clone());
    std::thread::Builder::new()
        .name("rank-0".into())
        .spawn(move || {
            if let Err(err) = run_worker(&o, &l, &e) {
                tracing::error!("rank 0: {err:#}");
            }
        })
        .context("starting rank 0's worker")?;
    coordinate(opts, layout, &spec, link, Keeper::External, false, on_step)
}

/// The coordinator process `phalanx launch` starts (`PHALANX_ROLE=coordinator`): on
/// MASTER_ADDR:MASTER_PORT, reporting to the launcher at `PHALANX_SUPERVISOR`; an incarnation
/// after the first rebuilds the run from the ranks' mirrors.
pub fn serve_coordinator(
    opts: &TrainOptions,
    layout: &Layout,
    env: &WorldEnv,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    let spec = coordinator_spec(opts, layout, env)?;
    let incarnation: u64 = std::env::var(ENV_INCARNATION)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let link = bind_coordinator(&spec, incarnation)?;
    let launcher: SocketAddr = std::env::var(ENV_SUPERVISOR)
        .map_err(|_| anyhow!("{ENV_SUPERVISOR} is not set"))?
        .parse()
        .map_err(|_| anyhow!("{ENV_SUPERVISOR} is not an address"))?;
    link.set_peer(spec.workers + 1, launcher, 0);
    coordinate(
        opts,
        layout,
        &spec,
        link,
        Keeper::Launcher,
        incarnation > 0,
        on_step,
    )
}

/// Coordinates a run whose workers `keeper` keeps: the training loop around a `ProcessEngine`
/// (`recover`: the state comes from the ranks' mirrors, not from the config or the store).
fn coordinate(
    opts: &TrainOptions,
    layout: &Layout,
    spec: &LaunchSpec,
    link: TcpLink,
    keeper: Keeper,
    recover: bool,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    let schedule = build(layout.schedule, layout.pp, layout.microbatches)?;
    check(&schedule).map_err(|e| anyhow!("schedule {}: {e}", schedule.kind))?;
    let data = Arc::new(trainer::open_data(opts)?);
    let fresh = if recover {
        let mut s = trainer::TrainState::new(trainer::build_model(opts)?);
        s.restored_from = trainer::fixed_run_id();
        s
    } else {
        trainer::build_state(opts)?
    };
    let t = &opts.config.training;
    super::on_interrupt();
    let mut engine = ProcessEngine::new(
        &fresh.model,
        link,
        keeper,
        EngineSpec {
            schedule,
            data: data.clone(),
            seed: opts.seed,
            batch: t.batch_size,
            seq: t.seq_len,
            committed: fresh.step,
            heartbeat_bound: spec.heartbeat_bound,
            timeouts: TimeoutPolicy::default(),
        },
    );
    let state = if recover {
        match engine.recover(fresh, Duration::from_secs(120)) {
            Ok(s) => s,
            // a mirror died with the coordinator: the newest checkpoint in the store
            Err(e) => match opts.checkpoints.clone() {
                Some(mut plan) => {
                    tracing::warn!(
                        "{e:#}: falling back to the newest checkpoint in {}",
                        plan.store
                    );
                    plan.resume = true;
                    plan.run = trainer::fixed_run_id();
                    let o = TrainOptions {
                        checkpoints: Some(plan),
                        ..opts.clone()
                    };
                    let s = trainer::build_state(&o)?;
                    engine.restart_at(s.step);
                    return finish_run(&o, &data, s, engine, on_step);
                }
                None => return Err(e.context("no checkpoint store to fall back to")),
            },
        }
    } else {
        fresh
    };
    finish_run(opts, &data, state, engine, on_step)
}

/// The training loop around the engine, then the workers told the run is over.
fn finish_run(
    opts: &TrainOptions,
    data: &storage::dataset::Dataset,
    state: trainer::TrainState,
    mut engine: ProcessEngine,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    let result = trainer::run(opts, data, state, &mut engine, on_step);
    engine.finish(if result.is_ok() {
        "the run is over"
    } else {
        "the run failed"
    });
    let failures = engine.failures.clone();
    drop(engine);
    let mut summary = result?;
    summary.detections_ms = failures.detections_ms;
    summary.recovery_ms = failures.recovery_ms;
    Ok(summary)
}

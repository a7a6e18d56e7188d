//! Starting a multi-process run: `phalanx launch --local N` (this process coordinates and keeps
//! N worker processes alive: one per pipeline rank, each restarted when it dies, all stopped on
//! Ctrl-C or at the end, none orphaned) and the worker side of `phalanx train` under a launcher,
//! torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or Slurm (SLURM_PROCID,
//! SLURM_NTASKS, SLURM_NODELIST, SLURM_LOCALID).

use super::engine::{EngineSpec, FailureLog, ProcessEngine, Processes};
use super::worker::{self, WorkerSpec};
use crate::core::coordinator::TimeoutPolicy;
use crate::formation::Layout;
use crate::schedule::{build, check};
use crate::trainer::{self, StepRecord, TrainOptions, TrainSummary};
use anyhow::{Context, Result, anyhow, bail};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use transport::tcp::{TcpConfig, TcpLink};

/// The variables a launcher sets for its workers (besides torchrun's names).
pub const ENV_JOB: &str = "PHALANX_JOB_ID";
pub const ENV_SECRET: &str = "PHALANX_SECRET";
pub const ENV_INCARNATION: &str = "PHALANX_INCARNATION";
pub const ENV_HEARTBEAT_MS: &str = "PHALANX_HEARTBEAT_MS";

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
    };
    worker::run(opts, layout, spec)
}

/// Worker processes on this machine, one per rank.
struct LocalProcesses {
    exe: std::path::PathBuf,
    spec: LaunchSpec,
    coordinator: SocketAddr,
    children: Vec<Option<Child>>,
    incarnations: Vec<u64>,
    /// Replaced processes that may still exist (a frozen one wakes up and is told to exit).
    retired: Vec<Child>,
    restarted: u64,
    threads: usize,
}

impl LocalProcesses {
    fn spawn(&mut self, rank: usize) -> Result<()> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.spec.worker_args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", self.spec.workers.to_string())
            .env("MASTER_ADDR", self.coordinator.ip().to_string())
            .env("MASTER_PORT", self.coordinator.port().to_string())
            .env(ENV_JOB, &self.spec.job)
            .env(
                ENV_SECRET,
                String::from_utf8_lossy(&self.spec.secret).as_ref(),
            )
            .env(ENV_INCARNATION, self.incarnations[rank].to_string())
            .env(
                ENV_HEARTBEAT_MS,
                self.spec.heartbeat.as_millis().to_string(),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", self.threads.to_string());
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", self.exe.display()))?;
        tracing::info!(
            "rank {rank}: started pid {} (incarnation {})",
            child.id(),
            self.incarnations[rank]
        );
        self.children[rank] = Some(child);
        Ok(())
    }

    fn stop_all(&mut self) {
        let all = self
            .children
            .iter_mut()
            .filter_map(Option::as_mut)
            .chain(self.retired.iter_mut());
        for c in all {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn die_with_parent(_cmd: &mut Command) {}

impl Processes for LocalProcesses {
    fn exited(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (rank, slot) in self.children.iter_mut().enumerate() {
            if let Some(c) = slot
                && let Ok(Some(status)) = c.try_wait()
            {
                out.push((rank, format!("pid {} exited ({status})", c.id())));
                *slot = None;
            }
        }
        self.retired
            .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        out
    }

    fn replace(&mut self, rank: usize) -> Result<()> {
        if let Some(old) = self.children[rank].take() {
            self.retired.push(old);
        }
        self.incarnations[rank] += 1;
        self.restarted += 1;
        self.spawn(rank)
    }

    fn restarted(&self) -> u64 {
        self.restarted
    }
}

impl Drop for LocalProcesses {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// What `launch` adds to the summary.
#[derive(Clone, Debug, Default)]
pub struct LaunchReport {
    pub processes_restarted: u64,
    pub failures: FailureLog,
}

/// Starts `spec.workers` worker processes and coordinates the run from this process.
pub fn launch(
    opts: &TrainOptions,
    layout: &Layout,
    spec: LaunchSpec,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<(TrainSummary, LaunchReport)> {
    if spec.workers != layout.pp {
        bail!(
            "--local {} but --pp {}: a multi-process run has one process per pipeline rank",
            spec.workers,
            layout.pp
        );
    }
    if spec.workers < 2 {
        bail!(
            "--local {}: a multi-process run needs at least 2 workers",
            spec.workers
        );
    }
    layout.validate(opts)?;
    let link = bind_coordinator(&spec)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut procs = LocalProcesses {
        exe: std::env::current_exe().context("the path of this program")?,
        coordinator: link.local_addr(),
        children: (0..spec.workers).map(|_| None).collect(),
        incarnations: vec![0; spec.workers],
        retired: Vec::new(),
        restarted: 0,
        threads: (cores / spec.workers).max(1),
        spec: spec.clone(),
    };
    for r in 0..spec.workers {
        procs.spawn(r)?;
    }
    coordinate(opts, layout, &spec, link, Box::new(procs), on_step)
}

fn bind_coordinator(spec: &LaunchSpec) -> Result<TcpLink> {
    let link = TcpLink::bind(
        spec.workers,
        0,
        spec.workers + 1,
        spec.listen,
        TcpConfig::new(&spec.job, &spec.secret),
    )
    .map_err(|e| anyhow!("coordinator on {}: {e}", spec.listen))?;
    tracing::info!(
        "coordinator listening on {}, job {}",
        link.local_addr(),
        spec.job
    );
    Ok(link)
}

/// Processes another system starts and restarts (torchrun, Slurm, Kubernetes): a dead rank is
/// waited for until its replacement says hello.
struct ExternalProcesses;

impl Processes for ExternalProcesses {
    fn exited(&mut self) -> Vec<(usize, String)> {
        Vec::new()
    }

    fn replace(&mut self, rank: usize) -> Result<()> {
        tracing::warn!("rank {rank}: waiting for its scheduler to start a replacement");
        Ok(())
    }

    fn restarted(&self) -> u64 {
        0
    }
}

/// Rank 0 of a run started by torchrun or Slurm: the coordinator on MASTER_ADDR:MASTER_PORT and
/// rank 0's worker on a thread of this process.
pub fn serve_rank0(
    opts: &TrainOptions,
    layout: &Layout,
    env: &WorldEnv,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<(TrainSummary, LaunchReport)> {
    if env.world != layout.pp {
        bail!(
            "WORLD_SIZE is {} but --pp is {}: a multi-process run has one process per pipeline rank",
            env.world,
            layout.pp
        );
    }
    layout.validate(opts)?;
    let get = |k: &str| std::env::var(k).ok();
    let spec = LaunchSpec {
        workers: env.world,
        listen: resolve(&env.master, env.port)?,
        job: get(ENV_JOB).unwrap_or_else(|| "phalanx".into()),
        secret: get(ENV_SECRET).unwrap_or_default().into_bytes(),
        worker_args: Vec::new(),
        heartbeat_bound: Duration::from_millis(2000),
        heartbeat: Duration::from_millis(100),
    };
    let link = bind_coordinator(&spec)?;
    let (o, l, e) = (opts.clone(), *layout, env.clone());
    std::thread::Builder::new()
        .name("rank-0".into())
        .spawn(move || {
            if let Err(err) = run_worker(&o, &l, &e) {
                tracing::error!("rank 0: {err:#}");
            }
        })
        .context("starting rank 0's worker")?;
    coordinate(
        opts,
        layout,
        &spec,
        link,
        Box::new(ExternalProcesses),
        on_step,
    )
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Coordinates a run whose workers `procs` keeps: the training loop around a `ProcessEngine`.
fn coordinate(
    opts: &TrainOptions,
    layout: &Layout,
    spec: &LaunchSpec,
    link: TcpLink,
    procs: Box<dyn Processes>,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<(TrainSummary, LaunchReport)> {
    let schedule = build(layout.schedule, layout.pp, layout.microbatches)?;
    check(&schedule).map_err(|e| anyhow!("schedule {}: {e}", schedule.kind))?;
    let data = Arc::new(trainer::open_data(opts)?);
    let state = trainer::build_state(opts)?;
    let t = &opts.config.training;
    // SAFETY: the handler only stores to an atomic
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut engine = ProcessEngine::new(
        &state.model,
        link,
        procs,
        EngineSpec {
            schedule,
            data: data.clone(),
            seed: opts.seed,
            batch: t.batch_size,
            seq: t.seq_len,
            committed: state.step,
            heartbeat_bound: spec.heartbeat_bound,
            timeouts: TimeoutPolicy::default(),
        },
    );
    let stop = engine.stop.clone();
    let watcher = std::thread::spawn(move || {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if Arc::strong_count(&stop) == 1 {
                return;
            }
        }
        stop.store(true, Ordering::SeqCst);
    });
    let result = trainer::run(opts, &data, state, &mut engine, on_step);
    engine.finish(if result.is_ok() {
        "the run is over"
    } else {
        "the run failed"
    });
    let report = LaunchReport {
        processes_restarted: engine.procs_restarted(),
        failures: engine.failures.clone(),
    };
    // give the workers a moment to exit on their own, then stop whatever is left
    std::thread::sleep(Duration::from_millis(300));
    drop(engine);
    let _ = watcher.join();
    let mut summary = result?;
    summary.processes_restarted = report.processes_restarted;
    summary.detections_ms = report.failures.detections_ms.clone();
    summary.recovery_ms = report.failures.recovery_ms.clone();
    Ok((summary, report))
}

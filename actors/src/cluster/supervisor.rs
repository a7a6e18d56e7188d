//! `phalanx launch --local N`: the process that keeps a run's processes on this machine, and
//! nothing else. It starts a coordinator process and N worker processes (one per pipeline
//! rank) on 127.0.0.1, starts the next incarnation of any that dies (a worker the coordinator
//! declares dead while it still lives is replaced too, and left to wake up and be told it is
//! stale), tells the coordinator of every exit, stops everything on Ctrl-C or SIGTERM, and
//! returns the summary the last coordinator wrote. Children die with it (`PR_SET_PDEATHSIG`).

use super::launch::{
    ENV_HEARTBEAT_MS, ENV_HEARTBEAT_TIMEOUT_MS, ENV_INCARNATION, ENV_JOB, ENV_ROLE, ENV_SECRET,
    ENV_SUMMARY_OUT, ENV_SUPERVISOR, LaunchSpec,
};
use super::protocol::{Supervision, TAG_SUPERVISOR, head, split};
use super::{interrupted, on_interrupt};
use crate::formation::Layout;
use crate::trainer::{TrainOptions, TrainSummary};
use anyhow::{Context, Result, anyhow, bail};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;
use transport::link::{Link, Received};
use transport::tcp::{TcpConfig, TcpLink};

/// Coordinator restarts allowed before the run is given up.
const MAX_COORDINATOR_RESTARTS: u64 = 8;

/// The exit code a worker uses when it was replaced (it must not be restarted).
const EXIT_STALE: i32 = super::worker::EXIT_STALE;

struct Procs {
    exe: std::path::PathBuf,
    spec: LaunchSpec,
    coordinator: SocketAddr,
    supervisor: SocketAddr,
    summary: std::path::PathBuf,
    /// One run id for every coordinator incarnation (journal, checkpoints).
    run_id: String,
    threads: usize,
    workers: Vec<Option<Child>>,
    incarnations: Vec<u64>,
    coord: Option<Child>,
    coord_incarnation: u64,
    /// Replaced processes that may still exist (a frozen one wakes up and is told to exit).
    retired: Vec<Child>,
    restarted: u64,
}

impl Procs {
    fn command(&self, role: &str, rank: usize, incarnation: u64) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.spec.worker_args)
            .env(ENV_ROLE, role)
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
            .env(ENV_INCARNATION, incarnation.to_string())
            .env(
                ENV_HEARTBEAT_MS,
                self.spec.heartbeat.as_millis().to_string(),
            )
            .env(
                ENV_HEARTBEAT_TIMEOUT_MS,
                self.spec.heartbeat_bound.as_millis().to_string(),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", self.threads.to_string());
        }
        die_with_parent(&mut cmd);
        cmd
    }

    fn spawn_worker(&mut self, rank: usize) -> Result<()> {
        let child = self
            .command("worker", rank, self.incarnations[rank])
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", self.exe.display()))?;
        tracing::info!(
            "rank {rank}: started pid {} (incarnation {})",
            child.id(),
            self.incarnations[rank]
        );
        self.workers[rank] = Some(child);
        Ok(())
    }

    fn spawn_coordinator(&mut self) -> Result<()> {
        let mut cmd = self.command("coordinator", 0, self.coord_incarnation);
        cmd.env(ENV_SUPERVISOR, self.supervisor.to_string())
            .env(ENV_SUMMARY_OUT, &self.summary)
            .env("PHALANX_RUN_ID", &self.run_id);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the coordinator: {}", self.exe.display()))?;
        tracing::info!(
            "coordinator: started pid {} (incarnation {})",
            child.id(),
            self.coord_incarnation
        );
        self.coord = Some(child);
        Ok(())
    }

    /// The next incarnation of `rank`; the old process, if any, is kept until the end.
    fn replace(&mut self, rank: usize) -> Result<()> {
        if let Some(old) = self.workers[rank].take() {
            self.retired.push(old);
        }
        self.incarnations[rank] += 1;
        self.restarted += 1;
        self.spawn_worker(rank)
    }

    fn stop_all(&mut self) {
        let all = self
            .workers
            .iter_mut()
            .filter_map(Option::as_mut)
            .chain(self.coord.as_mut())
            .chain(self.retired.iter_mut());
        for c in all {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
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

fn how(status: ExitStatus) -> String {
    format!("exited ({status})")
}

/// A free port on 127.0.0.1 for the coordinator (each incarnation binds the same one).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// What the launcher adds to the summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Restarts {
    pub workers: u64,
    pub coordinators: u64,
}

/// Starts the coordinator and `spec.workers` worker processes, keeps them alive, and returns
/// the run's summary.
pub fn launch(opts: &TrainOptions, layout: &Layout, spec: LaunchSpec) -> Result<TrainSummary> {
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
    let port = match spec.listen.port() {
        0 => free_port()?,
        p => {
            // refuse a taken port here, with its number, before any process starts
            std::net::TcpListener::bind((spec.listen.ip(), p)).map_err(|e| {
                anyhow!("--port {p}: the coordinator's port is already in use ({e})")
            })?;
            p
        }
    };
    let n = spec.workers;
    let link = TcpLink::bind(
        n + 1,
        0,
        n + 2,
        "127.0.0.1:0".parse().expect("literal"),
        TcpConfig::new(&spec.job, &spec.secret),
    )
    .map_err(|e| anyhow!("launcher: {e}"))?;
    let coordinator = SocketAddr::new(spec.listen.ip(), port);
    link.set_peer(n, coordinator, 0);
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let summary = opts.out_dir.join("launch-summary.json");
    let _ = std::fs::remove_file(&summary);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut procs = Procs {
        exe: std::env::current_exe().context("the path of this program")?,
        coordinator,
        supervisor: link.local_addr(),
        summary: summary.clone(),
        run_id: crate::trainer::run_id(),
        threads: (cores / n).max(1),
        workers: (0..n).map(|_| None).collect(),
        incarnations: vec![0; n],
        coord: None,
        coord_incarnation: 0,
        retired: Vec::new(),
        restarted: 0,
        spec,
    };
    on_interrupt();
    procs.spawn_coordinator()?;
    for r in 0..n {
        procs.spawn_worker(r)?;
    }
    let mut restarts = Restarts::default();
    loop {
        if interrupted() {
            procs.stop_all();
            bail!("interrupted: every process was stopped");
        }
        if let Some(c) = procs.coord.as_mut()
            && let Some(status) = c.try_wait()?
        {
            procs.coord = None;
            if status.success() {
                break;
            }
            if status.code() == Some(1) {
                procs.stop_all();
                bail!("the coordinator failed (its error is above); every process was stopped");
            }
            restarts.coordinators += 1;
            if restarts.coordinators > MAX_COORDINATOR_RESTARTS {
                procs.stop_all();
                bail!(
                    "the coordinator died {} times (last: {}); giving up",
                    restarts.coordinators,
                    how(status)
                );
            }
            tracing::warn!("coordinator {}: starting the next one", how(status));
            procs.coord_incarnation += 1;
            procs.spawn_coordinator()?;
        }
        for rank in 0..n {
            let Some(c) = procs.workers[rank].as_mut() else {
                continue;
            };
            let Some(status) = c.try_wait()? else {
                continue;
            };
            let pid = c.id();
            procs.workers[rank] = None;
            // told the run is over, or told it was replaced: not restarted
            if status.success() || status.code() == Some(EXIT_STALE) {
                continue;
            }
            let msg = Supervision::Exited {
                rank,
                how: format!("pid {pid} {}", how(status)),
            };
            tracing::warn!("rank {rank}: pid {pid} {}", how(status));
            procs.replace(rank)?;
            if let Ok(h) = head(&msg) {
                let _ = link.send_parts(n, TAG_SUPERVISOR, &[&h]);
            }
        }
        procs
            .retired
            .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if let Some(Received::Message(m)) = link.recv_timeout(Duration::from_millis(20))?
            && m.tag == TAG_SUPERVISOR
        {
            match split::<Supervision>(&m.payload) {
                Ok((Supervision::Replace { rank }, _)) if rank < n => procs.replace(rank)?,
                Ok((other, _)) => tracing::warn!("unexpected supervision message {other:?}"),
                Err(e) => tracing::warn!("unreadable supervision message: {e}"),
            }
        }
    }
    // the workers were told to exit; whatever is left goes with the launcher
    std::thread::sleep(Duration::from_millis(300));
    restarts.workers = procs.restarted;
    drop(procs);
    let text = std::fs::read_to_string(&summary)
        .with_context(|| format!("the coordinator's summary {}", summary.display()))?;
    let mut s: TrainSummary = serde_json::from_str(&text)
        .with_context(|| format!("the coordinator's summary {}", summary.display()))?;
    s.processes_restarted = restarts.workers;
    s.coordinator_restarts = restarts.coordinators;
    Ok(s)
}

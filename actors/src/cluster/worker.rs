//! One worker process of a multi-process run: one pipeline rank (its stage copies, and their
//! expert groups when `--ep` > 1) driven by the same [`RankMachine`] as the thread and actor
//! engines. Activations go straight to the peer ranks over the TCP link; gradients go to the
//! coordinator, which answers with the new parameters. A heartbeat thread speaks for the process
//! while it computes; a process told it is stale (replaced while frozen) exits.

use super::protocol::{
    Activation, SnapHead, TAG_ACTIVATION, TAG_TO_COORD, TAG_TO_WORKER, ToCoord, ToWorker,
    grads_blob, head, read_tensors, split,
};
use crate::core::rank::{RankCommand, RankEvent, RankMachine};
use crate::formation::Layout;
use crate::formation::compute::Wire;
use crate::formation::threads::{Pipeline, RankState};
use crate::schedule::build;
use crate::trainer::{self, TrainOptions};
use anyhow::{Context, Result, anyhow, bail};
use kernels::model::{Batch, ParamStore};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use transport::link::{Link, LinkError, Received};
use transport::tcp::{TcpConfig, TcpLink};

/// Where a worker stands in the run.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub rank: usize,
    pub ranks: usize,
    pub coordinator: SocketAddr,
    /// The interface to listen on (the peers reach this process there).
    pub listen: std::net::IpAddr,
    pub incarnation: u64,
    pub job: String,
    pub secret: Vec<u8>,
    pub heartbeat: Duration,
    /// A coordinator unreachable this long means the run is gone: the worker stops.
    pub coordinator_timeout: Duration,
}

/// The exit code of a worker told it was replaced.
pub const EXIT_STALE: i32 = 3;

/// A network fault for tests, from `PHALANX_NET_FAULT` on the rank named by
/// `PHALANX_NET_FAULT_RANK`, first incarnation only: `drop@STEP` closes every connection of the
/// process when step STEP opens; `partition@STEP:MS` cuts it off the network for MS ms then.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NetFault {
    Drop { step: u64 },
    Partition { step: u64, ms: u64 },
}

impl NetFault {
    pub fn parse(s: &str) -> Result<NetFault> {
        let bad = || anyhow!("PHALANX_NET_FAULT={s:?}: expected drop@STEP or partition@STEP:MS");
        let (kind, at) = s.split_once('@').ok_or_else(bad)?;
        match kind {
            "drop" => Ok(NetFault::Drop {
                step: at.parse().map_err(|_| bad())?,
            }),
            "partition" => {
                let (step, ms) = at.split_once(':').ok_or_else(bad)?;
                Ok(NetFault::Partition {
                    step: step.parse().map_err(|_| bad())?,
                    ms: ms.parse().map_err(|_| bad())?,
                })
            }
            _ => Err(bad()),
        }
    }

    fn from_env(rank: usize, incarnation: u64) -> Result<Option<NetFault>> {
        let (Ok(f), Ok(r)) = (
            std::env::var("PHALANX_NET_FAULT"),
            std::env::var("PHALANX_NET_FAULT_RANK"),
        ) else {
            return Ok(None);
        };
        if r.trim() != rank.to_string() || incarnation != 0 {
            return Ok(None);
        }
        NetFault::parse(&f).map(Some)
    }
}

struct Worker {
    spec: WorkerSpec,
    link: Arc<TcpLink>,
    rank: RankState,
    full: ParamStore,
    machine: RankMachine<()>,
    batches: Vec<Batch>,
    wire: Wire,
    d: usize,
    /// The coordinator said the run is over.
    exit: Option<String>,
    /// The heartbeat thread learned this process was replaced or the run is gone.
    stop: Arc<Mutex<Option<Stop>>>,
    fault: Option<NetFault>,
    hello: ToCoord,
    /// The coordinator's incarnation last seen (a new one gets a hello and the open attempt
    /// is dropped).
    coordinator: u64,
    /// The newest committed states of this rank's tensors (at most two): step, loss monitor,
    /// tensor heads, blob.
    mirrors: VecDeque<(u64, String, Vec<SnapHead>, Vec<u8>)>,
}

/// The error of a worker that was replaced by a newer incarnation (exit code [`EXIT_STALE`]).
#[derive(Debug, thiserror::Error)]
#[error("replaced by a newer incarnation: {0}")]
pub struct Stale(pub String);

fn send_coord(link: &TcpLink, ranks: usize, msg: &ToCoord, blob: &[u8]) -> Result<(), LinkError> {
    let h = head(msg).map_err(|e| LinkError::Stale {
        reason: e.to_string(),
    })?;
    link.send_parts(ranks, TAG_TO_COORD, &[&h, blob])
}

/// Runs rank `spec.rank` until the coordinator says the run is over (returns its reason); a
/// process replaced meanwhile ends with [`Stale`].
pub fn run(opts: &TrainOptions, layout: &Layout, spec: WorkerSpec) -> Result<String> {
    layout.validate(opts)?;
    if layout.pp != spec.ranks {
        bail!(
            "WORLD_SIZE is {} but --pp is {}: a multi-process run has one process per pipeline rank",
            spec.ranks,
            layout.pp
        );
    }
    for line in transport::paths::fast_paths() {
        tracing::info!("rank {}: {line}", spec.rank);
    }
    let model = trainer::build_model(opts)?;
    let t = &opts.config.training;
    let schedule = build(layout.schedule, layout.pp, layout.microbatches)?;
    let mut pipeline = Pipeline::new(&model, schedule.clone(), t.mtp_loss_weight, layout.wire)?;
    let mut rank = pipeline.ranks.swap_remove(spec.rank);
    drop(pipeline);
    // this process's rank only: its expert groups and stage copies on its device
    let (ep, d) = (layout.ep, model.cfg.hidden_size);
    rank.with_ep(&model, ep, layout.wire, d, layout.compute)?;
    rank.on(layout.compute, schedule.microbatches)?;
    let d = model.cfg.hidden_size;
    let full = model.params;
    let mut cfg = TcpConfig::new(&spec.job, &spec.secret);
    cfg.link.send_timeout = Duration::from_secs(30);
    let link = Arc::new(
        TcpLink::bind(
            spec.rank,
            spec.incarnation,
            spec.ranks + 1,
            SocketAddr::new(spec.listen, 0),
            cfg,
        )
        .map_err(|e| anyhow!("rank {}: {e}", spec.rank))?,
    );
    link.set_peer(spec.ranks, spec.coordinator, 0);
    let hello = ToCoord::Hello {
        rank: spec.rank,
        incarnation: spec.incarnation,
        addr: link.local_addr().to_string(),
        pid: std::process::id(),
    };
    let started = Instant::now();
    loop {
        match send_coord(&link, spec.ranks, &hello, &[]) {
            Ok(()) => break,
            Err(LinkError::Stale { reason }) => bail!(Stale(reason)),
            Err(e) if started.elapsed() > spec.coordinator_timeout => {
                bail!(
                    "rank {}: cannot reach the coordinator at {} (MASTER_ADDR:MASTER_PORT) for {:?}: {e}",
                    spec.rank,
                    spec.coordinator,
                    spec.coordinator_timeout
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let stop = Arc::new(Mutex::new(None));
    heartbeats(link.clone(), &spec, stop.clone());
    let fault = NetFault::from_env(spec.rank, spec.incarnation)?;
    let mut w = Worker {
        coordinator: link.peer_incarnation(spec.ranks),
        hello,
        mirrors: VecDeque::new(),
        fault,
        exit: None,
        stop,
        machine: RankMachine::new(&schedule, spec.rank),
        spec,
        link,
        rank,
        full,
        batches: Vec::new(),
        wire: layout.wire,
        d,
    };
    w.serve()
}

/// A thread that tells the coordinator every `heartbeat` that this process lives.
/// The heartbeat thread also notices a coordinator that stays unreachable (the run is gone):
/// after `spec.coordinator_timeout` without one heartbeat through, the worker stops.
fn heartbeats(link: Arc<TcpLink>, spec: &WorkerSpec, stop: Arc<Mutex<Option<Stop>>>) {
    let (ranks, rank, every) = (spec.ranks, spec.rank, spec.heartbeat);
    let (timeout, coordinator) = (spec.coordinator_timeout, spec.coordinator);
    let beat = ToCoord::Heartbeat {
        incarnation: spec.incarnation,
    };
    let _ = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let mut through = std::time::Instant::now();
            loop {
                let why = match send_coord(&link, ranks, &beat, &[]) {
                    Ok(()) => {
                        through = std::time::Instant::now();
                        None
                    }
                    Err(LinkError::Stale { reason }) => Some(Stop::Stale(reason)),
                    Err(_) if through.elapsed() > timeout => Some(Stop::Lost(format!(
                        "the coordinator at {coordinator} has been unreachable for {timeout:?}"
                    ))),
                    Err(_) => None,
                };
                if let Some(why) = why {
                    tracing::warn!("rank {rank}: {why:?}");
                    *stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    return;
                }
                std::thread::sleep(every);
            }
        });
}

/// Why the heartbeat thread stops the worker.
#[derive(Debug)]
enum Stop {
    /// A newer incarnation replaced this process.
    Stale(String),
    /// The coordinator stayed unreachable.
    Lost(String),
}

impl Worker {
    fn serve(&mut self) -> Result<String> {
        let mut pending: VecDeque<RankEvent<()>> = VecDeque::new();
        loop {
            if let Some(reason) = self.exit.take() {
                return Ok(reason);
            }
            match self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(Stop::Stale(reason)) => bail!(Stale(reason)),
                Some(Stop::Lost(reason)) => bail!("rank {}: {reason}", self.spec.rank),
                None => {}
            }
            let coordinator = self.link.peer_incarnation(self.spec.ranks);
            if coordinator != self.coordinator {
                // a new coordinator: drop the open attempt, say hello again
                tracing::warn!(
                    "rank {}: coordinator incarnation {coordinator} took over",
                    self.spec.rank
                );
                self.coordinator = coordinator;
                self.reset();
                pending.clear();
                pending.push_back(RankEvent::Reset);
                if let Err(e) = send_coord(&self.link, self.spec.ranks, &self.hello, &[]) {
                    tracing::warn!("rank {}: hello: {e}", self.spec.rank);
                }
            }
            let event = match pending.pop_front() {
                Some(e) => e,
                None => match self.link.recv_timeout(Duration::from_millis(50))? {
                    None => continue,
                    Some(Received::Refused(e)) => {
                        tracing::warn!("rank {}: refused a message: {e}", self.spec.rank);
                        continue;
                    }
                    Some(Received::Message(m)) => match self.message(m.tag, &m.payload)? {
                        Some(e) => e,
                        None => continue,
                    },
                },
            };
            let current = self.machine.current();
            let cmds = match self.machine.on(event) {
                Ok(c) => c,
                Err(reason) => {
                    // a broken invariant: fail this attempt, the coordinator replays it
                    self.reset();
                    if let Some((step, attempt)) = current {
                        let msg = ToCoord::Failed {
                            step,
                            attempt,
                            reason,
                        };
                        let _ = send_coord(&self.link, self.spec.ranks, &msg, &[]);
                    }
                    continue;
                }
            };
            for cmd in cmds {
                self.command(cmd, &mut pending)?;
            }
        }
    }

    /// Fires the test's network fault when its step opens.
    fn net_fault(&mut self, step: u64) {
        match self.fault {
            Some(NetFault::Drop { step: s }) if s == step => {
                tracing::warn!(
                    "rank {}: closing every connection (injected)",
                    self.spec.rank
                );
                for p in 0..=self.spec.ranks {
                    self.link.drop_connections(p);
                }
                self.fault = None;
            }
            Some(NetFault::Partition { step: s, ms }) if s == step => {
                tracing::warn!(
                    "rank {}: cut off the network for {ms} ms (injected)",
                    self.spec.rank
                );
                self.link.partition(Duration::from_millis(ms));
                self.fault = None;
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.rank.copies.values_mut().for_each(|c| c.reset());
    }

    fn load(&mut self, params: &[(usize, usize)], blob: &[u8]) -> Result<()> {
        read_tensors(params, blob, &mut self.full.tensors)
            .with_context(|| format!("rank {}: parameters from the coordinator", self.spec.rank))
    }

    /// A message from the link as the machine's event (None: handled here).
    fn message(&mut self, tag: u32, payload: &[u8]) -> Result<Option<RankEvent<()>>> {
        match tag {
            TAG_ACTIVATION => {
                let (a, frame): (Activation, &[u8]) = split(payload)?;
                let data = Wire::decode(frame)
                    .map_err(|e| anyhow!("an activation of step {}: {e}", a.step))?;
                Ok(Some(RankEvent::Deliver {
                    step: a.step,
                    attempt: a.attempt,
                    arrival: a.arrival,
                    data,
                }))
            }
            TAG_TO_WORKER => {
                let (msg, blob): (ToWorker, &[u8]) = split(payload)?;
                Ok(match msg {
                    ToWorker::Peers { members } => {
                        for m in members.into_iter().filter(|m| m.rank != self.spec.rank) {
                            match m.addr.parse() {
                                Ok(a) => self.link.set_peer(m.rank, a, m.incarnation),
                                Err(_) => {
                                    tracing::warn!("rank {}: bad address {:?}", m.rank, m.addr)
                                }
                            }
                        }
                        None
                    }
                    ToWorker::Open {
                        step,
                        attempt,
                        batches,
                        params,
                    } => {
                        if self.machine.current().is_some_and(|c| c >= (step, attempt)) {
                            return Ok(None);
                        }
                        self.net_fault(step);
                        self.reset();
                        if !params.is_empty() {
                            self.load(&params, blob)?;
                            let full = &self.full;
                            self.rank
                                .copies
                                .values_mut()
                                .for_each(|c| c.load_from(full));
                        }
                        self.batches = batches.into_iter().map(|b| b.batch()).collect();
                        Some(RankEvent::Open { step, attempt })
                    }
                    ToWorker::Install {
                        step,
                        attempt,
                        params,
                    } => {
                        self.load(&params, blob)?;
                        Some(RankEvent::Install { step, attempt })
                    }
                    ToWorker::Abort { step, attempt } => {
                        self.reset();
                        Some(RankEvent::Abort { step, attempt })
                    }
                    ToWorker::Mirror {
                        step,
                        monitor,
                        tensors,
                    } => {
                        self.mirrors.retain(|m| m.0 < step);
                        self.mirrors
                            .push_back((step, monitor, tensors, blob.to_vec()));
                        while self.mirrors.len() > 2 {
                            self.mirrors.pop_front();
                        }
                        None
                    }
                    ToWorker::Report { at_most } => {
                        let pick = self
                            .mirrors
                            .iter()
                            .rev()
                            .find(|m| at_most.is_none_or(|a| m.0 <= a));
                        let (msg, blob): (ToCoord, &[u8]) = match pick {
                            Some((step, monitor, tensors, blob)) => (
                                ToCoord::State {
                                    step: Some(*step),
                                    monitor: monitor.clone(),
                                    tensors: tensors.clone(),
                                },
                                blob,
                            ),
                            None => (
                                ToCoord::State {
                                    step: None,
                                    monitor: String::new(),
                                    tensors: Vec::new(),
                                },
                                &[],
                            ),
                        };
                        if let Err(e) = send_coord(&self.link, self.spec.ranks, &msg, blob) {
                            tracing::warn!("rank {}: report: {e}", self.spec.rank);
                        }
                        None
                    }
                    ToWorker::Exit { reason } => {
                        tracing::info!("rank {}: told to exit: {reason}", self.spec.rank);
                        self.exit = Some(reason);
                        None
                    }
                })
            }
            other => {
                tracing::warn!(
                    "rank {}: a message with unknown tag {other:#x}",
                    self.spec.rank
                );
                Ok(None)
            }
        }
    }

    fn command(
        &mut self,
        cmd: RankCommand<()>,
        pending: &mut VecDeque<RankEvent<()>>,
    ) -> Result<()> {
        match cmd {
            RankCommand::RunOp {
                op_id,
                copy,
                step,
                attempt,
                op,
            } => pending.push_back(
                self.rank
                    .run_op(&self.batches, (op_id, copy, step, attempt), op)
                    .map_err(anyhow::Error::msg)?,
            ),
            RankCommand::Send {
                to,
                step,
                attempt,
                arrival,
                data,
            } => {
                let frame = self.wire.encode(arrival, data, self.d);
                let h = head(&Activation {
                    step,
                    attempt,
                    arrival,
                })?;
                // a lost activation is the coordinator's to notice (the attempt times out or
                // the peer is declared dead): the step is replayed
                if let Err(e) = self.link.send_parts(to, TAG_ACTIVATION, &[&h, &frame]) {
                    tracing::warn!("rank {}: to rank {to}: {e}", self.spec.rank);
                }
            }
            RankCommand::TakeGrads {
                copy,
                step,
                attempt,
            } => pending.push_back(RankEvent::Grads {
                copy,
                step,
                attempt,
                grads: (),
            }),
            RankCommand::Done {
                step,
                attempt,
                stats,
                ..
            } => {
                let mut blob = Vec::new();
                let mut copies = Vec::new();
                for (&copy, runner) in self.rank.copies.iter_mut() {
                    copies.push(grads_blob(copy, runner.take_grads(), &mut blob)?);
                }
                let msg = ToCoord::Done {
                    step,
                    attempt,
                    stats,
                    copies,
                };
                if let Err(e) = send_coord(&self.link, self.spec.ranks, &msg, &blob) {
                    tracing::warn!("rank {}: sending gradients: {e}", self.spec.rank);
                }
            }
            RankCommand::InstallStage {
                copy,
                step,
                attempt,
            } => {
                if let Some(c) = self.rank.copies.get_mut(&copy) {
                    c.load_from(&self.full);
                }
                pending.push_back(RankEvent::StageInstalled {
                    copy,
                    step,
                    attempt,
                });
            }
            RankCommand::Installed { step, attempt } => {
                let msg = ToCoord::Installed { step, attempt };
                if let Err(e) = send_coord(&self.link, self.spec.ranks, &msg, &[]) {
                    tracing::warn!("rank {}: {e}", self.spec.rank);
                }
            }
            RankCommand::Starting { .. } | RankCommand::Busy { .. } => {}
        }
        Ok(())
    }
}

//! The ractor shells: one thin actor per file, each driving a pure machine of [`crate::core`]
//! (the Coordinator machine, the RankMachine, the Supervisor) and carrying out its commands.
//!
//! ```text
//! Coordinator ─┬─ DataLoader                the step's micro-batches (same ones on a replay)
//!              └─ NodeSupervisor            restarts GpuActors (Supervisor machine)
//!                   └─ GpuActor ×pp         one rank: RankMachine + Supervisor of its stages,
//!                        │                  exchanges activations/gradients as wire frames
//!                        └─ StageActor ×copies   one stage copy: params, stash, W queue, grads;
//!                             │                  computes on the blocking pool; the first copy
//!                             │                  of a model stage reduces and updates its tensors
//!                             └─ ExpertGroupActor ×ep   (--ep > 1) routed experts of the copy
//! ```
//!
//! A step is a transaction: the coordinator opens attempt `a` of step `t` on every GpuActor and
//! waits for each rank's "done" (the keys of its copies' gradient sums). Then each model stage's
//! owner copy reduces its tensors from every copy's sums and reports their square sums; the
//! coordinator adds them in tensor order into the global norm, judges the step and sends the clip
//! factor; the owners run AdamW beside the committed state, every rank installs the owners' new
//! values, and the step commits once all installed them. The coordinator holds no tensor. Any
//! failure aborts the attempt; the failed actor's supervisor restarts it after a backoff timer and
//! the coordinator replays the step once every rank is up, every rank restoring the last committed
//! parameters. Actors find each other through the formation's [`AddressBook`], never by a global
//! name; every message is plain data ([`protocol`]).

mod coordinator;
mod data_loader;
mod engine;
mod expert_group;
mod gpu;
mod node;
pub mod payload;
pub mod protocol;
mod root;
mod stage;

pub use coordinator::open_check;
pub use engine::{ActorEngine, FormationSpec};

use crate::core::detector::DetectorPolicy;
use crate::core::supervisor::RestartPolicy;
use crate::formation::Wire;
use crate::inject::{Fault, FaultBook, FaultKind};
use crate::schedule::Schedule;
use kernels::model::DeepSeekV3;
use payload::Payloads;
use protocol::{CoordMsg, EngineMsg, ExpertReply, GpuMsg, NodeMsg};
use ractor::{ActorId, ActorRef, SupervisionEvent};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the formation's actors are now; each registers itself when it starts. Besides the
/// actors: the inbox of each stage copy's compute for its expert groups' answers (by rank and
/// copy), and the engine's inbox.
#[derive(Default)]
pub struct AddressBook {
    gpus: Mutex<Vec<Option<ActorRef<GpuMsg>>>>,
    coord: Mutex<Option<ActorRef<CoordMsg>>>,
    node: Mutex<Option<ActorRef<NodeMsg>>>,
    experts:
        Mutex<std::collections::BTreeMap<(usize, usize), std::sync::mpsc::Sender<ExpertReply>>>,
    engine: Mutex<Option<tokio::sync::mpsc::UnboundedSender<EngineMsg>>>,
}

impl AddressBook {
    fn new(ranks: usize) -> AddressBook {
        AddressBook {
            gpus: Mutex::new(vec![None; ranks]),
            ..Default::default()
        }
    }

    /// Stage copy `copy` of rank `rank` reads its expert groups' answers from `inbox`.
    fn set_expert_inbox(
        &self,
        rank: usize,
        copy: usize,
        inbox: std::sync::mpsc::Sender<ExpertReply>,
    ) {
        if let Ok(mut e) = self.experts.lock() {
            e.insert((rank, copy), inbox);
        }
    }

    /// Sends an expert group's answer to the stage copy it serves (lost if that one is gone).
    fn to_stage(&self, rank: usize, copy: usize, reply: ExpertReply) {
        if let Some(tx) = self
            .experts
            .lock()
            .ok()
            .and_then(|e| e.get(&(rank, copy)).cloned())
        {
            let _ = tx.send(reply);
        }
    }

    fn set_engine(&self, inbox: tokio::sync::mpsc::UnboundedSender<EngineMsg>) {
        if let Ok(mut e) = self.engine.lock() {
            *e = Some(inbox);
        }
    }

    fn to_engine(&self, msg: EngineMsg) {
        if let Some(tx) = self.engine.lock().ok().and_then(|e| e.clone()) {
            let _ = tx.send(msg);
        }
    }

    fn set_gpu(&self, rank: usize, r: ActorRef<GpuMsg>) {
        if let Ok(mut g) = self.gpus.lock() {
            g[rank] = Some(r);
        }
    }

    fn gpu(&self, rank: usize) -> Option<ActorRef<GpuMsg>> {
        self.gpus
            .lock()
            .ok()
            .and_then(|g| g.get(rank).cloned().flatten())
    }

    fn set_coord(&self, r: ActorRef<CoordMsg>) {
        if let Ok(mut c) = self.coord.lock() {
            *c = Some(r);
        }
    }

    fn coord(&self) -> Option<ActorRef<CoordMsg>> {
        self.coord.lock().ok().and_then(|c| c.clone())
    }

    fn set_node(&self, r: ActorRef<NodeMsg>) {
        if let Ok(mut n) = self.node.lock() {
            *n = Some(r);
        }
    }

    fn node(&self) -> Option<ActorRef<NodeMsg>> {
        self.node.lock().ok().and_then(|n| n.clone())
    }
}

/// What every actor of one formation shares (read-only, except the address book and the
/// shutdown flag).
pub struct Ctx {
    schedule: Schedule,
    /// The initial model: structure for every stage, initial values for fresh actors.
    template: Arc<DeepSeekV3>,
    ranges: Vec<Range<usize>>,
    mtp_weight: f32,
    wire: Wire,
    ep: usize,
    /// Where each stage copy computes.
    compute: crate::formation::StagePlacement,
    hidden: usize,
    faults: Arc<FaultBook>,
    policy: RestartPolicy,
    epoch: Instant,
    book: AddressBook,
    /// What messages name by key (batches, parameters, gradient sums, states).
    payloads: Payloads,
    /// Every model stage's structure without values (what a reduce reads of the stages whose
    /// sums it takes).
    meta: Vec<kernels::model::stage::Stage>,
    /// Per model stage, the copy that reduces and updates its tensors (its first copy).
    owners: Vec<usize>,
    /// The failure detectors' policy (heartbeat interval, dead-after bound).
    detector: DetectorPolicy,
    /// How long after its last progress each hung actor was declared dead, in ms.
    detections_ms: Mutex<Vec<u64>>,
    /// Stragglers reported (slow, not restarted).
    stragglers: AtomicU64,
    /// The last committed step (kept by the engine): where a replacement coordinator starts.
    committed: AtomicU64,
    /// Coordinators started so far (a replacement restores the committed state first).
    coordinators: AtomicU64,
    /// Why the root gave up, when it did.
    fatal: Mutex<Option<String>>,
    stopping: AtomicBool,
    /// The step attempt the coordinator has open (set when it opens one, cleared before it
    /// drops an attempt's payloads): a message of any other attempt that finds its payload
    /// gone is stale and dropped, not a fault of the actor that reads it.
    open_attempt: Mutex<Option<(u64, u32)>>,
}

impl Ctx {
    fn to_coord(&self, msg: CoordMsg) {
        if let Some(c) = self.book.coord() {
            let _ = c.cast(msg);
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn set_open_attempt(&self, open: Option<(u64, u32)>) {
        if let Ok(mut a) = self.open_attempt.lock() {
            *a = open;
        }
    }

    /// A payload that a message of `(step, attempt)` names: `Ok(Some)` when it is there;
    /// `Ok(None)` when it went with its dropped attempt (the message is stale: the replay sends
    /// its own); `Err` when it is gone from the attempt still open (the reader names it).
    fn live<T>(&self, found: Option<T>, step: u64, attempt: u32) -> Result<Option<T>, ()> {
        if found.is_some() {
            return Ok(found);
        }
        let open = self.open_attempt.lock().map(|a| *a);
        if open.is_ok_and(|a| a == Some((step, attempt))) {
            return Err(());
        }
        tracing::debug!(
            step,
            attempt,
            "a payload of a dropped attempt: the message is stale"
        );
        Ok(None)
    }
}

/// Carries out an injected fault that stops the actor where it stands (panic, hang) or delays it
/// (slow: `extra` is how long the work would take `factor - 1` more times). Message faults
/// (drop, corrupt, dup) are carried out where the message is sent; here they do nothing.
async fn fire(fault: Fault, what: String, extra: Duration) {
    match fault.kind {
        FaultKind::Panic => panic!("injected fault: {what}"),
        FaultKind::Hang => {
            tracing::warn!("injected hang: {what}");
            // stuck for good, as a real hang inside compute: the actor waits on a parked thread
            // that never returns; only a kill (by the probe protocol) gets it out
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                let _keep = tx;
                loop {
                    std::thread::park();
                }
            });
            let _ = rx.await;
        }
        FaultKind::Slow => {
            tracing::warn!("injected straggler ({}x): {what}", fault.factor());
            straggle(extra.mul_f64((fault.factor() - 1.0).max(0.0)), None).await;
        }
        // message faults fire where the message is sent; a loss spike is made by the data
        FaultKind::Drop
        | FaultKind::Corrupt
        | FaultKind::Dup
        | FaultKind::LossSpike
        | FaultKind::StoreOutage => {}
    }
}

/// A Supervisor machine's backoff timer: `msg` comes back to `myself` after `after_ms`.
fn backoff<M: ractor::Message>(
    myself: &ActorRef<M>,
    after_ms: u64,
    msg: impl FnOnce() -> M + Send + 'static,
) {
    ractor::time::send_after(Duration::from_millis(after_ms), myself.get_cell(), msg);
}

/// A straggler's extra time: spent in slices, each one a sign of life on `progress` (a slow
/// actor keeps working; the failure detector tells it from a hung one by that).
async fn straggle(extra: Duration, progress: Option<&AtomicU64>) {
    let slice = Duration::from_millis(50);
    let end = Instant::now() + extra;
    while Instant::now() < end {
        tokio::time::sleep(slice.min(end - Instant::now())).await;
        if let Some(p) = progress {
            p.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn is_child_event(evt: &SupervisionEvent) -> Option<(ActorId, String)> {
    match evt {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell.get_id(), format!("failed: {err}"))),
        SupervisionEvent::ActorTerminated(cell, _, reason) => Some((
            cell.get_id(),
            format!("terminated: {}", reason.as_deref().unwrap_or("killed")),
        )),
        _ => None,
    }
}

/// 64M parameters (256 MiB of f32): small (117M) trims, tiny (a few M) does not.
pub(crate) const TRIM_FROM_PARAMS: usize = 64 << 20;

/// Hands the pages of freed memory back to the kernel: called when a step's compute is done
/// (before the new state is built) and once it has committed. A step frees activations,
/// gradient sums and the old committed state on other threads than those that allocated them;
/// glibc keeps such memory in its arenas (up to the trim threshold the binary sets for speed),
/// which made the formation's resident set 1–2 GB larger on small than what it uses.
/// Only for models of at least [`TRIM_FROM_PARAMS`] parameters: below, what glibc keeps is small
/// and refaulting the returned pages costs more than it saves.
pub(crate) fn release_free_memory(params: usize) {
    if params < TRIM_FROM_PARAMS {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's arenas to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

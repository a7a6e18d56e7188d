//! The Coordinator actor: drives the pure [`crate::core::coordinator::Coordinator`] machine
//! (step transaction, deadlines, probes), a [`Supervisor`] over its DataLoader and a failure
//! detector over the ranks' heartbeats. It holds no tensor: the reduce and the optimizer run on
//! the stages that own them (the first copy of each model stage); the coordinator hands each
//! owner the keys of the sums it reduces, adds the owners' per-tensor square sums in tensor order
//! (the plain loop's global norm, bit for bit), judges the step and sends the clip factor. It is
//! a child of the Root, beside the NodeSupervisor: when it dies the ranks live on, and its
//! replacement rebuilds its view from their reports.

use super::data_loader::{DataArgs, DataLoader, batches_crc};
use super::payload::PayloadKey;
use super::protocol::{
    ApplyArgs, CoordMsg, DataMsg, EngineMsg, GpuMsg, NodeMsg, RankGrads, StepReply,
};
use super::{Ctx, backoff, fire, is_child_event};
use crate::core::coordinator::{CoordCommand, CoordEvent, Coordinator as Machine, TimeoutPolicy};
use crate::core::detector::{Detector, DetectorCommand, DetectorEvent};
use crate::core::rank::RankStats;
use crate::core::supervisor::{SupCommand, SupEvent, Supervisor};
use crate::formation::threads::combine_stage_stats;
use crate::inject::{Fault, FaultKind, Phase, Target};
use crate::trainer::{self, StepHyper, StepOutput};
use kernels::model::stage::combine_microbatch_stats;
use kernels::model::{Batch, StepStats};
use kernels::ops::adamw;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long the coordinator waits for the data loader before asking a fresh one.
const DATA_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Pause before asking the data loader again.
const DATA_RETRY: Duration = Duration::from_millis(100);
/// Data requests of one step before the run gives up.
const DATA_ATTEMPTS: u32 = 8;

/// The coordinator's child.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Child {
    Loader,
}

/// The open step's data and results. Its tensors sit in the payload store; the job names them.
struct Job {
    step: u64,
    /// The committed state the step starts from (a `TrainState`, the engine's): the owners
    /// update beside it, restoring ranks load it.
    state: PayloadKey,
    hyper: StepHyper,
    /// The engine has its answer.
    answered: bool,
    /// The step's micro-batches (a `Vec<Batch>`), once they passed their checksum.
    batches: Option<PayloadKey>,
    data_tries: u32,
    done: BTreeMap<usize, (RankGrads, RankStats)>,
    /// The attempt's stats once every rank is done.
    stats: Option<StepStats>,
    /// Per model stage, (tensor, Σg²) of its trainable tensors as its owner reduced them.
    squares: BTreeMap<usize, Vec<(usize, f64)>>,
    /// Per model stage, its owner's `TensorUpdates`.
    updates: BTreeMap<usize, PayloadKey>,
    out: Option<StepOutput>,
}

/// Where a job keeps one kind of owner answer, by model stage.
type Slot<T> = fn(&mut Job) -> &mut BTreeMap<usize, T>;

impl Job {
    /// Answers the engine with `result` (once).
    fn answer(&mut self, ctx: &Ctx, result: Result<StepReply, String>) {
        if !std::mem::replace(&mut self.answered, true) {
            let step = self.step;
            ctx.book.to_engine(EngineMsg::StepDone { step, result });
        }
    }

    fn fail(&mut self, ctx: &Ctx, reason: String) {
        self.answer(ctx, Err(reason));
    }

    /// Drops the attempt's gradient sums and updates, closing it first (late readers are stale).
    fn drop_attempt(&mut self, ctx: &Ctx) {
        ctx.set_open_attempt(None);
        for (_, (grads, _)) in std::mem::take(&mut self.done) {
            for (_, g) in grads {
                ctx.payloads.release(g.sums);
                g.shared.into_iter().for_each(|k| ctx.payloads.release(k));
            }
        }
        for (_, k) in std::mem::take(&mut self.updates) {
            ctx.payloads.release(k);
        }
        self.squares.clear();
        self.stats = None;
        self.out = None;
    }
}

/// The root of the formation's tree.
pub struct Coordinator;

pub struct CoordArgs {
    pub ctx: Arc<Ctx>,
    pub data: DataArgs,
    pub committed: u64,
    pub timeouts: TimeoutPolicy,
}

pub struct CoordState {
    ctx: Arc<Ctx>,
    data_args: DataArgs,
    machine: Machine,
    sup: Supervisor<Child>,
    loader: Option<ActorRef<DataMsg>>,
    job: Option<Job>,
    /// Message faults armed for the next broadcast.
    armed: Vec<Fault>,
    /// Heartbeats of the ranks: a GpuActor silent past the bound is declared dead and killed.
    detector: Detector,
    /// The GpuActor each rank had when it was last probed: a `Kill` after the probe's grace is
    /// for that actor only (a rank restarted meanwhile, e.g. by the heartbeat detector, has a new
    /// one that never saw the probe).
    probed: BTreeMap<usize, ractor::ActorId>,
}

/// The check a rank verifies on an open (a damaged open is refused as a lost message).
pub fn open_check(step: u64, attempt: u32) -> u32 {
    let mut b = step.to_le_bytes().to_vec();
    b.extend(attempt.to_le_bytes());
    crc32c::crc32c(&b)
}

impl Coordinator {
    fn ranks(st: &CoordState) -> usize {
        st.ctx.schedule.ranks
    }

    /// Sends `f(rank)` to every rank, applying armed message faults to it.
    fn broadcast(st: &mut CoordState, f: impl Fn(usize) -> GpuMsg) {
        let faults = std::mem::take(&mut st.armed);
        let has = |k: FaultKind| faults.iter().any(|f| f.kind == k);
        for r in 0..Coordinator::ranks(st) {
            let Some(g) = st.ctx.book.gpu(r) else {
                continue;
            };
            let mut msg = f(r);
            if r == 0 && has(FaultKind::Drop) {
                tracing::warn!("injected drop of a coordinator message to rank 0");
                continue;
            }
            if r == 0 && has(FaultKind::Dup) {
                let _ = g.cast(f(r));
            }
            if r == 0
                && has(FaultKind::Corrupt)
                && let GpuMsg::Open { check, .. } = &mut msg
            {
                *check ^= 0x0100_0000;
                tracing::warn!("injected corruption of the open sent to rank 0");
            }
            let _ = g.cast(msg);
        }
    }

    /// A coordinator fault at (step, phase): panic, hang and slow fire now; message faults arm.
    async fn maybe_fail(st: &mut CoordState, step: u64, phase: Phase) {
        while let Some(f) = st.ctx.faults.take(step, phase, Target::Coordinator, 0) {
            let what = format!("coordinator at step {step}, phase {phase:?}");
            match f.kind {
                FaultKind::Drop | FaultKind::Corrupt | FaultKind::Dup => st.armed.push(f),
                _ => fire(f, what, Duration::from_millis(50)).await,
            }
        }
    }

    /// Asks the loader for the open step's batches: its answer comes back as
    /// [`CoordMsg::Batches`], or a [`CoordMsg::DataTimeout`] first.
    fn request_data(myself: &ActorRef<CoordMsg>, st: &mut CoordState) {
        let Some(job) = st.job.as_mut() else { return };
        job.data_tries += 1;
        let (step, try_no) = (job.step, job.data_tries);
        match &st.loader {
            None => Coordinator::retry_data(myself, st, step, "the data loader is restarting"),
            Some(l) => {
                if l.cast(DataMsg::Get { step }).is_err() {
                    Coordinator::retry_data(myself, st, step, "the data loader is gone");
                    return;
                }
                ractor::time::send_after(DATA_TIMEOUT, myself.get_cell(), move || {
                    CoordMsg::DataTimeout { step, try_no }
                });
            }
        }
    }

    /// The open step's data did not come (`why`): asked again after a pause, or the step fails
    /// after [`DATA_ATTEMPTS`] requests.
    fn retry_data(myself: &ActorRef<CoordMsg>, st: &mut CoordState, step: u64, why: &str) {
        let Some(job) = st.job.as_mut().filter(|j| j.step == step) else {
            return;
        };
        if job.data_tries >= DATA_ATTEMPTS {
            job.fail(&st.ctx, format!("step {step}: the data loader: {why}"));
            st.job = None;
            return;
        }
        tracing::warn!(step, "data loader: {why}; asking again");
        ractor::time::send_after(DATA_RETRY, myself.get_cell(), move || CoordMsg::RetryData {
            step,
        });
    }

    /// Sends `f(model stage, owner copy)` to the rank of each model stage's owner copy.
    fn to_owners(st: &CoordState, mut f: impl FnMut(usize, usize) -> GpuMsg) {
        for (s, &copy) in st.ctx.owners.iter().enumerate() {
            let msg = f(s, copy);
            if let Some(g) = st.ctx.book.gpu(st.ctx.schedule.stages[copy].rank) {
                let _ = g.cast(msg);
            }
        }
    }

    /// Records an owner's answer (`result` of model stage `model_stage`) for the current attempt
    /// in `slot`, or fails the step with its error. True once every model stage has answered.
    fn owner_answered<T>(
        st: &mut CoordState,
        (step, attempt): (u64, u32),
        model_stage: usize,
        result: Result<T, String>,
        slot: Slot<T>,
    ) -> bool {
        if !st.machine.is_current(step, attempt) {
            return false;
        }
        let Some(job) = st.job.as_mut() else {
            return false;
        };
        match result {
            Ok(v) => {
                let answers = slot(job);
                answers.insert(model_stage, v);
                answers.len() == st.ctx.owners.len()
            }
            Err(e) => {
                let why = format!("step {step}: stage {model_stage}'s owner: {e}");
                job.fail(&st.ctx, why);
                st.job = None;
                false
            }
        }
    }

    /// The step's verdict once every owner reported its square sums: the global norm (the sums
    /// added in tensor order, as the plain loop does), the loss-spike gate, and what the owners
    /// need to update (None: the gate refused the step). Sets the job's output.
    fn judge(job: &mut Job) -> Option<ApplyArgs> {
        let mut squares: Vec<(usize, f64)> = job.squares.values().flatten().copied().collect();
        squares.sort_by_key(|&(g, _)| g);
        let norm = adamw::norm_from_square_sums(squares.into_iter().map(|x| x.1));
        let stats = job.stats.clone().unwrap_or_default();
        let h = job.hyper;
        let rejected = trainer::judge(&stats, norm, &h);
        let loads = stats.loads.clone();
        job.out = Some(StepOutput {
            stats,
            grad_norm: norm,
            rejected,
        });
        rejected.is_none().then_some(ApplyArgs {
            factor: adamw::clip_factor(norm, h.clip),
            hyper: h,
            loads,
            state: job.state,
        })
    }

    /// Carries out the machine's commands (and what they cause) in order.
    async fn exec(
        myself: &ActorRef<CoordMsg>,
        st: &mut CoordState,
        first: Vec<CoordCommand>,
    ) -> Result<(), ActorProcessingErr> {
        let mut cmds: std::collections::VecDeque<CoordCommand> = first.into();
        while let Some(cmd) = cmds.pop_front() {
            match cmd {
                CoordCommand::Open {
                    step,
                    attempt,
                    restore,
                } => {
                    let Some(job) = st.job.as_mut() else { continue };
                    let Some(batches) = job.batches else {
                        continue;
                    };
                    let restore = restore.then_some(job.state);
                    st.ctx.set_open_attempt(Some((step, attempt)));
                    if attempt > 0 {
                        tracing::warn!(step, attempt, "replaying step");
                    }
                    let check = open_check(step, attempt);
                    Coordinator::broadcast(st, |_| GpuMsg::Open {
                        step,
                        attempt,
                        check,
                        batches,
                        restore,
                    });
                }
                CoordCommand::SetTimer { at_ms, timer } => {
                    let after = Duration::from_millis(at_ms.saturating_sub(st.ctx.now_ms()));
                    ractor::time::send_after(after, myself.get_cell(), move || {
                        CoordMsg::Timer(timer)
                    });
                }
                CoordCommand::Reduce { step, attempt } => {
                    Coordinator::maybe_fail(st, step, Phase::Optimizer).await;
                    let Some(job) = st.job.as_mut() else { continue };
                    let schedule = &st.ctx.schedule;
                    let m = schedule.microbatches;
                    let stages = schedule.kind.model_stages(schedule.ranks);
                    let per: Vec<_> = job.done.values().flat_map(|d| d.1.clone()).collect();
                    let stats = combine_stage_stats(per, m, stages).map(combine_microbatch_stats);
                    match stats {
                        Ok(s) => job.stats = Some(s),
                        Err(e) => {
                            job.fail(&st.ctx, format!("step {step}: {e}"));
                            st.job = None;
                            return Ok(());
                        }
                    }
                    // each owner reduces its stage from the keys of every copy's sums; stage 0
                    // also takes the jobs on the shared embedding
                    let mut parts: Vec<Vec<(usize, PayloadKey)>> = vec![Vec::new(); stages];
                    for (grads, _) in job.done.values() {
                        for &(copy, g) in grads {
                            let s = schedule.stages[copy].model_stage;
                            parts[s].push((s, g.sums));
                            if let Some(k) = g.shared {
                                parts[0].push((s, k));
                            }
                        }
                    }
                    Coordinator::to_owners(st, |s, copy| GpuMsg::Reduce {
                        copy,
                        step,
                        attempt,
                        parts: std::mem::take(&mut parts[s]),
                    });
                }
                CoordCommand::Install { step, attempt } => {
                    let Some(job) = st.job.as_mut() else { continue };
                    let updates: Vec<PayloadKey> = job.updates.values().copied().collect();
                    Coordinator::broadcast(st, |_| GpuMsg::Install {
                        step,
                        attempt,
                        updates: updates.clone(),
                    });
                }
                CoordCommand::Commit { step, attempts } => {
                    let Some(mut job) = st.job.take() else {
                        continue;
                    };
                    tracing::debug!(step, attempts, "step committed");
                    st.ctx.set_open_attempt(None);
                    let now = st.ctx.now_ms();
                    st.sup.on(now, SupEvent::Progress);
                    if let Some(n) = st.ctx.book.node() {
                        let _ = n.cast(NodeMsg::Progress);
                    }
                    for r in 0..Coordinator::ranks(st) {
                        if let Some(g) = st.ctx.book.gpu(r) {
                            let _ = g.cast(GpuMsg::Progress);
                        }
                    }
                    let Some(out) = job.out.take() else {
                        job.fail(&st.ctx, format!("step {step} committed without a result"));
                        continue;
                    };
                    let reply = StepReply {
                        updates: job.updates.values().copied().collect(),
                        out,
                        restarts: st.machine.restarts,
                        replayed_steps: st.machine.txn().replayed_steps,
                    };
                    job.answer(&st.ctx, Ok(reply));
                }
                CoordCommand::Abort {
                    step,
                    attempt,
                    reason,
                } => {
                    tracing::warn!(step, attempt, "aborting step: {reason}");
                    if let Some(job) = st.job.as_mut() {
                        job.drop_attempt(&st.ctx);
                    }
                    Coordinator::broadcast(st, |_| GpuMsg::Abort { step, attempt });
                }
                CoordCommand::Probe { step, attempt } => {
                    tracing::warn!(step, attempt, "step overdue; probing the ranks");
                    st.probed = (0..Coordinator::ranks(st))
                        .filter_map(|r| st.ctx.book.gpu(r).map(|g| (r, g.get_id())))
                        .collect();
                    Coordinator::broadcast(st, |_| GpuMsg::Probe { step, attempt });
                }
                CoordCommand::Kill { rank } => {
                    // a rank restarted since the probe has its death report on the way already
                    let g = st.ctx.book.gpu(rank);
                    if let Some(g) = g.filter(|g| st.probed.get(&rank) == Some(&g.get_id())) {
                        tracing::warn!(rank, "rank did not answer the probe; killing it");
                        g.kill();
                    }
                }
                CoordCommand::GiveUp { step, reason } => {
                    if let Some(mut job) = st.job.take() {
                        job.drop_attempt(&st.ctx);
                        job.fail(&st.ctx, format!("step {step}: {reason}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Carries out the root Supervisor machine's commands.
    async fn supervise(
        myself: &ActorRef<CoordMsg>,
        st: &mut CoordState,
        cmds: Vec<SupCommand<Child>>,
    ) -> Result<(), ActorProcessingErr> {
        for cmd in cmds {
            match cmd {
                SupCommand::StartTimer { after_ms, token } => {
                    backoff(myself, after_ms, move || CoordMsg::RestartTimer { token })
                }
                SupCommand::Restart {
                    child: Child::Loader,
                    ..
                } => {
                    let (l, _) = Actor::spawn_linked(
                        None,
                        DataLoader,
                        st.data_args.clone(),
                        myself.get_cell(),
                    )
                    .await?;
                    st.loader = Some(l);
                    if st.job.as_ref().is_some_and(|j| j.batches.is_none()) {
                        Coordinator::request_data(myself, st);
                    }
                }
                SupCommand::RestartAll { .. } => {
                    // the loader is the only child: restart it as above
                    let (l, _) = Actor::spawn_linked(
                        None,
                        DataLoader,
                        st.data_args.clone(),
                        myself.get_cell(),
                    )
                    .await?;
                    st.loader = Some(l);
                    if st.job.as_ref().is_some_and(|j| j.batches.is_none()) {
                        Coordinator::request_data(myself, st);
                    }
                }
                SupCommand::Escalate { reason } | SupCommand::GiveUp { reason } => {
                    // the coordinator fails; the root starts a new one
                    return Err(reason.into());
                }
            }
        }
        Ok(())
    }
}

impl Actor for Coordinator {
    type Msg = CoordMsg;
    type State = CoordState;
    type Arguments = CoordArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<CoordMsg>,
        a: CoordArgs,
    ) -> Result<CoordState, ActorProcessingErr> {
        let ctx = a.ctx;
        ctx.book.set_coord(myself.clone());
        let (loader, _) =
            Actor::spawn_linked(None, DataLoader, a.data.clone(), myself.get_cell()).await?;
        let ranks = ctx.schedule.ranks;
        let mut st = CoordState {
            ctx: ctx.clone(),
            data_args: a.data,
            machine: Machine::new(ranks, a.committed, a.timeouts),
            sup: Supervisor::new("the coordinator", ctx.policy, false),
            loader: Some(loader),
            job: None,
            armed: Vec::new(),
            detector: Detector::new(ctx.detector),
            probed: BTreeMap::new(),
        };
        // a replacement rebuilds its view from the ranks: each drops the attempt it was in and
        // reports in; the first open restores the committed state everywhere
        if ctx
            .coordinators
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            st.machine.restore_on_next_open();
            for r in 0..ranks {
                if let Some(g) = ctx.book.gpu(r) {
                    let _ = g.cast(GpuMsg::Hello);
                }
            }
        }
        let every = Duration::from_millis(ctx.detector.heartbeat_interval_ms);
        ractor::time::send_after(every, myself.get_cell(), || CoordMsg::Tick);
        Ok(st)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<CoordMsg>,
        st: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(l) = st.loader.take() {
            l.kill();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<CoordMsg>,
        msg: CoordMsg,
        st: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.ctx.now_ms();
        let event = match msg {
            CoordMsg::Ping => {
                st.ctx.book.to_engine(EngineMsg::Pong);
                return Ok(());
            }
            CoordMsg::RunStep {
                step,
                state,
                hyper,
                restore,
            } => {
                if restore {
                    st.machine.restore_on_next_open();
                }
                st.job = Some(Job {
                    step,
                    state,
                    hyper,
                    answered: false,
                    batches: None,
                    data_tries: 0,
                    done: BTreeMap::new(),
                    stats: None,
                    squares: BTreeMap::new(),
                    updates: BTreeMap::new(),
                    out: None,
                });
                Coordinator::request_data(&myself, st);
                return Ok(());
            }
            CoordMsg::Batches { step, result } => {
                let Some(job) = st.job.as_mut().filter(|j| j.step == step) else {
                    return Ok(());
                };
                if job.batches.is_some() {
                    // a second answer (a retry raced a restarted loader): the first one counts
                    return Ok(());
                }
                let checked = match result {
                    Ok(c) => c,
                    Err(e) => {
                        // the data itself cannot be read: asking again would not help
                        job.fail(&st.ctx, format!("step {step}: the data loader: fatal: {e}"));
                        st.job = None;
                        return Ok(());
                    }
                };
                let intact = st
                    .ctx
                    .payloads
                    .get::<Vec<Batch>>(checked.batches)
                    .is_some_and(|b| batches_crc(&b) == checked.crc);
                if !intact {
                    st.ctx.payloads.release(checked.batches);
                    Coordinator::retry_data(&myself, st, step, "the batches failed their checksum");
                    return Ok(());
                }
                job.batches = Some(checked.batches);
                Coordinator::maybe_fail(st, step, Phase::Forward).await;
                CoordEvent::Begin { step }
            }
            CoordMsg::DataTimeout { step, try_no } => {
                let overdue = st.job.as_ref().is_some_and(|j| {
                    j.step == step && j.batches.is_none() && j.data_tries == try_no
                });
                if overdue {
                    if let Some(l) = &st.loader {
                        l.kill();
                    }
                    let why = format!(
                        "no answer within {} ms; killed it",
                        DATA_TIMEOUT.as_millis()
                    );
                    Coordinator::retry_data(&myself, st, step, &why);
                }
                return Ok(());
            }
            CoordMsg::Done {
                rank,
                step,
                attempt,
                grads,
                stats,
            } => {
                if !st.machine.is_current(step, attempt) {
                    return Ok(());
                }
                let first = st.job.as_ref().is_some_and(|j| j.done.is_empty());
                if let Some(job) = st.job.as_mut() {
                    job.done.insert(rank, (grads, stats));
                }
                if first {
                    Coordinator::maybe_fail(st, step, Phase::Backward).await;
                    Coordinator::maybe_fail(st, step, Phase::Weight).await;
                }
                CoordEvent::Done {
                    rank,
                    step,
                    attempt,
                }
            }
            CoordMsg::Installed {
                rank,
                step,
                attempt,
            } => CoordEvent::Installed {
                rank,
                step,
                attempt,
            },
            CoordMsg::Reduced {
                model_stage,
                step,
                attempt,
                result,
            } => {
                let slot: Slot<_> = |j| &mut j.squares;
                if !Coordinator::owner_answered(st, (step, attempt), model_stage, result, slot) {
                    return Ok(());
                }
                // the new values come next: start them from the pages the compute gave back
                super::release_free_memory(st.ctx.template.num_params());
                let Some(job) = st.job.as_mut() else {
                    return Ok(());
                };
                match Coordinator::judge(job) {
                    Some(update) => {
                        Coordinator::to_owners(st, |_, copy| GpuMsg::Apply {
                            copy,
                            step,
                            attempt,
                            update: update.clone(),
                        });
                        return Ok(());
                    }
                    // refused by the gate: nothing to update
                    None => CoordEvent::Reduced { step, attempt },
                }
            }
            CoordMsg::Applied {
                model_stage,
                step,
                attempt,
                result,
            } => {
                let slot: Slot<_> = |j| &mut j.updates;
                if !Coordinator::owner_answered(st, (step, attempt), model_stage, result, slot) {
                    return Ok(());
                }
                CoordEvent::Reduced { step, attempt }
            }
            CoordMsg::RankDown { rank, reason } => {
                tracing::warn!(rank, "rank down: {reason}");
                st.detector.on(now, DetectorEvent::Leave { member: rank });
                CoordEvent::RankDown { rank, reason }
            }
            CoordMsg::RankUp { rank } => {
                st.detector.on(now, DetectorEvent::Join { member: rank });
                CoordEvent::RankUp { rank }
            }
            CoordMsg::Heartbeat { rank } => {
                let hb = DetectorEvent::Heartbeat {
                    member: rank,
                    progress: 0,
                };
                st.detector.on(now, hb);
                return Ok(());
            }
            CoordMsg::Tick => {
                for cmd in st.detector.on(now, DetectorEvent::Tick) {
                    if let DetectorCommand::Dead {
                        member, silent_ms, ..
                    } = cmd
                    {
                        tracing::warn!(
                            rank = member,
                            "gpu actor silent for {silent_ms} ms: declared dead, killing it"
                        );
                        st.ctx
                            .detections_ms
                            .lock()
                            .map(|mut d| d.push(silent_ms))
                            .ok();
                        if let Some(g) = st.ctx.book.gpu(member) {
                            g.kill();
                        }
                    }
                }
                let every = Duration::from_millis(st.ctx.detector.heartbeat_interval_ms);
                ractor::time::send_after(every, myself.get_cell(), || CoordMsg::Tick);
                return Ok(());
            }
            CoordMsg::Lost {
                rank,
                step,
                attempt,
                reason,
            } => CoordEvent::Lost {
                rank,
                step,
                attempt,
                reason,
            },
            CoordMsg::ProbeAck {
                rank,
                step,
                attempt,
            } => CoordEvent::ProbeAck {
                rank,
                step,
                attempt,
            },
            CoordMsg::RetryData { step } => {
                if st
                    .job
                    .as_ref()
                    .is_some_and(|j| j.step == step && j.batches.is_none())
                {
                    Coordinator::request_data(&myself, st);
                }
                return Ok(());
            }
            CoordMsg::Timer(t) => CoordEvent::Timer(t),
            CoordMsg::AllDown { reason } => {
                tracing::warn!("every rank down: {reason}");
                CoordEvent::AllDown { reason }
            }
            CoordMsg::RestartTimer { token } => {
                let cmds = st.sup.on(now, SupEvent::Timer { token });
                return Coordinator::supervise(&myself, st, cmds).await;
            }
        };
        let now = st.ctx.now_ms();
        let cmds = st.machine.on(now, event);
        Coordinator::exec(&myself, st, cmds).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<CoordMsg>,
        evt: SupervisionEvent,
        st: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, what)) = is_child_event(&evt) else {
            return Ok(());
        };
        if st.ctx.stopping() {
            return Ok(());
        }
        let now = st.ctx.now_ms();
        let child = if st.loader.as_ref().is_some_and(|l| l.get_id() == id) {
            st.loader = None;
            Child::Loader
        } else {
            return Ok(());
        };
        tracing::warn!("{child:?} {what}; restarting it");
        let what = format!("the {child:?} {what}");
        let cmds = st.sup.on(now, SupEvent::Failed { child, what });
        Coordinator::supervise(&myself, st, cmds).await
    }
}

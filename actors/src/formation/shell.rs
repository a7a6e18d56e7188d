//! The actor formation (ractor shells): Coordinator, DataLoader, NodeSupervisor, GpuActor and
//! StageActor in a supervision tree, thin shells around the sans-IO executor and step transaction.
//!
//! ```text
//! Coordinator ─┬─ DataLoader                the step's micro-batches (same ones on a replay)
//!              └─ NodeSupervisor            restarts GpuActors (RestartPolicy)
//!                   └─ GpuActor ×pp         runs its rank's instruction list (RankExecutor),
//!                        │                  exchanges activations/gradients with its peers
//!                        └─ StageActor ×copies   one stage copy: params, stash, W queue, grads;
//!                             │                  computes on the blocking pool
//!                             └─ ExpertGroupActor ×ep   (--ep > 1) routed experts [g·E/G, (g+1)·E/G)
//!                                                of the copy's MoE layers: FP8/BF16/f32 frames in,
//!                                                outputs and per-micro-batch expert W grads out
//! ```
//!
//! Under `--ep` the stage's MoE layers dispatch each expert's token block to the group owning
//! it and combine the answers in the dispatch plan's order (so f32 is bit-identical to `--ep
//! 1`); the group computes its experts' weight gradients of the micro-batch from zero buffers
//! and returns them with dx, the stage queues them for its W, and the coordinator's reduce sums
//! them in micro-batch order like every other gradient. A failed or hung group fails its stage,
//! which is restarted with fresh groups and the step replayed.
//!
//! A step is a transaction ([`StepTxn`]): the coordinator opens attempt `a` of step `t` on every
//! GpuActor, waits for each rank's "done" (which carries its per-micro-batch gradients), reduces
//! them in micro-batch order and applies AdamW to a copy of the committed state, sends the new
//! parameters to every rank and commits once all installed them. Any failure aborts the attempt:
//! a supervisor restarts the failed actor and reports the rank down (and, once restarted, up);
//! the coordinator then replays the step with the same micro-batches, every rank restoring its
//! stage parameters from the in-memory snapshot of the last committed step. Every exchange names
//! its (step, attempt); anything from another attempt is dropped, so lost messages only cost a
//! replay and a replay is idempotent. A hang is caught by the step timeout: the coordinator
//! probes every rank; a rank kills the stage it waits on, and a rank that does not answer is
//! killed by the coordinator.

use super::compute::{EpPayload, StageOp, StageOpResult, Wire, exec_op, ops_of, route_of};
use super::executor::{Arrival, ExecCommand, ExecEvent, RankExecutor};
use super::inject::{FaultBook, FaultKind, Phase, Target};
use super::restart::{RestartDecision, RestartPolicy, RestartTracker};
use super::threads::{RankStats, combine_stage_stats};
use super::txn::{StepTxn, TxnCommand, TxnEvent};
use crate::schedule::{Instr, Schedule};
use crate::trainer::{self, StepEngine, StepHyper, StepOutput, TrainState};
use anyhow::{Result, anyhow};
use kernels::model::experts::{ExpertGroup, LocalExpertGroups, gather};
use kernels::model::layers::{ExpertCompute, ExpertGrads, ExpertSite};
use kernels::model::stage::{
    MbGrads, Stage, StageGrads, StageRunner, combine_microbatch_stats, reduce,
    scale_for_microbatches,
};
use kernels::model::{Batch, DeepSeekV3, ParamStore};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use storage::dataset::Dataset;

/// How long a probed rank has to answer before the coordinator kills it.
const PROBE_GRACE: Duration = Duration::from_millis(1_000);
/// Attempts of one step before the run gives up.
const MAX_ATTEMPTS: u32 = 64;

static FORMATIONS: AtomicU64 = AtomicU64::new(0);

/// What every actor of one formation shares (read-only, except the shutdown flag).
pub struct Ctx {
    /// Registry prefix, unique per formation in this process.
    prefix: String,
    schedule: Schedule,
    /// The initial model: structure for every stage, initial values for fresh actors.
    template: Arc<DeepSeekV3>,
    ranges: Vec<Range<usize>>,
    mtp_weight: f32,
    wire: Wire,
    ep: usize,
    hidden: usize,
    faults: FaultBook,
    policy: RestartPolicy,
    epoch: Instant,
    step_timeout: Option<Duration>,
    stopping: AtomicBool,
}

impl Ctx {
    fn gpu_name(&self, rank: usize) -> String {
        format!("{}gpu-{rank}", self.prefix)
    }

    fn gpu(&self, rank: usize) -> Option<ActorRef<GpuMsg>> {
        ActorRef::where_is(self.gpu_name(rank))
    }

    fn coord(&self) -> Option<ActorRef<CoordMsg>> {
        ActorRef::where_is(format!("{}coordinator", self.prefix))
    }

    fn to_coord(&self, msg: CoordMsg) {
        if let Some(c) = self.coord() {
            let _ = c.cast(msg);
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// Carries out an injected fault.
async fn fire(kind: FaultKind, what: String) {
    match kind {
        FaultKind::Panic => panic!("injected fault: {what}"),
        FaultKind::Hang => {
            tracing::warn!("injected hang: {what}");
            std::future::pending::<()>().await
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

// ---------------------------------------------------------------------------------------------
// ExpertGroupActor

/// How long a stage waits for an expert group before giving up on the step (a hung group is
/// normally caught earlier by the coordinator's step timeout, which kills the waiting stage).
const EXPERT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One expert's backward answer on the wire: dx as a frame, weight gradients (gate, up, down) as
/// they are (they stay with the expert's owner until the reduce).
pub struct WireGrads {
    dx: Vec<u8>,
    dw: [Vec<f32>; 3],
}

/// Messages of an [`ExpertGroupActor`]. Payloads are transport frames ([`Wire::ep_encode`]).
pub enum ExpertMsg {
    Forward {
        step: u64,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<u8>)>,
        reply: RpcReplyPort<Vec<Vec<u8>>>,
    },
    Backward {
        step: u64,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<u8>)>,
        reply: RpcReplyPort<Vec<WireGrads>>,
    },
    /// Drop kept activations; install `restore` when given.
    Reset {
        restore: Option<Arc<ParamStore>>,
        reply: RpcReplyPort<()>,
    },
    /// Install committed-to-be parameters (the optimizer phase of `step`).
    Install {
        step: u64,
        params: Arc<ParamStore>,
        reply: RpcReplyPort<()>,
    },
}

/// Routed experts `[g·E/G, (g+1)·E/G)` of one stage copy's MoE decoder layers: their parameters,
/// the activations between forward and backward, and their weight gradients per micro-batch
/// (returned with the backward's dx). Supervised by the StageActor it serves: a failed group
/// fails that stage, which its GpuActor restarts (new groups, restored parameters, replay).
pub struct ExpertGroupActor;

pub struct ExpertArgs {
    ctx: Arc<Ctx>,
    rank: usize,
    copy: usize,
    group: usize,
}

pub struct ExpertState {
    ctx: Arc<Ctx>,
    rank: usize,
    copy: usize,
    group: Option<ExpertGroup>,
}

impl ExpertState {
    async fn blocking<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut ExpertGroup) -> R + Send + 'static,
    ) -> Result<R, ActorProcessingErr> {
        let mut g = self.group.take().ok_or("the expert group was lost")?;
        let (g, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut g);
            (g, r)
        })
        .await?;
        self.group = Some(g);
        Ok(r)
    }

    async fn maybe_fail(&self, step: u64, phase: Phase) {
        if let Some(kind) = self.ctx.faults.take(step, phase, Target::Expert, self.rank) {
            let g = self.group.as_ref().map_or(usize::MAX, |g| g.index);
            let what = format!(
                "expert group {g} of stage copy s{} on rank {} at step {step}, phase {phase:?}",
                self.copy, self.rank
            );
            fire(kind, what).await;
        }
    }
}

impl Actor for ExpertGroupActor {
    type Msg = ExpertMsg;
    type State = ExpertState;
    type Arguments = ExpertArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ExpertMsg>,
        a: ExpertArgs,
    ) -> Result<ExpertState, ActorProcessingErr> {
        let ctx = a.ctx.clone();
        let (copy, group) = (a.copy, a.group);
        let g = tokio::task::spawn_blocking(move || {
            let model_stage = ctx.schedule.stages[copy].model_stage;
            let layers = ctx.ranges[model_stage].clone();
            ExpertGroup::new(&ctx.template, layers, group, ctx.ep)
        })
        .await?;
        Ok(ExpertState {
            ctx: a.ctx,
            rank: a.rank,
            copy: a.copy,
            group: Some(g),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ExpertMsg>,
        msg: ExpertMsg,
        st: &mut ExpertState,
    ) -> Result<(), ActorProcessingErr> {
        let (wire, d) = (st.ctx.wire, st.ctx.hidden);
        match msg {
            ExpertMsg::Forward {
                step,
                site,
                blocks,
                reply,
            } => {
                st.maybe_fail(step, Phase::Forward).await;
                let out = st
                    .blocking(move |g| {
                        let blocks = blocks
                            .into_iter()
                            .map(|(i, b)| (i, Wire::ep_decode(&b)))
                            .collect();
                        g.forward(site, blocks)
                            .into_iter()
                            .map(|y| wire.ep_encode(EpPayload::Combine, &y, d))
                            .collect::<Vec<_>>()
                    })
                    .await?;
                let _ = reply.send(out);
            }
            ExpertMsg::Backward {
                step,
                site,
                blocks,
                reply,
            } => {
                st.maybe_fail(step, Phase::Backward).await;
                st.maybe_fail(step, Phase::Weight).await;
                let out = st
                    .blocking(move |g| {
                        let blocks = blocks
                            .into_iter()
                            .map(|(i, b)| (i, Wire::ep_decode(&b)))
                            .collect();
                        g.backward(site, blocks)
                            .into_iter()
                            .map(|e| WireGrads {
                                dx: wire.ep_encode(EpPayload::Combine, &e.dx, d),
                                dw: [e.dgate, e.dup, e.ddown],
                            })
                            .collect::<Vec<_>>()
                    })
                    .await?;
                let _ = reply.send(out);
            }
            ExpertMsg::Reset { restore, reply } => {
                st.blocking(move |g| {
                    g.reset();
                    if let Some(p) = restore {
                        g.load_from(&p);
                    }
                })
                .await?;
                let _ = reply.send(());
            }
            ExpertMsg::Install {
                step,
                params,
                reply,
            } => {
                st.maybe_fail(step, Phase::Optimizer).await;
                st.blocking(move |g| g.load_from(&params)).await?;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

/// A stage's routed experts in its ExpertGroupActors: blocks go out as frames, by owning group,
/// and come back in block order. Runs on the stage's blocking-pool thread and waits there; a
/// failed or silent group panics the stage's compute (the stage fails and is healed).
#[derive(Debug)]
pub struct RemoteExperts {
    groups: Vec<ActorRef<ExpertMsg>>,
    n_experts: usize,
    wire: Wire,
    d: usize,
    step: Arc<AtomicU64>,
    rt: tokio::runtime::Handle,
}

impl RemoteExperts {
    fn exchange<A: Send + 'static>(
        &self,
        blocks: Vec<(usize, Vec<f32>)>,
        kind: EpPayload,
        msg: impl Fn(u64, Vec<(usize, Vec<u8>)>, RpcReplyPort<Vec<A>>) -> ExpertMsg,
    ) -> Vec<A> {
        let n = blocks.len();
        let step = self.step.load(Ordering::SeqCst);
        let per = LocalExpertGroups::split(self.n_experts, self.groups.len(), blocks);
        let mut parts = Vec::with_capacity(per.len());
        for (g, b) in per.into_iter().enumerate() {
            if b.is_empty() {
                continue;
            }
            let pos: Vec<usize> = b.iter().map(|t| t.0).collect();
            let payload: Vec<(usize, Vec<u8>)> = b
                .into_iter()
                .map(|(_, i, x)| (i, self.wire.ep_encode(kind, &x, self.d)))
                .collect();
            let actor = &self.groups[g];
            let r = self
                .rt
                .block_on(actor.call(|reply| msg(step, payload, reply), Some(EXPERT_CALL_TIMEOUT)));
            match r {
                Ok(CallResult::Success(v)) => parts.push((pos, v)),
                Ok(CallResult::Timeout) => panic!("expert group {g} did not answer (step {step})"),
                Ok(CallResult::SenderError) | Err(_) => {
                    panic!("expert group {g} failed (step {step})")
                }
            }
        }
        gather(n, parts)
    }
}

impl ExpertCompute for RemoteExperts {
    fn forward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>> {
        self.exchange(blocks, EpPayload::Dispatch, |step, blocks, reply| {
            ExpertMsg::Forward {
                step,
                site,
                blocks,
                reply,
            }
        })
        .into_iter()
        .map(|y| Wire::ep_decode(&y))
        .collect()
    }

    fn backward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<ExpertGrads> {
        self.exchange(blocks, EpPayload::Combine, |step, blocks, reply| {
            ExpertMsg::Backward {
                step,
                site,
                blocks,
                reply,
            }
        })
        .into_iter()
        .map(|w| {
            let [dgate, dup, ddown] = w.dw;
            ExpertGrads {
                dx: Wire::ep_decode(&w.dx),
                dgate,
                dup,
                ddown,
            }
        })
        .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// StageActor

/// Messages of a [`StageActor`].
pub enum StageMsg {
    /// Drop every stash, queued W and gradient; install `restore` when given.
    Reset { restore: Option<Arc<ParamStore>> },
    /// Run one operation; the answer goes to the parent as [`GpuMsg::OpDone`].
    Op {
        step: u64,
        attempt: u32,
        op: StageOp,
        batches: Arc<Vec<Batch>>,
    },
    /// Install committed-to-be parameters; answered with [`GpuMsg::StageInstalled`].
    Install {
        step: u64,
        attempt: u32,
        params: Arc<ParamStore>,
    },
    /// Hand over the step's gradients; answered with [`GpuMsg::StageGrads`].
    TakeGrads { step: u64, attempt: u32 },
}

/// One stage copy on one rank.
pub struct StageActor;

pub struct StageArgs {
    ctx: Arc<Ctx>,
    rank: usize,
    copy: usize,
    parent: ActorRef<GpuMsg>,
}

pub struct StageState {
    ctx: Arc<Ctx>,
    rank: usize,
    copy: usize,
    parent: ActorRef<GpuMsg>,
    runner: Option<StageRunner>,
    /// Its ExpertGroupActors under `--ep` > 1 (children), and the step they serve.
    groups: Vec<ActorRef<ExpertMsg>>,
    step: Arc<AtomicU64>,
}

impl StageState {
    /// Runs `f` on the runner on the blocking pool (compute never runs on a tokio worker).
    async fn blocking<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut StageRunner) -> R + Send + 'static,
    ) -> Result<R, ActorProcessingErr> {
        let mut runner = self.runner.take().ok_or("the stage runner was lost")?;
        let (runner, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut runner);
            (runner, r)
        })
        .await?;
        self.runner = Some(runner);
        Ok(r)
    }

    /// Sends `msg` to every expert group and waits for each to acknowledge.
    async fn to_groups(
        &self,
        msg: impl Fn(RpcReplyPort<()>) -> ExpertMsg,
    ) -> Result<(), ActorProcessingErr> {
        for (g, a) in self.groups.iter().enumerate() {
            match a.call(&msg, Some(EXPERT_CALL_TIMEOUT)).await? {
                CallResult::Success(()) => {}
                _ => return Err(format!("expert group {g} did not acknowledge").into()),
            }
        }
        Ok(())
    }

    async fn maybe_fail(&self, step: u64, phase: Phase) {
        if let Some(kind) = self.ctx.faults.take(step, phase, Target::Stage, self.rank) {
            let what = format!(
                "stage copy s{} on rank {} at step {step}, phase {phase:?}",
                self.copy, self.rank
            );
            fire(kind, what).await;
        }
    }
}

impl Actor for StageActor {
    type Msg = StageMsg;
    type State = StageState;
    type Arguments = StageArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<StageMsg>,
        a: StageArgs,
    ) -> Result<StageState, ActorProcessingErr> {
        let ctx = a.ctx.clone();
        let copy = a.copy;
        let mut runner = tokio::task::spawn_blocking(move || {
            let model_stage = ctx.schedule.stages[copy].model_stage;
            let stage = Stage::from_model(&ctx.template, &ctx.ranges, model_stage);
            StageRunner::new(stage, ctx.mtp_weight)
        })
        .await?;
        let step = Arc::new(AtomicU64::new(0));
        let mut groups = Vec::new();
        if a.ctx.ep > 1 {
            for group in 0..a.ctx.ep {
                let args = ExpertArgs {
                    ctx: a.ctx.clone(),
                    rank: a.rank,
                    copy,
                    group,
                };
                let (g, _) =
                    Actor::spawn_linked(None, ExpertGroupActor, args, myself.get_cell()).await?;
                groups.push(g);
            }
            runner.set_experts(Box::new(RemoteExperts {
                groups: groups.clone(),
                n_experts: a.ctx.template.cfg.n_routed_experts,
                wire: a.ctx.wire,
                d: a.ctx.hidden,
                step: step.clone(),
                rt: tokio::runtime::Handle::current(),
            }));
        }
        Ok(StageState {
            ctx: a.ctx,
            rank: a.rank,
            copy: a.copy,
            parent: a.parent,
            runner: Some(runner),
            groups,
            step,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<StageMsg>,
        st: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        st.groups.iter().for_each(|g| g.kill());
        Ok(())
    }

    /// A failed expert group fails its stage: the GpuActor restarts the stage (with new groups)
    /// and the step is replayed, as for a stage failure.
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<StageMsg>,
        evt: SupervisionEvent,
        st: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        match is_child_event(&evt) {
            Some((_, what)) if !st.ctx.stopping() => Err(format!(
                "an expert group of stage copy s{} on rank {} {what}",
                st.copy, st.rank
            )
            .into()),
            _ => Ok(()),
        }
    }

    async fn handle(
        &self,
        _myself: ActorRef<StageMsg>,
        msg: StageMsg,
        st: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StageMsg::Reset { restore } => {
                let r2 = restore.clone();
                st.to_groups(|reply| ExpertMsg::Reset {
                    restore: r2.clone(),
                    reply,
                })
                .await?;
                st.blocking(move |r| {
                    r.reset();
                    if let Some(p) = restore {
                        r.load_from(&p);
                    }
                })
                .await?;
            }
            StageMsg::Op {
                step,
                attempt,
                op,
                batches,
            } => {
                let mb = op.mb();
                match op {
                    StageOp::Forward { .. } => st.maybe_fail(step, Phase::Forward).await,
                    StageOp::BackwardInput { .. } => st.maybe_fail(step, Phase::Backward).await,
                    StageOp::Weight { .. } => st.maybe_fail(step, Phase::Weight).await,
                    StageOp::Backward { .. } => {
                        st.maybe_fail(step, Phase::Backward).await;
                        st.maybe_fail(step, Phase::Weight).await;
                    }
                }
                st.step.store(step, Ordering::SeqCst);
                let result = st.blocking(move |r| exec_op(r, &batches, op)).await?;
                let _ = st.parent.cast(GpuMsg::OpDone {
                    copy: st.copy,
                    step,
                    attempt,
                    mb,
                    result,
                });
            }
            StageMsg::Install {
                step,
                attempt,
                params,
            } => {
                st.maybe_fail(step, Phase::Optimizer).await;
                let p2 = params.clone();
                st.to_groups(|reply| ExpertMsg::Install {
                    step,
                    params: p2.clone(),
                    reply,
                })
                .await?;
                st.blocking(move |r| r.load_from(&params)).await?;
                let _ = st.parent.cast(GpuMsg::StageInstalled {
                    copy: st.copy,
                    step,
                    attempt,
                });
            }
            StageMsg::TakeGrads { step, attempt } => {
                let grads = st.blocking(|r| r.take_grads()).await?;
                let _ = st.parent.cast(GpuMsg::StageGrads {
                    copy: st.copy,
                    step,
                    attempt,
                    grads,
                });
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// GpuActor

/// Messages of a [`GpuActor`].
pub enum GpuMsg {
    /// Start attempt `attempt` of step `step` (restore the stage parameters first when given).
    Open {
        step: u64,
        attempt: u32,
        batches: Arc<Vec<Batch>>,
        restore: Option<Arc<ParamStore>>,
    },
    /// An activation or gradient from a peer rank.
    Deliver {
        step: u64,
        attempt: u32,
        arrival: Arrival,
        data: Vec<f32>,
    },
    OpDone {
        copy: usize,
        step: u64,
        attempt: u32,
        mb: usize,
        result: StageOpResult,
    },
    StageGrads {
        copy: usize,
        step: u64,
        attempt: u32,
        grads: BTreeMap<usize, MbGrads>,
    },
    Install {
        step: u64,
        attempt: u32,
        params: Arc<ParamStore>,
    },
    StageInstalled {
        copy: usize,
        step: u64,
        attempt: u32,
    },
    Abort {
        step: u64,
        attempt: u32,
    },
    /// The step timed out: kill whatever stage this rank waits on, then acknowledge.
    Probe {
        step: u64,
        attempt: u32,
    },
}

/// One pipeline rank (the device).
pub struct GpuActor;

pub struct GpuArgs {
    ctx: Arc<Ctx>,
    rank: usize,
}

struct InFlight {
    instr: Instr,
    queue: VecDeque<(usize, StageOp)>,
}

/// This rank's part of one attempt.
struct Attempt {
    step: u64,
    attempt: u32,
    batches: Arc<Vec<Batch>>,
    ex: RankExecutor,
    inbox: BTreeMap<Arrival, Vec<f32>>,
    outbox: BTreeMap<Arrival, Vec<f32>>,
    stats: RankStats,
    inflight: Option<InFlight>,
    grads: Vec<(usize, BTreeMap<usize, MbGrads>)>,
    /// Stage copies this rank waits on for an answer.
    waiting_on: BTreeSet<usize>,
}

pub struct GpuState {
    ctx: Arc<Ctx>,
    rank: usize,
    stages: BTreeMap<usize, ActorRef<StageMsg>>,
    ids: BTreeMap<ActorId, usize>,
    trackers: BTreeMap<usize, RestartTracker>,
    /// Copies whose death this rank already reported (killed after a probe).
    reported: BTreeSet<usize>,
    cur: Option<Attempt>,
    early: Vec<(u64, u32, Arrival, Vec<f32>)>,
}

impl GpuActor {
    async fn spawn_stage(
        myself: &ActorRef<GpuMsg>,
        st: &mut GpuState,
        copy: usize,
    ) -> Result<(), ActorProcessingErr> {
        let args = StageArgs {
            ctx: st.ctx.clone(),
            rank: st.rank,
            copy,
            parent: myself.clone(),
        };
        let (r, _) = Actor::spawn_linked(None, StageActor, args, myself.get_cell()).await?;
        st.ids.insert(r.get_id(), copy);
        st.stages.insert(copy, r);
        Ok(())
    }

    async fn maybe_fail(st: &GpuState, step: u64, phase: Phase) {
        if let Some(kind) = st.ctx.faults.take(step, phase, Target::Gpu, st.rank) {
            let what = format!("gpu rank {} at step {step}, phase {phase:?}", st.rank);
            fire(kind, what).await;
        }
    }

    /// Feeds executor events until the rank waits for a stage or a peer.
    async fn feed(st: &mut GpuState, first: ExecEvent) -> Result<(), ActorProcessingErr> {
        let mut events = VecDeque::from([first]);
        while let Some(ev) = events.pop_front() {
            let Some(cur) = st.cur.as_mut() else {
                return Ok(());
            };
            let cmds = cur.ex.on(ev);
            for cmd in cmds {
                match cmd {
                    ExecCommand::Run(instr) => {
                        let step = st.cur.as_ref().map_or(0, |c| c.step);
                        for phase in gpu_phases(&instr) {
                            GpuActor::maybe_fail(st, step, phase).await;
                        }
                        let cur = st.cur.as_mut().ok_or("attempt vanished")?;
                        let schedule = &st.ctx.schedule;
                        let ops = ops_of(schedule, instr, &mut cur.inbox)?;
                        cur.inflight = Some(InFlight {
                            instr,
                            queue: ops.into(),
                        });
                        GpuActor::dispatch_next(st);
                    }
                    ExecCommand::Send { to, arrival } => {
                        let cur = st.cur.as_mut().ok_or("attempt vanished")?;
                        let x = cur
                            .outbox
                            .remove(&arrival)
                            .ok_or_else(|| format!("nothing to send for {arrival:?}"))?;
                        if to == st.rank {
                            cur.inbox.insert(arrival, x);
                            events.push_back(ExecEvent::Arrived(arrival));
                        } else if let Some(peer) = st.ctx.gpu(to) {
                            let data = st.ctx.wire.transmit(arrival, x, st.ctx.hidden);
                            // A peer that is down loses the message; the step is replayed.
                            let _ = peer.cast(GpuMsg::Deliver {
                                step: cur.step,
                                attempt: cur.attempt,
                                arrival,
                                data,
                            });
                        }
                    }
                    ExecCommand::Finished => {
                        let cur = st.cur.as_mut().ok_or("attempt vanished")?;
                        for (&copy, s) in &st.stages {
                            cur.waiting_on.insert(copy);
                            let _ = s.cast(StageMsg::TakeGrads {
                                step: cur.step,
                                attempt: cur.attempt,
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn dispatch_next(st: &mut GpuState) {
        let Some(cur) = st.cur.as_mut() else { return };
        let Some(inf) = cur.inflight.as_mut() else {
            return;
        };
        if let Some((copy, op)) = inf.queue.pop_front() {
            cur.waiting_on.insert(copy);
            if let Some(s) = st.stages.get(&copy) {
                let _ = s.cast(StageMsg::Op {
                    step: cur.step,
                    attempt: cur.attempt,
                    op,
                    batches: cur.batches.clone(),
                });
            }
        }
    }

    fn current(st: &GpuState, step: u64, attempt: u32) -> bool {
        st.cur
            .as_ref()
            .is_some_and(|c| c.step == step && c.attempt == attempt)
    }
}

/// The phases at which a GpuActor fault can fire when it dispatches `instr`.
fn gpu_phases(instr: &Instr) -> Vec<Phase> {
    match instr {
        Instr::F { .. } => vec![Phase::Forward],
        Instr::B { .. } => vec![Phase::Backward, Phase::Weight],
        Instr::BInput { .. } => vec![Phase::Backward],
        Instr::W { .. } => vec![Phase::Weight],
        Instr::FB { .. } => vec![Phase::Forward, Phase::Backward, Phase::Weight],
    }
}

impl Actor for GpuActor {
    type Msg = GpuMsg;
    type State = GpuState;
    type Arguments = GpuArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GpuMsg>,
        a: GpuArgs,
    ) -> Result<GpuState, ActorProcessingErr> {
        let mut st = GpuState {
            ctx: a.ctx.clone(),
            rank: a.rank,
            stages: BTreeMap::new(),
            ids: BTreeMap::new(),
            trackers: BTreeMap::new(),
            reported: BTreeSet::new(),
            cur: None,
            early: Vec::new(),
        };
        for copy in a.ctx.schedule.stages_on(a.rank) {
            GpuActor::spawn_stage(&myself, &mut st, copy).await?;
        }
        Ok(st)
    }

    async fn post_start(
        &self,
        _myself: ActorRef<GpuMsg>,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        st.ctx.to_coord(CoordMsg::RankUp { rank: st.rank });
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<GpuMsg>,
        msg: GpuMsg,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GpuMsg::Open {
                step,
                attempt,
                batches,
                restore,
            } => {
                for s in st.stages.values() {
                    let _ = s.cast(StageMsg::Reset {
                        restore: restore.clone(),
                    });
                }
                st.cur = Some(Attempt {
                    step,
                    attempt,
                    batches,
                    ex: RankExecutor::new(&st.ctx.schedule, st.rank),
                    inbox: BTreeMap::new(),
                    outbox: BTreeMap::new(),
                    stats: Vec::new(),
                    inflight: None,
                    grads: Vec::new(),
                    waiting_on: BTreeSet::new(),
                });
                let early = std::mem::take(&mut st.early);
                let mut arrived = Vec::new();
                for (s, a, arrival, data) in early {
                    if (s, a) == (step, attempt) {
                        if let Some(cur) = st.cur.as_mut() {
                            cur.inbox.insert(arrival, data);
                        }
                        arrived.push(arrival);
                    } else if (s, a) > (step, attempt) {
                        st.early.push((s, a, arrival, data));
                    }
                }
                GpuActor::feed(st, ExecEvent::Start).await?;
                for a in arrived {
                    GpuActor::feed(st, ExecEvent::Arrived(a)).await?;
                }
            }
            GpuMsg::Deliver {
                step,
                attempt,
                arrival,
                data,
            } => {
                if GpuActor::current(st, step, attempt) {
                    if let Some(cur) = st.cur.as_mut() {
                        cur.inbox.insert(arrival, data);
                    }
                    GpuActor::feed(st, ExecEvent::Arrived(arrival)).await?;
                } else if st
                    .cur
                    .as_ref()
                    .is_none_or(|c| (step, attempt) > (c.step, c.attempt))
                {
                    st.early.push((step, attempt, arrival, data));
                }
            }
            GpuMsg::OpDone {
                copy,
                step,
                attempt,
                mb,
                mut result,
            } => {
                if !GpuActor::current(st, step, attempt) {
                    return Ok(());
                }
                let cur = st.cur.as_mut().ok_or("attempt vanished")?;
                cur.waiting_on.remove(&copy);
                if let StageOpResult::Forward { stats, .. } = &mut result {
                    let model_stage = st.ctx.schedule.stages[copy].model_stage;
                    cur.stats.push((mb, model_stage, std::mem::take(stats)));
                }
                if let Some((a, x)) = route_of(&st.ctx.schedule, copy, mb, &mut result) {
                    cur.outbox.insert(a, x);
                }
                let more = cur.inflight.as_ref().is_some_and(|f| !f.queue.is_empty());
                if more {
                    GpuActor::dispatch_next(st);
                } else if let Some(f) = cur.inflight.take() {
                    GpuActor::feed(st, ExecEvent::Completed(f.instr)).await?;
                }
            }
            GpuMsg::StageGrads {
                copy,
                step,
                attempt,
                grads,
            } => {
                if !GpuActor::current(st, step, attempt) {
                    return Ok(());
                }
                let cur = st.cur.as_mut().ok_or("attempt vanished")?;
                cur.waiting_on.remove(&copy);
                cur.grads.push((copy, grads));
                if cur.grads.len() == st.stages.len() && cur.waiting_on.is_empty() {
                    let grads = std::mem::take(&mut cur.grads);
                    let stats = std::mem::take(&mut cur.stats);
                    st.ctx.to_coord(CoordMsg::Done {
                        rank: st.rank,
                        step,
                        attempt,
                        grads,
                        stats,
                    });
                }
            }
            GpuMsg::Install {
                step,
                attempt,
                params,
            } => {
                if !GpuActor::current(st, step, attempt) {
                    return Ok(());
                }
                GpuActor::maybe_fail(st, step, Phase::Optimizer).await;
                let cur = st.cur.as_mut().ok_or("attempt vanished")?;
                for (&copy, s) in &st.stages {
                    cur.waiting_on.insert(copy);
                    let _ = s.cast(StageMsg::Install {
                        step,
                        attempt,
                        params: params.clone(),
                    });
                }
            }
            GpuMsg::StageInstalled {
                copy,
                step,
                attempt,
            } => {
                if !GpuActor::current(st, step, attempt) {
                    return Ok(());
                }
                let cur = st.cur.as_mut().ok_or("attempt vanished")?;
                cur.waiting_on.remove(&copy);
                if cur.waiting_on.is_empty() {
                    st.ctx.to_coord(CoordMsg::Installed {
                        rank: st.rank,
                        step,
                        attempt,
                    });
                    st.cur = None;
                }
            }
            GpuMsg::Abort { step, attempt } => {
                if GpuActor::current(st, step, attempt) {
                    st.cur = None;
                }
            }
            GpuMsg::Probe { step, attempt } => {
                let busy: Vec<usize> = match st.cur.as_ref() {
                    Some(c) if c.step == step && c.attempt == attempt => {
                        c.waiting_on.iter().copied().collect()
                    }
                    _ => Vec::new(),
                };
                for copy in busy {
                    if let Some(s) = st.stages.get(&copy) {
                        if st.reported.insert(copy) {
                            st.ctx.to_coord(CoordMsg::RankDown {
                                rank: st.rank,
                                reason: format!(
                                    "stage copy s{copy} on rank {} did not answer before the step timeout",
                                    st.rank
                                ),
                            });
                        }
                        s.kill();
                    }
                }
                st.ctx.to_coord(CoordMsg::ProbeAck {
                    rank: st.rank,
                    step,
                    attempt,
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<GpuMsg>,
        evt: SupervisionEvent,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, what)) = is_child_event(&evt) else {
            return Ok(());
        };
        let Some(copy) = st.ids.remove(&id) else {
            return Ok(());
        };
        if st.ctx.stopping() {
            return Ok(());
        }
        st.stages.remove(&copy);
        st.cur = None;
        if !st.reported.remove(&copy) {
            st.ctx.to_coord(CoordMsg::RankDown {
                rank: st.rank,
                reason: format!("stage copy s{copy} on rank {} {what}", st.rank),
            });
        }
        let policy = st.ctx.policy;
        let decision = st
            .trackers
            .entry(copy)
            .or_insert_with(|| RestartTracker::new(policy))
            .on_failure(st.ctx.now_ms());
        match decision {
            RestartDecision::Restart { after_ms, restart } => {
                tracing::warn!(rank = st.rank, copy, restart, "restarting stage actor: {what}");
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                GpuActor::spawn_stage(&myself, st, copy).await?;
                st.ctx.to_coord(CoordMsg::RankUp { rank: st.rank });
                Ok(())
            }
            RestartDecision::Escalate { restarts_in_window } => Err(format!(
                "stage copy s{copy} on rank {} failed {restarts_in_window} times inside the restart window",
                st.rank
            )
            .into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NodeSupervisor

/// Supervises the GpuActors of this process.
pub struct NodeSupervisor;

pub struct NodeState {
    ctx: Arc<Ctx>,
    ids: BTreeMap<ActorId, usize>,
    trackers: BTreeMap<usize, RestartTracker>,
}

impl NodeSupervisor {
    async fn spawn_gpu(
        myself: &ActorRef<()>,
        st: &mut NodeState,
        rank: usize,
    ) -> Result<(), ActorProcessingErr> {
        let args = GpuArgs {
            ctx: st.ctx.clone(),
            rank,
        };
        let name = st.ctx.gpu_name(rank);
        let (r, _) = Actor::spawn_linked(Some(name), GpuActor, args, myself.get_cell()).await?;
        st.ids.insert(r.get_id(), rank);
        Ok(())
    }
}

impl Actor for NodeSupervisor {
    type Msg = ();
    type State = NodeState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        ctx: Arc<Ctx>,
    ) -> Result<NodeState, ActorProcessingErr> {
        let mut st = NodeState {
            ctx: ctx.clone(),
            ids: BTreeMap::new(),
            trackers: BTreeMap::new(),
        };
        for rank in 0..ctx.schedule.ranks {
            NodeSupervisor::spawn_gpu(&myself, &mut st, rank).await?;
        }
        Ok(st)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        evt: SupervisionEvent,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, what)) = is_child_event(&evt) else {
            return Ok(());
        };
        let Some(rank) = st.ids.remove(&id) else {
            return Ok(());
        };
        if st.ctx.stopping() {
            return Ok(());
        }
        st.ctx.to_coord(CoordMsg::RankDown {
            rank,
            reason: format!("gpu actor of rank {rank} {what}"),
        });
        let policy = st.ctx.policy;
        let decision = st
            .trackers
            .entry(rank)
            .or_insert_with(|| RestartTracker::new(policy))
            .on_failure(st.ctx.now_ms());
        match decision {
            RestartDecision::Restart { after_ms, restart } => {
                tracing::warn!(rank, restart, "restarting gpu actor: {what}");
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                NodeSupervisor::spawn_gpu(&myself, st, rank).await
            }
            RestartDecision::Escalate { restarts_in_window } => Err(format!(
                "gpu actor of rank {rank} failed {restarts_in_window} times inside the restart window"
            )
            .into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DataLoader

/// Messages of the [`DataLoader`].
pub enum DataMsg {
    /// The micro-batches of a step (a replay asks again and gets the same ones).
    Get {
        step: u64,
        reply: RpcReplyPort<Result<Arc<Vec<Batch>>, String>>,
    },
}

/// Serves each step's micro-batches from the dataset: a pure function of (seed, step).
pub struct DataLoader;

#[derive(Clone)]
pub struct DataArgs {
    data: Arc<Dataset>,
    seed: u64,
    batch: usize,
    seq: usize,
    microbatches: usize,
}

impl Actor for DataLoader {
    type Msg = DataMsg;
    type State = (DataArgs, Option<(u64, Arc<Vec<Batch>>)>);
    type Arguments = DataArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DataMsg>,
        a: DataArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((a, None))
    }

    async fn handle(
        &self,
        _myself: ActorRef<DataMsg>,
        msg: DataMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let DataMsg::Get { step, reply } = msg;
        let (a, cache) = st;
        if let Some((s, b)) = cache.as_ref()
            && *s == step
        {
            let _ = reply.send(Ok(b.clone()));
            return Ok(());
        }
        let r = trainer::microbatches(&a.data, a.seed, step, a.batch, a.seq, a.microbatches)
            .map(Arc::new)
            .map_err(|e| format!("{e:#}"));
        if let Ok(b) = &r {
            *cache = Some((step, b.clone()));
        }
        let _ = reply.send(r);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinator

/// What the coordinator answers for a committed step.
pub struct StepReply {
    pub state: Box<TrainState>,
    pub out: StepOutput,
    pub restarts: u64,
    pub replayed_steps: u64,
}

type RankGrads = Vec<(usize, BTreeMap<usize, MbGrads>)>;

/// Messages of the [`Coordinator`].
pub enum CoordMsg {
    /// Run one step on the committed state `state` (the snapshot a failure rolls back to).
    RunStep {
        step: u64,
        state: Box<TrainState>,
        hyper: StepHyper,
        reply: RpcReplyPort<Result<StepReply, String>>,
    },
    Done {
        rank: usize,
        step: u64,
        attempt: u32,
        grads: RankGrads,
        stats: RankStats,
    },
    Installed {
        rank: usize,
        step: u64,
        attempt: u32,
    },
    /// A rank lost an actor (it is being restarted).
    RankDown {
        rank: usize,
        reason: String,
    },
    /// A rank is complete again.
    RankUp {
        rank: usize,
    },
    Timeout {
        step: u64,
        attempt: u32,
    },
    ProbeAck {
        rank: usize,
        step: u64,
        attempt: u32,
    },
    ProbeDeadline {
        step: u64,
        attempt: u32,
    },
}

struct Job {
    snapshot: Box<TrainState>,
    restore: Option<Arc<ParamStore>>,
    hyper: StepHyper,
    reply: Option<RpcReplyPort<Result<StepReply, String>>>,
    batches: Arc<Vec<Batch>>,
    done: BTreeMap<usize, (RankGrads, RankStats)>,
    work: Option<Box<TrainState>>,
    out: Option<StepOutput>,
}

impl Job {
    fn restore_params(&mut self) -> Arc<ParamStore> {
        self.restore
            .get_or_insert_with(|| Arc::new(self.snapshot.model.params.clone()))
            .clone()
    }

    fn fail(&mut self, reason: String) {
        if let Some(r) = self.reply.take() {
            let _ = r.send(Err(reason));
        }
    }
}

/// The root: runs step transactions and heals failures by replay.
pub struct Coordinator;

pub struct CoordArgs {
    ctx: Arc<Ctx>,
    data: DataArgs,
    /// Steps committed before this formation started (a resumed run).
    committed: u64,
}

pub struct CoordState {
    ctx: Arc<Ctx>,
    data_args: DataArgs,
    txn: StepTxn,
    meta: Arc<Vec<Stage>>,
    loader: Option<ActorRef<DataMsg>>,
    node: Option<ActorRef<()>>,
    down: BTreeSet<usize>,
    restore_next: bool,
    restarts: u64,
    job: Option<Job>,
    pending_open: Option<(u64, u32)>,
    attempt_started: Instant,
    slowest: Duration,
    probe_acks: BTreeSet<usize>,
}

impl Coordinator {
    fn ranks(st: &CoordState) -> usize {
        st.ctx.schedule.ranks
    }

    fn timeout(st: &CoordState) -> Duration {
        st.ctx.step_timeout.unwrap_or(if st.slowest.is_zero() {
            Duration::from_secs(120)
        } else {
            (st.slowest * 10).max(Duration::from_secs(5))
        })
    }

    fn is_current(st: &CoordState, step: u64, attempt: u32) -> bool {
        st.txn.is_open() && st.txn.step() == step && st.txn.attempt() == attempt
    }

    fn open_now(myself: &ActorRef<CoordMsg>, st: &mut CoordState, step: u64, attempt: u32) {
        let restore_next = std::mem::take(&mut st.restore_next);
        let Some(job) = st.job.as_mut() else { return };
        let restore = (attempt > 0 || restore_next).then(|| job.restore_params());
        if attempt > 0 {
            tracing::warn!(step, attempt, "replaying step");
        }
        for r in 0..st.ctx.schedule.ranks {
            if let Some(g) = st.ctx.gpu(r) {
                let _ = g.cast(GpuMsg::Open {
                    step,
                    attempt,
                    batches: job.batches.clone(),
                    restore: restore.clone(),
                });
            }
        }
        st.attempt_started = Instant::now();
        let t = Coordinator::timeout(st);
        ractor::time::send_after(t, myself.get_cell(), move || CoordMsg::Timeout {
            step,
            attempt,
        });
    }

    fn broadcast(st: &CoordState, f: impl Fn() -> GpuMsg) {
        for r in 0..Coordinator::ranks(st) {
            if let Some(g) = st.ctx.gpu(r) {
                let _ = g.cast(f());
            }
        }
    }

    /// Carries out transaction commands (and the events they cause) in order.
    async fn exec(
        myself: &ActorRef<CoordMsg>,
        st: &mut CoordState,
        first: Vec<TxnCommand>,
    ) -> Result<(), ActorProcessingErr> {
        let mut cmds: VecDeque<TxnCommand> = first.into();
        while let Some(cmd) = cmds.pop_front() {
            match cmd {
                TxnCommand::Open { step, attempt } | TxnCommand::Replay { step, attempt } => {
                    if st.down.is_empty() {
                        Coordinator::open_now(myself, st, step, attempt);
                    } else {
                        st.pending_open = Some((step, attempt));
                    }
                }
                TxnCommand::Reduce { step, attempt } => {
                    let Some(job) = st.job.as_mut() else { continue };
                    let done = std::mem::take(&mut job.done);
                    let mut work = job.snapshot.clone();
                    let meta = st.meta.clone();
                    let schedule = st.ctx.schedule.clone();
                    let hyper = job.hyper;
                    let r = tokio::task::spawn_blocking(move || {
                        let r = reduce_and_apply(&mut work, &meta, &schedule, done, step, &hyper);
                        (work, r)
                    })
                    .await?;
                    match r {
                        (work, Ok(out)) => {
                            job.work = Some(work);
                            job.out = Some(out);
                            cmds.extend(st.txn.on(TxnEvent::Reduced { step, attempt }));
                        }
                        (_, Err(e)) => {
                            job.fail(format!("{e:#}"));
                            st.job = None;
                            return Ok(());
                        }
                    }
                }
                TxnCommand::Install { step, attempt } => {
                    let Some(work) = st.job.as_ref().and_then(|j| j.work.as_ref()) else {
                        continue;
                    };
                    let params = Arc::new(work.model.params.clone());
                    Coordinator::broadcast(st, || GpuMsg::Install {
                        step,
                        attempt,
                        params: params.clone(),
                    });
                }
                TxnCommand::Commit { step, attempts } => {
                    st.slowest = st.slowest.max(st.attempt_started.elapsed());
                    let Some(mut job) = st.job.take() else {
                        continue;
                    };
                    tracing::debug!(step, attempts, "step committed");
                    let (Some(work), Some(out)) = (job.work.take(), job.out.take()) else {
                        job.fail(format!("step {step} committed without a result"));
                        continue;
                    };
                    if let Some(r) = job.reply.take() {
                        let _ = r.send(Ok(StepReply {
                            state: work,
                            out,
                            restarts: st.restarts,
                            replayed_steps: st.txn.replayed_steps,
                        }));
                    }
                }
                TxnCommand::Abort {
                    step,
                    attempt,
                    reason,
                } => {
                    tracing::warn!(step, attempt, "aborting step: {reason}");
                    if let Some(job) = st.job.as_mut() {
                        job.done.clear();
                        job.work = None;
                        job.out = None;
                    }
                    st.probe_acks.clear();
                    Coordinator::broadcast(st, || GpuMsg::Abort { step, attempt });
                }
                TxnCommand::GiveUp { step, reason } => {
                    if let Some(mut job) = st.job.take() {
                        job.fail(format!("step {step}: {reason}"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The step's reduce: per-micro-batch gradients of every stage copy summed in micro-batch order
/// into `state.grads`, averaged, then clipping, AdamW and the bias update.
fn reduce_and_apply(
    state: &mut TrainState,
    meta: &[Stage],
    schedule: &Schedule,
    done: BTreeMap<usize, (RankGrads, RankStats)>,
    step: u64,
    h: &StepHyper,
) -> Result<StepOutput> {
    let m = schedule.microbatches;
    let mut parts = Vec::new();
    let mut stats = Vec::new();
    for (_, (grads, st)) in done {
        stats.extend(st);
        for (copy, g) in grads {
            let stage = &meta[schedule.stages[copy].model_stage];
            parts.push(StageGrads { stage, grads: g });
        }
    }
    state.grads.iter_mut().for_each(|g| g.zero_());
    reduce(&mut state.grads, &state.model.params, parts, m).map_err(anyhow::Error::msg)?;
    scale_for_microbatches(&mut state.grads, m);
    let per = combine_stage_stats(stats, m, schedule.kind.model_stages(schedule.ranks))
        .map_err(anyhow::Error::msg)?;
    trainer::finish_step(state, step, combine_microbatch_stats(per), h)
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
        let meta_ctx = ctx.clone();
        let meta = tokio::task::spawn_blocking(move || {
            let n = meta_ctx.ranges.len();
            (0..n)
                .map(|s| Stage::from_model(&meta_ctx.template, &meta_ctx.ranges, s))
                .collect::<Vec<_>>()
        })
        .await?;
        let (loader, _) =
            Actor::spawn_linked(None, DataLoader, a.data.clone(), myself.get_cell()).await?;
        let ranks = ctx.schedule.ranks;
        let mut st = CoordState {
            ctx: ctx.clone(),
            data_args: a.data,
            txn: StepTxn::new(ranks, MAX_ATTEMPTS).after(a.committed),
            meta: Arc::new(meta),
            loader: Some(loader),
            node: None,
            down: (0..ranks).collect(),
            restore_next: false,
            restarts: 0,
            job: None,
            pending_open: None,
            attempt_started: Instant::now(),
            slowest: Duration::ZERO,
            probe_acks: BTreeSet::new(),
        };
        let (node, _) =
            Actor::spawn_linked(None, NodeSupervisor, ctx.clone(), myself.get_cell()).await?;
        st.node = Some(node);
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<CoordMsg>,
        msg: CoordMsg,
        st: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordMsg::RunStep {
                step,
                state,
                hyper,
                reply,
            } => {
                let Some(loader) = st.loader.clone() else {
                    let _ = reply.send(Err("the data loader is down".into()));
                    return Ok(());
                };
                let batches = match loader.call(|r| DataMsg::Get { step, reply: r }, None).await {
                    Ok(CallResult::Success(Ok(b))) => b,
                    Ok(CallResult::Success(Err(e))) => {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                    _ => {
                        let _ =
                            reply.send(Err(format!("step {step}: the data loader did not answer")));
                        return Ok(());
                    }
                };
                st.job = Some(Job {
                    snapshot: state,
                    restore: None,
                    hyper,
                    reply: Some(reply),
                    batches,
                    done: BTreeMap::new(),
                    work: None,
                    out: None,
                });
                let cmds = st.txn.on(TxnEvent::Begin { step });
                Coordinator::exec(&myself, st, cmds).await?;
            }
            CoordMsg::Done {
                rank,
                step,
                attempt,
                grads,
                stats,
            } => {
                if !Coordinator::is_current(st, step, attempt) {
                    return Ok(());
                }
                if let Some(job) = st.job.as_mut() {
                    job.done.insert(rank, (grads, stats));
                }
                let cmds = st.txn.on(TxnEvent::Done {
                    participant: rank,
                    step,
                    attempt,
                });
                Coordinator::exec(&myself, st, cmds).await?;
            }
            CoordMsg::Installed {
                rank,
                step,
                attempt,
            } => {
                let cmds = st.txn.on(TxnEvent::Installed {
                    participant: rank,
                    step,
                    attempt,
                });
                Coordinator::exec(&myself, st, cmds).await?;
            }
            CoordMsg::RankDown { rank, reason } => {
                st.restarts += 1;
                st.restore_next = true;
                tracing::warn!(rank, "rank down: {reason}");
                let newly = st.down.insert(rank);
                if newly && st.txn.is_open() {
                    let (step, attempt) = (st.txn.step(), st.txn.attempt());
                    let cmds = st.txn.on(TxnEvent::Failed {
                        step,
                        attempt,
                        reason,
                    });
                    Coordinator::exec(&myself, st, cmds).await?;
                }
            }
            CoordMsg::RankUp { rank } => {
                st.down.remove(&rank);
                if st.down.is_empty()
                    && let Some((step, attempt)) = st.pending_open.take()
                    && Coordinator::is_current(st, step, attempt)
                {
                    Coordinator::open_now(&myself, st, step, attempt);
                }
            }
            CoordMsg::Timeout { step, attempt } => {
                if !Coordinator::is_current(st, step, attempt) || st.pending_open.is_some() {
                    return Ok(());
                }
                tracing::warn!(step, attempt, "step timed out; probing the ranks");
                st.probe_acks.clear();
                Coordinator::broadcast(st, || GpuMsg::Probe { step, attempt });
                ractor::time::send_after(PROBE_GRACE, myself.get_cell(), move || {
                    CoordMsg::ProbeDeadline { step, attempt }
                });
            }
            CoordMsg::ProbeAck {
                rank,
                step,
                attempt,
            } => {
                if Coordinator::is_current(st, step, attempt) {
                    st.probe_acks.insert(rank);
                }
            }
            CoordMsg::ProbeDeadline { step, attempt } => {
                if !Coordinator::is_current(st, step, attempt) {
                    return Ok(());
                }
                for r in 0..Coordinator::ranks(st) {
                    if !st.probe_acks.contains(&r) && !st.down.contains(&r) {
                        tracing::warn!(rank = r, "rank did not answer the probe; killing it");
                        if let Some(g) = st.ctx.gpu(r) {
                            g.kill();
                        }
                        st.down.insert(r);
                    }
                }
                let cmds = st.txn.on(TxnEvent::TimedOut { step, attempt });
                Coordinator::exec(&myself, st, cmds).await?;
            }
        }
        Ok(())
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
        if st.loader.as_ref().is_some_and(|l| l.get_id() == id) {
            tracing::warn!("data loader {what}; restarting it");
            let (loader, _) =
                Actor::spawn_linked(None, DataLoader, st.data_args.clone(), myself.get_cell())
                    .await?;
            st.loader = Some(loader);
        } else if st.node.as_ref().is_some_and(|n| n.get_id() == id) {
            tracing::warn!("node supervisor {what}; restarting it");
            st.restarts += 1;
            st.restore_next = true;
            st.down = (0..Coordinator::ranks(st)).collect();
            if st.txn.is_open() {
                let (step, attempt) = (st.txn.step(), st.txn.attempt());
                let cmds = st.txn.on(TxnEvent::Failed {
                    step,
                    attempt,
                    reason: format!("node supervisor {what}"),
                });
                Coordinator::exec(&myself, st, cmds).await?;
            }
            let (node, _) =
                Actor::spawn_linked(None, NodeSupervisor, st.ctx.clone(), myself.get_cell())
                    .await?;
            st.node = Some(node);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The engine

/// Everything a formation needs besides the model.
pub struct FormationSpec {
    pub schedule: Schedule,
    pub wire: Wire,
    /// Expert groups per stage copy (`--ep`); 1 runs the experts inside the stage.
    pub ep: usize,
    pub mtp_weight: f32,
    pub faults: FaultBook,
    pub policy: RestartPolicy,
    pub step_timeout: Option<Duration>,
    pub data: Arc<Dataset>,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
    /// Steps already committed (a resumed run): the first step is `committed + 1`.
    pub committed: u64,
}

/// The actor formation as a training-loop engine: each step is one `RunStep` call to the
/// coordinator, which returns once the step is committed (after any number of replays).
pub struct ActorEngine {
    rt: tokio::runtime::Runtime,
    ctx: Arc<Ctx>,
    coord: ActorRef<CoordMsg>,
    handle: Option<tokio::task::JoinHandle<()>>,
    restarts: u64,
    replayed: u64,
}

impl ActorEngine {
    /// Starts the supervision tree for `model` cut as `spec.schedule` says.
    pub fn start(model: &DeepSeekV3, spec: FormationSpec) -> Result<ActorEngine> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let id = FORMATIONS.fetch_add(1, Ordering::SeqCst);
        let stages = spec.schedule.kind.model_stages(spec.schedule.ranks);
        let ctx = Arc::new(Ctx {
            prefix: format!("phalanx-{}-{id}-", std::process::id()),
            ranges: kernels::model::stage::partition(model.cfg.num_hidden_layers, stages),
            schedule: spec.schedule,
            template: Arc::new(model.clone()),
            mtp_weight: spec.mtp_weight,
            wire: spec.wire,
            ep: spec.ep.max(1),
            hidden: model.cfg.hidden_size,
            faults: spec.faults,
            policy: spec.policy,
            epoch: Instant::now(),
            step_timeout: spec.step_timeout,
            stopping: AtomicBool::new(false),
        });
        let args = CoordArgs {
            ctx: ctx.clone(),
            data: DataArgs {
                data: spec.data,
                seed: spec.seed,
                batch: spec.batch,
                seq: spec.seq,
                microbatches: ctx.schedule.microbatches,
            },
            committed: spec.committed,
        };
        let name = format!("{}coordinator", ctx.prefix);
        let (coord, handle) = rt
            .block_on(Actor::spawn(Some(name), Coordinator, args))
            .map_err(|e| anyhow!("cannot start the coordinator: {e}"))?;
        Ok(ActorEngine {
            rt,
            ctx,
            coord,
            handle: Some(handle),
            restarts: 0,
            replayed: 0,
        })
    }

    /// Faults of the plan that never fired.
    pub fn unfired_faults(&self) -> Vec<super::inject::Fault> {
        self.ctx.faults.unfired()
    }

    /// Stops the tree and waits for it.
    pub fn shutdown(&mut self) {
        self.ctx.stopping.store(true, Ordering::SeqCst);
        self.coord.stop(None);
        if let Some(h) = self.handle.take() {
            let _ = self.rt.block_on(h);
        }
    }
}

impl Drop for ActorEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl StepEngine for ActorEngine {
    fn step(
        &mut self,
        state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        let hyper = *h;
        let state = Box::new(state);
        let call = self.coord.call(
            move |reply| CoordMsg::RunStep {
                step,
                state,
                hyper,
                reply,
            },
            None,
        );
        let r = self
            .rt
            .block_on(call)
            .map_err(|e| anyhow!("step {step}: the coordinator is gone: {e}"))?;
        match r {
            CallResult::Success(Ok(reply)) => {
                self.restarts = reply.restarts;
                self.replayed = reply.replayed_steps;
                Ok((*reply.state, reply.out))
            }
            CallResult::Success(Err(e)) => Err(anyhow!("{e}")),
            CallResult::Timeout | CallResult::SenderError => Err(anyhow!(
                "step {step}: the coordinator stopped before committing it"
            )),
        }
    }

    fn restarts(&self) -> u64 {
        self.restarts
    }

    fn replayed_steps(&self) -> u64 {
        self.replayed
    }
}

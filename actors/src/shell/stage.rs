//! The StageActor: one stage copy on one rank (parameters, activation stash, queued W, gradients).
//! It computes on the blocking pool, answers its GpuActor, and supervises its expert groups (a
//! failed group fails the stage, which its GpuActor restarts). The first copy of each model
//! stage owns that stage's update: it reduces its tensors' gradients from every copy's sums,
//! reports their square sums for the global norm, and runs AdamW and the bias update on them
//! once the coordinator sends the clip factor.

use super::expert_group::{ExpertArgs, ExpertGroupActor, ExpertLine, RemoteExperts};
use super::payload::PayloadKey;
use super::protocol::{ApplyArgs, CoordMsg, CopyGrads, ExpertAnswer, ExpertMsg, GpuMsg, StageMsg};
use super::{Ctx, fire, is_child_event, straggle};
use crate::core::ops::StageOp;
use crate::formation::compute::exec_op;
use crate::inject::{Fault, FaultKind, Phase, Target};
use crate::state::{TensorUpdates, TrainState, updates_by_id};
use kernels::model::Batch;
use kernels::model::stage::{
    GradSums, Stage, StageGrads, StageRunner, reduce_stage, scale_for_microbatches,
};
use kernels::tensor::Tensor;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a stage waits for an expert group to acknowledge a reset or an install.
const EXPERT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One stage copy on one rank.
pub struct StageActor;

pub struct StageArgs {
    pub ctx: Arc<Ctx>,
    pub rank: usize,
    pub copy: usize,
    pub parent: ActorRef<GpuMsg>,
    /// Bumped whenever the stage makes progress (its parent's failure detector reads it).
    pub progress: Arc<AtomicU64>,
}

pub struct StageState {
    ctx: Arc<Ctx>,
    rank: usize,
    copy: usize,
    parent: ActorRef<GpuMsg>,
    runner: Option<StageRunner>,
    /// The line to its ExpertGroupActors under `--ep` > 1 (children), and the step they serve.
    experts: Option<Arc<ExpertLine>>,
    step: Arc<AtomicU64>,
    progress: Arc<AtomicU64>,
    /// Why an expert answer of the running op was refused (see `RemoteExperts`).
    lost: Arc<std::sync::Mutex<Option<String>>>,
    /// The gradients this owner copy reduced for (step, attempt), until it applies them.
    pending: Option<(u64, u32, Grads)>,
}

/// Gradients by whole-model tensor id.
type Grads = Vec<(usize, Tensor)>;

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

    /// Sends `msg(call)` to every expert group and waits for each to acknowledge.
    async fn to_groups(
        &self,
        msg: impl Fn(u64) -> ExpertMsg + Send + 'static,
    ) -> Result<(), ActorProcessingErr> {
        let Some(line) = self.experts.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            for g in 0..line.groups.len() {
                match line.call(g, &msg, EXPERT_CALL_TIMEOUT) {
                    Ok(ExpertAnswer::Ack) => {}
                    _ => return Err(format!("expert group {g} did not acknowledge")),
                }
            }
            Ok(())
        })
        .await?
        .map_err(ActorProcessingErr::from)
    }

    /// The value under `key` in the payload store (`what` names it when it is gone).
    fn payload<T: std::any::Any + Send + Sync>(
        &self,
        key: PayloadKey,
        what: &str,
    ) -> Result<Arc<T>, ActorProcessingErr> {
        self.ctx
            .payloads
            .get::<T>(key)
            .ok_or_else(|| self.gone(what))
    }

    /// The error of a payload that is gone (`what` names it).
    fn gone(&self, what: &str) -> ActorProcessingErr {
        format!(
            "stage copy s{} on rank {}: {what} are gone from the payload store",
            self.copy, self.rank
        )
        .into()
    }

    fn what(&self, step: u64, phase: Phase) -> String {
        format!(
            "stage copy s{} on rank {} at step {step}, phase {phase:?}",
            self.copy, self.rank
        )
    }

    /// The faults of this stage at (step, phase): a panic or hang fires now; a straggler or a
    /// message fault is returned for the shell to carry out around the work.
    async fn faults(&self, step: u64, phases: &[Phase]) -> Vec<Fault> {
        let mut later = Vec::new();
        for &phase in phases {
            while let Some(f) = self.ctx.faults.take(step, phase, Target::Stage, self.rank) {
                match f.kind {
                    FaultKind::Panic | FaultKind::Hang => {
                        fire(f, self.what(step, phase), Duration::ZERO).await
                    }
                    _ => later.push(f),
                }
            }
        }
        later
    }

    /// Sends `msg` to the parent, unless a `drop` fault eats it; `again` too under `dup`.
    fn answer(&self, faults: &[Fault], msg: GpuMsg, again: impl FnOnce() -> GpuMsg) {
        if faults.iter().any(|f| f.kind == FaultKind::Drop) {
            tracing::warn!(
                rank = self.rank,
                copy = self.copy,
                "injected drop of a stage answer"
            );
            return;
        }
        let dup = faults.iter().any(|f| f.kind == FaultKind::Dup);
        let second = dup.then(again);
        let _ = self.parent.cast(msg);
        if let Some(m) = second {
            let _ = self.parent.cast(m);
        }
    }
}

/// The fault-injection phases an op passes.
fn phases_of(op: &StageOp) -> &'static [Phase] {
    match op {
        StageOp::Forward { .. } => &[Phase::Forward],
        StageOp::BackwardInput { .. } => &[Phase::Backward],
        StageOp::Weight { .. } => &[Phase::Weight],
        StageOp::Backward { .. } => &[Phase::Backward, Phase::Weight],
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
        let rank = a.rank;
        let mut runner = tokio::task::spawn_blocking(move || {
            let model_stage = ctx.schedule.stages[copy].model_stage;
            let stage = Stage::from_model(&ctx.template, &ctx.ranges, model_stage);
            let m = ctx.schedule.microbatches;
            let mut r = StageRunner::new(stage, ctx.mtp_weight, m);
            if let Some(d) = ctx.compute.open(rank, m)? {
                r.set_device(d)?;
            }
            Ok::<_, String>(r)
        })
        .await?
        .map_err(|e| format!("stage copy s{copy} on rank {rank}: {e}"))?;
        if let Some(on) = runner.device() {
            tracing::info!(rank, copy, "stage copy computes on {on}");
        }
        let step = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(std::sync::Mutex::new(None));
        let mut experts = None;
        if a.ctx.ep > 1 {
            let mut groups = Vec::new();
            // the groups answer to this copy's inbox (a restarted copy replaces it)
            let (tx, inbox) = std::sync::mpsc::channel();
            a.ctx.book.set_expert_inbox(a.rank, copy, tx);
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
            let line = Arc::new(ExpertLine::new(groups, inbox));
            runner.set_experts(Box::new(RemoteExperts {
                line: line.clone(),
                n_experts: a.ctx.template.cfg.n_routed_experts,
                wire: a.ctx.wire,
                d: a.ctx.hidden,
                step: step.clone(),
                lost: lost.clone(),
            }));
            experts = Some(line);
        }
        Ok(StageState {
            ctx: a.ctx,
            rank: a.rank,
            copy: a.copy,
            parent: a.parent,
            runner: Some(runner),
            experts,
            step,
            progress: a.progress,
            lost,
            pending: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<StageMsg>,
        st: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(line) = &st.experts {
            line.groups.iter().for_each(|g| g.kill());
        }
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
        st.progress.fetch_add(1, Ordering::Relaxed);
        match msg {
            StageMsg::Reset { restore } => {
                if let Ok(mut l) = st.lost.lock() {
                    l.take();
                }
                st.pending = None;
                st.to_groups(move |call| ExpertMsg::Reset { call, restore })
                    .await?;
                let restore = match restore {
                    Some(k) => Some(st.payload::<TrainState>(k, "the committed state")?),
                    None => None,
                };
                st.blocking(move |r| {
                    r.reset();
                    if let Some(s) = restore {
                        r.load_from(&s.model.params);
                    }
                })
                .await?;
            }
            StageMsg::Op {
                op_id,
                step,
                attempt,
                op,
                batches,
            } => {
                let mb = op.mb();
                let batches = st.ctx.payloads.get::<Vec<Batch>>(batches);
                let batches = st.ctx.live(batches, step, attempt);
                let Some(batches) = batches.map_err(|()| st.gone("the step's micro-batches"))?
                else {
                    return Ok(());
                };
                let faults = st.faults(step, phases_of(&op)).await;
                st.step.store(step, Ordering::SeqCst);
                let started = Instant::now();
                let result = st.blocking(move |r| exec_op(r, &batches, op)).await?;
                st.progress.fetch_add(1, Ordering::Relaxed);
                let lost = st.lost.lock().ok().and_then(|mut l| l.take());
                if let Some(why) = lost {
                    // the op's result is built on a refused message: report the attempt lost
                    tracing::warn!(rank = st.rank, copy = st.copy, step, "{why}");
                    st.ctx.to_coord(CoordMsg::Lost {
                        rank: st.rank,
                        step,
                        attempt,
                        reason: format!("stage copy s{}: {why}", st.copy),
                    });
                    return Ok(());
                }
                for f in faults.iter().filter(|f| f.kind == FaultKind::Slow) {
                    tracing::warn!(
                        "injected straggler ({}x): {}",
                        f.factor(),
                        st.what(step, f.phase)
                    );
                    let extra = started.elapsed().mul_f64(f.factor() - 1.0);
                    straggle(extra, Some(&st.progress)).await;
                }
                let copy = st.copy;
                // results carry activations: copied only when a duplicate will be sent
                let again = faults
                    .iter()
                    .any(|f| f.kind == FaultKind::Dup)
                    .then(|| result.clone());
                let msg = GpuMsg::OpDone {
                    op_id,
                    copy,
                    step,
                    attempt,
                    mb,
                    result,
                };
                st.answer(&faults, msg, move || GpuMsg::OpDone {
                    op_id,
                    copy,
                    step,
                    attempt,
                    mb,
                    result: again.expect("cloned for the duplicate"),
                });
            }
            StageMsg::Install {
                step,
                attempt,
                updates,
            } => {
                st.pending = None;
                let faults = st.faults(step, &[Phase::Optimizer]).await;
                let parts = st.ctx.payloads.get_all::<TensorUpdates>(&updates);
                let parts = st.ctx.live(parts, step, attempt);
                let Some(parts) = parts.map_err(|()| st.gone("the stages' updates"))? else {
                    return Ok(());
                };
                st.to_groups(move |call| ExpertMsg::Install {
                    call,
                    step,
                    attempt,
                    updates: updates.clone(),
                })
                .await?;
                let started = Instant::now();
                st.blocking(move |r| install(r, &parts)).await?;
                for f in faults.iter().filter(|f| f.kind == FaultKind::Slow) {
                    tracing::warn!(
                        "injected straggler ({}x): {}",
                        f.factor(),
                        st.what(step, f.phase)
                    );
                    let extra = started.elapsed().mul_f64(f.factor() - 1.0);
                    straggle(extra, Some(&st.progress)).await;
                }
                let copy = st.copy;
                let msg = GpuMsg::StageInstalled {
                    copy,
                    step,
                    attempt,
                };
                st.answer(&faults, msg, move || GpuMsg::StageInstalled {
                    copy,
                    step,
                    attempt,
                });
            }
            StageMsg::TakeGrads { step, attempt } => {
                let mut sums = st.blocking(|r| r.take_grads()).await?;
                // the jobs on shared tensors go to the stage that owns them, the rest to this
                // stage's owner
                let shared = sums.split_shared().map(|g| st.ctx.payloads.put(step, g));
                let grads = CopyGrads {
                    sums: st.ctx.payloads.put(step, sums),
                    shared,
                };
                let _ = st.parent.cast(GpuMsg::StageGrads {
                    copy: st.copy,
                    step,
                    attempt,
                    grads,
                });
            }
            StageMsg::Reduce {
                step,
                attempt,
                parts,
            } => {
                let ctx = st.ctx.clone();
                let model_stage = ctx.schedule.stages[st.copy].model_stage;
                let r = tokio::task::spawn_blocking(move || reduce_owned(&ctx, model_stage, parts))
                    .await?;
                let result = r.map(|(grads, sums)| {
                    st.pending = Some((step, attempt, grads));
                    sums
                });
                st.progress.fetch_add(1, Ordering::Relaxed);
                let _ = st.parent.cast(GpuMsg::Reduced {
                    copy: st.copy,
                    step,
                    attempt,
                    result,
                });
            }
            StageMsg::Apply {
                step,
                attempt,
                update,
            } => {
                let result = match st.pending.take() {
                    Some((s, a, grads)) if (s, a) == (step, attempt) => {
                        let state =
                            st.payload::<TrainState>(update.state, "the committed state")?;
                        let ctx = st.ctx.clone();
                        let progress = st.progress.clone();
                        tokio::task::spawn_blocking(move || {
                            let updates = apply_owned(&state, grads, &update, &progress);
                            ctx.payloads.put(step, updates)
                        })
                        .await
                        .map_err(|e| format!("the update failed: {e}"))
                    }
                    _ => Err(format!(
                        "stage copy s{}: no gradients reduced for step {step} attempt {attempt}",
                        st.copy
                    )),
                };
                st.progress.fetch_add(1, Ordering::Relaxed);
                let _ = st.parent.cast(GpuMsg::Applied {
                    copy: st.copy,
                    step,
                    attempt,
                    result,
                });
            }
        }
        Ok(())
    }
}

/// The gradients of `model_stage`'s tensors from `parts` (`GradSums` by the model stage they come
/// from, taken out of the payload store), averaged over the micro-batches, and the square sums of
/// the trainable ones: the owner's share of the step's reduce.
fn reduce_owned(
    ctx: &Ctx,
    model_stage: usize,
    parts: Vec<(usize, PayloadKey)>,
) -> Result<(Grads, Vec<(usize, f64)>), String> {
    let mut sums = Vec::with_capacity(parts.len());
    for (s, k) in parts {
        let g = ctx.payloads.take::<GradSums>(k).ok_or_else(|| {
            format!("the gradient sums of a copy of stage {s} are gone from the payload store")
        })?;
        let stage = ctx.meta.get(s).ok_or(format!("no model stage {s}"))?;
        sums.push(StageGrads { stage, sums: g });
    }
    let full = &ctx.template.params;
    let m = ctx.schedule.microbatches;
    let (ids, mut grads): (Vec<usize>, Vec<Tensor>) =
        reduce_stage(full, model_stage, &mut sums, m)?
            .into_iter()
            .unzip();
    scale_for_microbatches(&mut grads, m);
    let squares = ids
        .iter()
        .zip(&grads)
        .filter(|(g, _)| full.trainable[**g])
        .map(|(&g, t)| (g, kernels::ops::adamw::square_sum(&t.data)))
        .collect();
    Ok((ids.into_iter().zip(grads).collect(), squares))
}

/// AdamW (clip factor given) and the bias update of the owner's tensors, beside the committed
/// `state`, a tensor at a time: each one is a sign of life on `progress` for the failure
/// detector (a large stage's update is long work, not a hang).
fn apply_owned(
    state: &TrainState,
    grads: Grads,
    a: &ApplyArgs,
    progress: &AtomicU64,
) -> TensorUpdates {
    let h = &a.hyper;
    let u = crate::state::Update {
        opt: &h.opt,
        lr: h.lr,
        clip: h.clip,
        gamma: h.gamma,
        loads: &a.loads,
    };
    let mut out = Vec::with_capacity(grads.len());
    for g in grads {
        out.extend(state.update_tensors(vec![g], a.factor, &u));
        progress.fetch_add(1, Ordering::Relaxed);
    }
    out
}

/// Loads the new values of every tensor the copy holds from the stages' updates.
fn install(r: &mut StageRunner, parts: &[Arc<TensorUpdates>]) {
    if parts.is_empty() {
        // the gate refused the step: the committed values stay
        return;
    }
    r.load_from(&updates_by_id(parts));
}

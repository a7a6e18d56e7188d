//! The engine around a formation: starts the supervision tree (the Root, with the Coordinator
//! and the NodeSupervisor under it), runs each step as one call to the current Coordinator, and
//! watches that Coordinator's heartbeat: one that dies, or stays silent past the bound (killed),
//! is replaced by the Root while the ranks live on, and the open step is sent to its successor.

use super::coordinator::CoordArgs;
use super::data_loader::DataArgs;
use super::payload::PayloadKey;
use super::protocol::{CoordMsg, EngineMsg, RootMsg, StepReply};
use super::root::{Root, RootArgs};
use super::{AddressBook, Ctx};
use crate::core::coordinator::TimeoutPolicy;
use crate::core::detector::DetectorPolicy;
use crate::core::supervisor::RestartPolicy;
use crate::formation::Wire;
use crate::inject::{Fault, FaultBook};
use crate::schedule::Schedule;
use crate::state::TensorUpdates;
use crate::trainer::{StepEngine, StepHyper, StepOutput, TrainState};
use anyhow::{Result, anyhow};
use kernels::model::DeepSeekV3;
use kernels::model::stage::Stage;
use ractor::{Actor, ActorRef};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use storage::dataset::Dataset;

/// Everything a formation needs besides the model.
pub struct FormationSpec {
    pub schedule: Schedule,
    pub wire: Wire,
    /// Expert groups per stage copy (`--ep`); 1 runs the experts inside the stage.
    pub ep: usize,
    pub mtp_weight: f32,
    pub faults: Arc<FaultBook>,
    pub policy: RestartPolicy,
    pub timeouts: TimeoutPolicy,
    /// The coordinator is declared dead when it has not answered a heartbeat for this long.
    pub coordinator_dead_after: Duration,
    /// The ranks' and stages' failure detectors.
    pub detector: DetectorPolicy,
    pub data: Arc<Dataset>,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
    /// Steps already committed (a resumed run): the first step is `committed + 1`.
    pub committed: u64,
    /// Where the stage copies compute (the CPU model, or a device per rank).
    pub compute: crate::formation::StagePlacement,
}

/// A running formation: its runtime-side handles.
struct Formation {
    ctx: Arc<Ctx>,
    root: ActorRef<RootMsg>,
    handle: Option<tokio::task::JoinHandle<()>>,
    /// The engine's inbox: the coordinators' answers.
    inbox: tokio::sync::mpsc::UnboundedReceiver<EngineMsg>,
}

/// The actor formation as a training-loop engine: each step is one `RunStep` call to the
/// coordinator, which returns once the step is committed (after any number of replays).
pub struct ActorEngine {
    rt: tokio::runtime::Runtime,
    spec: FormationSpec,
    formation: Option<Formation>,
    /// Restarts and replays counted by coordinators that died (each replacement adds one).
    restarts_before: u64,
    replayed_before: u64,
    /// The next step restores its committed state on every rank (after a rollback).
    reload_next: bool,
    restarts: u64,
    replayed: u64,
    pub coordinator_restarts: u64,
}

impl ActorEngine {
    /// Starts the supervision tree for `model` cut as `spec.schedule` says.
    pub fn start(model: &DeepSeekV3, spec: FormationSpec) -> Result<ActorEngine> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut e = ActorEngine {
            rt,
            spec,
            formation: None,
            restarts_before: 0,
            replayed_before: 0,
            reload_next: false,
            restarts: 0,
            replayed: 0,
            coordinator_restarts: 0,
        };
        e.formation = Some(e.launch(model, e.spec.committed)?);
        Ok(e)
    }

    fn launch(&self, model: &DeepSeekV3, committed: u64) -> Result<Formation> {
        let spec = &self.spec;
        let stages = spec.schedule.kind.model_stages(spec.schedule.ranks);
        let ranges = kernels::model::stage::partition(model.cfg.num_hidden_layers, stages);
        let ctx = Arc::new(Ctx {
            ranges: ranges.clone(),
            schedule: spec.schedule.clone(),
            template: Arc::new(model.clone()),
            mtp_weight: spec.mtp_weight,
            wire: spec.wire,
            ep: spec.ep.max(1),
            compute: spec.compute,
            hidden: model.cfg.hidden_size,
            faults: spec.faults.clone(),
            policy: spec.policy,
            epoch: Instant::now(),
            book: AddressBook::new(spec.schedule.ranks),
            payloads: Default::default(),
            meta: (0..stages)
                .map(|s| {
                    // a reduce reads a stage's structure (ids, shared flags), never its values
                    let mut st = Stage::from_model(model, &ranges, s);
                    st.params
                        .tensors
                        .iter_mut()
                        .for_each(|t| t.data = Vec::new());
                    st
                })
                .collect(),
            owners: (0..stages)
                .map(|s| {
                    let slots = &spec.schedule.stages;
                    slots.iter().position(|c| c.model_stage == s).unwrap_or(0)
                })
                .collect(),
            detector: spec.detector,
            detections_ms: std::sync::Mutex::new(Vec::new()),
            stragglers: std::sync::atomic::AtomicU64::new(0),
            committed: std::sync::atomic::AtomicU64::new(committed),
            coordinators: std::sync::atomic::AtomicU64::new(0),
            fatal: std::sync::Mutex::new(None),
            stopping: AtomicBool::new(false),
            open_attempt: std::sync::Mutex::new(None),
        });
        let (tx, inbox) = tokio::sync::mpsc::unbounded_channel();
        ctx.book.set_engine(tx);
        let args = CoordArgs {
            ctx: ctx.clone(),
            data: DataArgs {
                ctx: ctx.clone(),
                data: spec.data.clone(),
                seed: spec.seed,
                batch: spec.batch,
                seq: spec.seq,
                microbatches: ctx.schedule.microbatches,
            },
            committed,
            timeouts: spec.timeouts,
        };
        let root_args = RootArgs {
            ctx: ctx.clone(),
            coord: args,
        };
        let (root, handle) = self
            .rt
            .block_on(Actor::spawn(None, Root, root_args))
            .map_err(|e| anyhow!("cannot start the formation: {e}"))?;
        Ok(Formation {
            ctx,
            root,
            handle: Some(handle),
            inbox,
        })
    }

    /// Faults of the plan that never fired.
    pub fn unfired_faults(&self) -> Vec<Fault> {
        self.spec.faults.unfired()
    }

    /// How long after their last sign of life hung actors were declared dead (ms), and how many
    /// stragglers were reported.
    pub fn detections(&self) -> (Vec<u64>, u64) {
        let Some(f) = &self.formation else {
            return (Vec::new(), 0);
        };
        let d = f
            .ctx
            .detections_ms
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        (
            d,
            f.ctx.stragglers.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Faults that fired, by kind.
    pub fn faults_fired(&self) -> BTreeMap<String, u64> {
        self.spec.faults.fired_counts()
    }

    fn stop(&mut self) {
        if let Some(mut f) = self.formation.take() {
            f.ctx
                .stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            f.root.kill();
            if let Some(h) = f.handle.take() {
                let _ = self.rt.block_on(h);
            }
        }
    }

    /// Stops the tree and waits for it.
    pub fn shutdown(&mut self) {
        self.stop();
    }

    /// One `RunStep` to the current coordinator, with its heartbeat watched until its answer
    /// comes to the engine's inbox. `Ok(None)`: the coordinator died, or went silent past the
    /// bound and was killed; the Root starts a new one.
    fn call_step(
        &mut self,
        state: PayloadKey,
        step: u64,
        hyper: StepHyper,
        restore: bool,
    ) -> Result<Option<StepReply>> {
        let f = self
            .formation
            .as_mut()
            .ok_or_else(|| anyhow!("no formation"))?;
        let ctx = f.ctx.clone();
        let inbox = &mut f.inbox;
        let dead_after = self.spec.coordinator_dead_after;
        self.rt.block_on(async move {
            // a replacement coordinator takes a moment to start (its backoff and its start-up)
            let started = Instant::now();
            let coord = loop {
                if let Some(c) = ctx.book.coord()
                    && c.get_status() == ractor::ActorStatus::Running
                {
                    break c;
                }
                if let Some(reason) = ctx.fatal.lock().ok().and_then(|f| f.clone()) {
                    return Err(anyhow!("step {step}: {reason}"));
                }
                if started.elapsed() > Duration::from_secs(60) {
                    return Err(anyhow!("step {step}: no coordinator came up within 60 s"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            // answers of an earlier coordinator or step are stale
            while inbox.try_recv().is_ok() {}
            let run = CoordMsg::RunStep {
                step,
                state,
                hyper,
                restore,
            };
            if coord.cast(run).is_err() {
                return Ok(None);
            }
            let mut last_answer = Instant::now();
            let mut ping = tokio::time::interval(Duration::from_millis(100));
            ping.tick().await;
            loop {
                tokio::select! {
                    m = inbox.recv() => match m {
                        Some(EngineMsg::StepDone { step: s, result }) if s == step => {
                            return result.map(Some).map_err(|e| anyhow!("{e}"));
                        }
                        Some(_) => last_answer = Instant::now(),
                        None => return Err(anyhow!("step {step}: the formation's inbox closed")),
                    },
                    _ = ping.tick() => {
                        let replaced = ctx.book.coord().map(|c| c.get_id()) != Some(coord.get_id());
                        if replaced || coord.get_status() == ractor::ActorStatus::Stopped {
                            return Ok(None);
                        }
                        if last_answer.elapsed() < dead_after {
                            let _ = coord.cast(CoordMsg::Ping);
                        } else {
                            let silent = last_answer.elapsed().as_millis() as u64;
                            tracing::warn!(step, "the coordinator is silent for {silent} ms: declared dead, killing it");
                            ctx.detections_ms.lock().map(|mut d| d.push(silent)).ok();
                            coord.kill();
                            // not a coordinator any more once it has stopped: the next call
                            // must go to its successor
                            let killed = Instant::now();
                            while coord.get_status() != ractor::ActorStatus::Stopped
                                && killed.elapsed() < Duration::from_secs(5)
                            {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            return Ok(None);
                        }
                    }
                }
            }
        })
    }
}

impl Drop for ActorEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl StepEngine for ActorEngine {
    fn model_stages(&self) -> usize {
        let s = &self.spec.schedule;
        s.kind.model_stages(s.ranks)
    }

    fn reload(&mut self, _state: &TrainState) -> Result<()> {
        // the next step's open restores its committed state on every rank
        self.reload_next = true;
        Ok(())
    }

    fn step(
        &mut self,
        state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        // shared with the coordinator: kept here (not copied) for its successor if it dies;
        // its gradient buffer is dead weight between steps
        let mut state = state;
        state.grads = Vec::new();
        let state = Arc::new(state);
        let ctx = self
            .formation
            .as_ref()
            .ok_or_else(|| anyhow!("no formation"))?
            .ctx
            .clone();
        ctx.committed
            .store(step - 1, std::sync::atomic::Ordering::SeqCst);
        // the coordinators read it from the payload store; what earlier steps left there goes
        ctx.payloads.release_before(step);
        let key = ctx.payloads.share(step, state.clone());
        let mut tries = 0;
        loop {
            let restore = std::mem::take(&mut self.reload_next);
            match self.call_step(key, step, *h, restore)? {
                Some(reply) => {
                    ctx.payloads.release(key);
                    let new = if reply.out.rejected.is_some() {
                        // the gate refused the update: the committed state, one step on
                        state.refused()
                    } else {
                        // the stages' updates moved in (a reader still holding one costs a copy)
                        let mut all = Vec::new();
                        for k in &reply.updates {
                            let u = ctx.payloads.take_or::<TensorUpdates>(*k, |u| u.clone());
                            all.extend(u.ok_or_else(|| {
                                anyhow!("step {step}: a stage's update is not in the payload store")
                            })?);
                        }
                        state
                            .assemble(all)
                            .map_err(|e| anyhow!("step {step}: {e}"))?
                    };
                    drop(state);
                    super::release_free_memory(new.model.num_params());
                    self.restarts = self.restarts_before + reply.restarts;
                    self.replayed = self.replayed_before + reply.replayed_steps;
                    return Ok((new, reply.out));
                }
                None => {
                    tries += 1;
                    if tries > self.spec.policy.max_restarts {
                        return Err(anyhow!(
                            "step {step}: the coordinator failed {tries} times in a row; giving up"
                        ));
                    }
                    // the Root starts a new coordinator beside the living ranks; it rebuilds
                    // its view from their reports and the step runs again from the committed
                    // state (counters of the dead one are carried over)
                    tracing::warn!(
                        step,
                        "the coordinator is gone; sending the step to its successor"
                    );
                    self.coordinator_restarts += 1;
                    self.restarts_before = self.restarts + 1;
                    self.restarts = self.restarts_before;
                    self.replayed_before = self.replayed + 1;
                    self.replayed = self.replayed_before;
                }
            }
        }
    }

    fn restarts(&self) -> u64 {
        self.restarts
    }

    fn replayed_steps(&self) -> u64 {
        self.replayed
    }
}

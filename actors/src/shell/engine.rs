//! The engine around a formation: starts the supervision tree, runs each step as one call to
//! the Coordinator, and supervises the Coordinator itself: a coordinator that fails, or stops
//! answering its heartbeat within the bound, is replaced by a fresh formation built from the last
//! committed state, and the open step runs again.

use super::coordinator::{CoordArgs, Coordinator};
use super::data_loader::DataArgs;
use super::protocol::{CoordMsg, StepReply};
use super::{AddressBook, Ctx};
use crate::core::coordinator::TimeoutPolicy;
use crate::core::detector::DetectorPolicy;
use crate::core::supervisor::RestartPolicy;
use crate::formation::Wire;
use crate::formation::inject::{Fault, FaultBook};
use crate::schedule::Schedule;
use crate::trainer::{StepEngine, StepHyper, StepOutput, TrainState};
use anyhow::{Result, anyhow};
use kernels::model::DeepSeekV3;
use ractor::rpc::CallResult;
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
}

/// A running formation: its runtime-side handles.
struct Formation {
    ctx: Arc<Ctx>,
    coord: ActorRef<CoordMsg>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// The actor formation as a training-loop engine: each step is one `RunStep` call to the
/// coordinator, which returns once the step is committed (after any number of replays).
pub struct ActorEngine {
    rt: tokio::runtime::Runtime,
    spec: FormationSpec,
    formation: Option<Formation>,
    /// Restarts of earlier formations (replaced coordinators), and coordinator replacements.
    restarts_before: u64,
    replayed_before: u64,
    restarts: u64,
    replayed: u64,
    pub coordinator_restarts: u64,
    /// Detections and stragglers of replaced formations.
    earlier_detections: (Vec<u64>, u64),
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
            restarts: 0,
            replayed: 0,
            coordinator_restarts: 0,
            earlier_detections: (Vec::new(), 0),
        };
        e.formation = Some(e.launch(model, e.spec.committed)?);
        Ok(e)
    }

    fn launch(&self, model: &DeepSeekV3, committed: u64) -> Result<Formation> {
        let spec = &self.spec;
        let stages = spec.schedule.kind.model_stages(spec.schedule.ranks);
        let ctx = Arc::new(Ctx {
            ranges: kernels::model::stage::partition(model.cfg.num_hidden_layers, stages),
            schedule: spec.schedule.clone(),
            template: Arc::new(model.clone()),
            mtp_weight: spec.mtp_weight,
            wire: spec.wire,
            ep: spec.ep.max(1),
            hidden: model.cfg.hidden_size,
            faults: spec.faults.clone(),
            policy: spec.policy,
            epoch: Instant::now(),
            book: AddressBook::new(spec.schedule.ranks),
            detector: spec.detector,
            detections_ms: std::sync::Mutex::new(Vec::new()),
            stragglers: std::sync::atomic::AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
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
        let (coord, handle) = self
            .rt
            .block_on(Actor::spawn(None, Coordinator, args))
            .map_err(|e| anyhow!("cannot start the coordinator: {e}"))?;
        Ok(Formation {
            ctx,
            coord,
            handle: Some(handle),
        })
    }

    /// Faults of the plan that never fired.
    pub fn unfired_faults(&self) -> Vec<Fault> {
        self.spec.faults.unfired()
    }

    /// How long after their last sign of life hung actors were declared dead (ms), over every
    /// formation of the run, and how many stragglers were reported.
    pub fn detections(&self) -> (Vec<u64>, u64) {
        let (mut d, mut s) = self.earlier_detections.clone();
        if let Some(f) = &self.formation {
            d.extend(
                f.ctx
                    .detections_ms
                    .lock()
                    .map(|v| v.clone())
                    .unwrap_or_default(),
            );
            s += f.ctx.stragglers.load(std::sync::atomic::Ordering::Relaxed);
        }
        (d, s)
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
            f.coord.kill();
            if let Some(h) = f.handle.take() {
                let _ = self.rt.block_on(h);
            }
        }
    }

    /// Stops the tree and waits for it.
    pub fn shutdown(&mut self) {
        self.stop();
    }

    /// One `RunStep` call, with the coordinator's heartbeat watched meanwhile. `Ok(None)`: the
    /// coordinator died or went silent past the bound (the caller replaces the formation).
    fn call_step(
        &mut self,
        state: Arc<TrainState>,
        step: u64,
        hyper: StepHyper,
    ) -> Result<Option<StepReply>> {
        let f = self
            .formation
            .as_ref()
            .ok_or_else(|| anyhow!("no formation"))?;
        let coord = f.coord.clone();
        let dead_after = self.spec.coordinator_dead_after;
        self.rt.block_on(async move {
            let c2 = coord.clone();
            let call = c2.call(
                move |reply| CoordMsg::RunStep {
                    step,
                    state,
                    hyper,
                    reply,
                },
                None,
            );
            tokio::pin!(call);
            let mut last_answer = Instant::now();
            loop {
                tokio::select! {
                    r = &mut call => {
                        return match r {
                            Ok(CallResult::Success(Ok(reply))) => Ok(Some(reply)),
                            Ok(CallResult::Success(Err(e))) => Err(anyhow!("{e}")),
                            _ => Ok(None),
                        };
                    }
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        let ping = coord.call(|reply| CoordMsg::Ping { reply }, Some(Duration::from_millis(100)));
                        if let Ok(CallResult::Success(())) = ping.await {
                            last_answer = Instant::now();
                        } else if last_answer.elapsed() >= dead_after {
                            tracing::warn!(step, "the coordinator is silent for {} ms: declared dead", last_answer.elapsed().as_millis());
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
    fn step(
        &mut self,
        state: TrainState,
        step: u64,
        h: &StepHyper,
    ) -> Result<(TrainState, StepOutput)> {
        // shared with the coordinator: kept here (not copied) to start a new formation from;
        // its gradient buffer is dead weight between steps
        let mut state = state;
        state.grads = Vec::new();
        let state = Arc::new(state);
        let mut tries = 0;
        loop {
            match self.call_step(state.clone(), step, *h)? {
                Some(reply) => {
                    self.restarts = self.restarts_before + reply.restarts;
                    self.replayed = self.replayed_before + reply.replayed_steps;
                    return Ok((*reply.state, reply.out));
                }
                None => {
                    tries += 1;
                    if tries > self.spec.policy.max_restarts {
                        return Err(anyhow!(
                            "step {step}: the coordinator failed {tries} times in a row; giving up"
                        ));
                    }
                    // the coordinator is the formation's root: replace the whole formation from
                    // the last committed state and run the step again
                    tracing::warn!(step, "replacing the coordinator's formation");
                    self.earlier_detections = self.detections();
                    self.stop();
                    self.coordinator_restarts += 1;
                    self.restarts_before = self.restarts + 1;
                    self.restarts = self.restarts_before;
                    self.replayed_before = self.replayed + 1;
                    self.replayed = self.replayed_before;
                    self.formation = Some(self.launch(&state.model, step - 1)?);
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

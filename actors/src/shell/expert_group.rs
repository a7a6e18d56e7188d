//! The ExpertGroupActor: routed experts `[g·E/G, (g+1)·E/G)` of one stage copy's MoE layers,
//! served over wire frames (FP8 dispatch, BF16 combine), and the stage's side of that exchange:
//! [`ExpertLine`] (a request out, its answer back through the stage copy's inbox, matched by
//! call number) and [`RemoteExperts`].

use super::protocol::{ExpertAnswer, ExpertMsg, ExpertReply, WireGrads};
use super::{Ctx, fire};
use crate::formation::Wire;
use crate::formation::compute::EpPayload;
use crate::inject::{FaultKind, Phase, Target};
use crate::state::{TensorUpdates, TrainState, updates_by_id};
use kernels::model::experts::{ExpertGroup, LocalExpertGroups, gather};
use kernels::model::layers::{ExpertCompute, ExpertGrads, ExpertSite};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How much longer a `slow` expert group takes per message (it does not time its work).
const SLOW_UNIT: Duration = Duration::from_millis(20);

/// How long a stage waits for an expert group before giving up on the step (a hung group is
/// normally caught earlier by the coordinator's step timeout, which kills the waiting stage).
pub const EXPERT_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Flips a byte of a frame under a `corrupt` fault (the stage's decode refuses it by CRC).
fn damage(faults: &[FaultKind], frame: &mut [u8]) {
    if faults.contains(&FaultKind::Corrupt) && !frame.is_empty() {
        let i = frame.len() / 2;
        frame[i] ^= 0x5a;
    }
}

/// Why an expert call got no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum CallError {
    /// The group is gone (its mailbox is closed).
    Gone,
    /// No answer within the bound.
    Timeout,
}

/// A stage copy's line to its expert groups: requests go out numbered, answers come back to
/// the copy's inbox (registered in the address book under its rank and copy) and are matched by
/// number; an answer to an earlier call (late, or a duplicate) is dropped.
#[derive(Debug)]
pub struct ExpertLine {
    pub groups: Vec<ActorRef<ExpertMsg>>,
    inbox: Mutex<Receiver<ExpertReply>>,
    calls: AtomicU64,
}

impl ExpertLine {
    pub fn new(groups: Vec<ActorRef<ExpertMsg>>, inbox: Receiver<ExpertReply>) -> ExpertLine {
        ExpertLine {
            groups,
            inbox: Mutex::new(inbox),
            calls: AtomicU64::new(0),
        }
    }

    /// Sends `make(call)` to group `g` and waits (blocking this thread) for its answer.
    pub fn call(
        &self,
        g: usize,
        make: impl FnOnce(u64) -> ExpertMsg,
        timeout: Duration,
    ) -> Result<ExpertAnswer, CallError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let inbox = self.inbox.lock().map_err(|_| CallError::Gone)?;
        self.groups[g]
            .cast(make(call))
            .map_err(|_| CallError::Gone)?;
        let end = std::time::Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match inbox.recv_timeout(left) {
                Ok(r) if r.call == call && r.group == g => return Ok(r.answer),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return Err(CallError::Timeout),
                Err(RecvTimeoutError::Disconnected) => return Err(CallError::Gone),
            }
        }
    }
}

/// Routed experts `[g·E/G, (g+1)·E/G)` of one stage copy's MoE decoder layers: their parameters,
/// the activations between forward and backward, and their weight gradients per micro-batch
/// (returned with the backward's dx). Supervised by the StageActor it serves: a failed group
/// fails that stage, which its GpuActor restarts (new groups, restored parameters, replay).
pub struct ExpertGroupActor;

pub struct ExpertArgs {
    pub ctx: Arc<Ctx>,
    pub rank: usize,
    pub copy: usize,
    pub group: usize,
}

pub struct ExpertState {
    ctx: Arc<Ctx>,
    rank: usize,
    copy: usize,
    index: usize,
    group: Option<ExpertGroup>,
}

impl ExpertState {
    /// Answers call `call` of the stage copy this group serves, unless a `drop` fault eats the
    /// answer; under `dup` it is delivered twice (the copy takes the first).
    fn answer(&self, faults: &[FaultKind], call: u64, answer: ExpertAnswer) {
        if faults.contains(&FaultKind::Drop) {
            return;
        }
        let copies = if faults.contains(&FaultKind::Dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let reply = ExpertReply {
                call,
                group: self.index,
                answer: answer.clone(),
            };
            self.ctx.book.to_stage(self.rank, self.copy, reply);
        }
    }

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

    /// The faults of this group at (step, phase): panic, hang and slow fire now; message
    /// faults are returned for the answer.
    async fn maybe_fail(&self, step: u64, phase: Phase) -> Vec<FaultKind> {
        let mut later = Vec::new();
        while let Some(f) = self.ctx.faults.take(step, phase, Target::Expert, self.rank) {
            let g = self.group.as_ref().map_or(usize::MAX, |g| g.index);
            let what = format!(
                "expert group {g} of stage copy s{} on rank {} at step {step}, phase {phase:?}",
                self.copy, self.rank
            );
            match f.kind {
                FaultKind::Drop | FaultKind::Corrupt | FaultKind::Dup => {
                    tracing::warn!("injected {} of the answer of {what}", f.kind.name());
                    later.push(f.kind);
                }
                _ => fire(f, what, SLOW_UNIT).await,
            }
        }
        later
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
        let (copy, group, rank) = (a.copy, a.group, a.rank);
        let g = tokio::task::spawn_blocking(move || {
            let model_stage = ctx.schedule.stages[copy].model_stage;
            let layers = ctx.ranges[model_stage].clone();
            let mut g = ExpertGroup::new(&ctx.template, layers, group, ctx.ep);
            // beside a device stage copy, its groups compute on the copy's device
            if let Some(d) = ctx.compute.open_experts(rank)? {
                g.set_device(d)?;
            }
            Ok::<_, String>(g)
        })
        .await?
        .map_err(|e| format!("expert group {group} of stage copy s{copy} on rank {rank}: {e}"))?;
        if let Some(on) = g.device() {
            tracing::info!(rank, copy, group, "expert group computes on {on}");
        }
        Ok(ExpertState {
            ctx: a.ctx,
            rank: a.rank,
            copy: a.copy,
            index: a.group,
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
                call,
                step,
                site,
                blocks,
            } => {
                let fault = st.maybe_fail(step, Phase::Forward).await;
                let mut out = st
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
                if let Some(b) = out.first_mut() {
                    damage(&fault, b);
                }
                st.answer(&fault, call, ExpertAnswer::Forward(out));
            }
            ExpertMsg::Backward {
                call,
                step,
                site,
                blocks,
            } => {
                let mut fault = st.maybe_fail(step, Phase::Backward).await;
                fault.extend(st.maybe_fail(step, Phase::Weight).await);
                let mut out = st
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
                if let Some(w) = out.first_mut() {
                    damage(&fault, &mut w.dx);
                }
                st.answer(&fault, call, ExpertAnswer::Backward(out));
            }
            ExpertMsg::Reset { call, restore } => {
                let restore = match restore {
                    Some(k) => Some(
                        st.ctx
                            .payloads
                            .get::<TrainState>(k)
                            .ok_or("the committed state is gone")?,
                    ),
                    None => None,
                };
                st.blocking(move |g| {
                    g.reset();
                    if let Some(s) = restore {
                        g.load_from(&s.model.params);
                    }
                })
                .await?;
                st.answer(&[], call, ExpertAnswer::Ack);
            }
            ExpertMsg::Install {
                call,
                step,
                attempt,
                updates,
            } => {
                let fault = st.maybe_fail(step, Phase::Optimizer).await;
                let parts = st.ctx.payloads.get_all::<TensorUpdates>(&updates);
                // gone with a dropped attempt: nothing to install, the replay restores the values
                let parts = st.ctx.live(parts, step, attempt);
                let parts = parts.map_err(|()| "the stages' updates are gone")?;
                let parts = parts.unwrap_or_default();
                if !parts.is_empty() {
                    st.blocking(move |g| g.load_from(&updates_by_id(&parts)))
                        .await?;
                }
                st.answer(&fault, call, ExpertAnswer::Ack);
            }
        }
        Ok(())
    }
}

/// A stage's routed experts in its ExpertGroupActors: blocks go out as frames, by owning group,
/// and come back in block order. Runs on the stage's blocking-pool thread and waits there. An
/// answer whose frame fails its checks is a lost message: the block reads as zeros, `lost` says
/// why, and the stage reports the attempt lost instead of answering (the step replays). A failed
/// or silent group panics the stage's compute (the stage fails and is healed).
#[derive(Debug)]
pub struct RemoteExperts {
    pub line: Arc<ExpertLine>,
    pub n_experts: usize,
    pub wire: Wire,
    pub d: usize,
    pub step: Arc<AtomicU64>,
    /// Why an answer of the current op was refused (taken by the stage after the op).
    pub lost: Arc<std::sync::Mutex<Option<String>>>,
}

impl RemoteExperts {
    fn exchange<A>(
        &self,
        blocks: Vec<(usize, Vec<f32>)>,
        kind: EpPayload,
        msg: impl Fn(u64, u64, Vec<(usize, Vec<u8>)>) -> ExpertMsg,
        unpack: impl Fn(ExpertAnswer) -> Option<Vec<A>>,
    ) -> Vec<A> {
        let n = blocks.len();
        let step = self.step.load(Ordering::SeqCst);
        let per = LocalExpertGroups::split(self.n_experts, self.line.groups.len(), blocks);
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
            let r = self
                .line
                .call(g, |call| msg(call, step, payload), EXPERT_CALL_TIMEOUT);
            match r.map(&unpack) {
                Ok(Some(v)) => parts.push((pos, v)),
                Ok(None) => panic!("expert group {g} answered with the wrong kind (step {step})"),
                Err(CallError::Timeout) => panic!("expert group {g} did not answer (step {step})"),
                Err(CallError::Gone) => panic!("expert group {g} failed (step {step})"),
            }
        }
        gather(n, parts)
    }
}

impl RemoteExperts {
    /// `frame` decoded, or zeros of `len` values with the refusal recorded.
    fn decode_or_lose(&self, frame: &[u8], len: usize) -> Vec<f32> {
        match Wire::decode(frame) {
            Ok(v) if v.len() == len => v,
            Ok(v) => self.lose(
                format!("an expert answer of {} values, {len} expected", v.len()),
                len,
            ),
            Err(e) => self.lose(format!("an expert answer refused: {e}"), len),
        }
    }

    fn lose(&self, why: String, len: usize) -> Vec<f32> {
        if let Ok(mut l) = self.lost.lock() {
            l.get_or_insert(why);
        }
        vec![0.0; len]
    }
}

impl ExpertCompute for RemoteExperts {
    fn forward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>> {
        let lens: Vec<usize> = blocks.iter().map(|b| b.1.len()).collect();
        self.exchange(
            blocks,
            EpPayload::Dispatch,
            |call, step, blocks| ExpertMsg::Forward {
                call,
                step,
                site,
                blocks,
            },
            |a| match a {
                ExpertAnswer::Forward(v) => Some(v),
                _ => None,
            },
        )
        .into_iter()
        .zip(lens)
        .map(|(y, len)| self.decode_or_lose(&y, len))
        .collect()
    }

    fn backward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<ExpertGrads> {
        let lens: Vec<usize> = blocks.iter().map(|b| b.1.len()).collect();
        self.exchange(
            blocks,
            EpPayload::Combine,
            |call, step, blocks| ExpertMsg::Backward {
                call,
                step,
                site,
                blocks,
            },
            |a| match a {
                ExpertAnswer::Backward(v) => Some(v),
                _ => None,
            },
        )
        .into_iter()
        .zip(lens)
        .map(|(w, len)| {
            let [dgate, dup, ddown] = w.dw;
            ExpertGrads {
                dx: self.decode_or_lose(&w.dx, len),
                dgate,
                dup,
                ddown,
            }
        })
        .collect()
    }
}

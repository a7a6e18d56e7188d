//! The GpuActor: one pipeline rank. A thin driver of its [`RankMachine`] (which op runs next,
//! what goes where, when to report) and of a [`Supervisor`] machine over its stage copies
//! (restart after a backoff timer, restart every copy when one is past its budget, escalate to
//! the NodeSupervisor past its own). Activations and gradients leave as encoded wire frames and
//! are decoded on arrival; a frame that fails its checks is a lost message (the step replays).

use super::payload::PayloadKey;
use super::protocol::{CoordMsg, CopyGrads, GpuMsg, StageMsg};
use super::stage::{StageActor, StageArgs};
use super::{Ctx, backoff, fire, is_child_event, open_check};
use crate::core::detector::{Detector, DetectorCommand, DetectorEvent};
use crate::core::rank::{RankCommand, RankEvent, RankMachine};
use crate::core::supervisor::{SupCommand, SupEvent, Supervisor};
use crate::formation::Wire;
use crate::inject::{Fault, FaultKind, Phase, Target};
use crate::schedule::Instr;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How much longer a `slow` rank takes per instruction (it does not time the stages' work).
const SLOW_UNIT: Duration = Duration::from_millis(20);

/// One pipeline rank (the device).
pub struct GpuActor;

pub struct GpuArgs {
    pub ctx: Arc<Ctx>,
    pub rank: usize,
}

pub struct GpuState {
    ctx: Arc<Ctx>,
    rank: usize,
    /// The machine hands over gradient sums by their keys (`GradSums` in the payload store).
    machine: RankMachine<CopyGrads>,
    sup: Supervisor<usize>,
    stages: BTreeMap<usize, ActorRef<StageMsg>>,
    ids: BTreeMap<ActorId, usize>,
    /// Copies whose death this rank already reported (killed after a probe).
    reported: BTreeSet<usize>,
    /// The open attempt's micro-batches and the stages' updates being installed (payload keys).
    batches: Option<PayloadKey>,
    params: Option<Vec<PayloadKey>>,
    /// Message faults armed for the next frame this rank sends.
    armed: Vec<Fault>,
    /// Slow versus dead for this rank's stage copies (fed their progress counters each tick).
    detector: Detector,
    progress: BTreeMap<usize, Arc<AtomicU64>>,
}

impl GpuActor {
    async fn spawn_stage(
        myself: &ActorRef<GpuMsg>,
        st: &mut GpuState,
        copy: usize,
    ) -> Result<(), ActorProcessingErr> {
        let progress = Arc::new(AtomicU64::new(0));
        let args = StageArgs {
            ctx: st.ctx.clone(),
            rank: st.rank,
            copy,
            parent: myself.clone(),
            progress: progress.clone(),
        };
        let (r, _) = Actor::spawn_linked(None, StageActor, args, myself.get_cell()).await?;
        st.ids.insert(r.get_id(), copy);
        st.stages.insert(copy, r);
        st.progress.insert(copy, progress);
        st.detector
            .on(st.ctx.now_ms(), DetectorEvent::Join { member: copy });
        Ok(())
    }

    async fn maybe_fail(st: &mut GpuState, step: u64, phase: Phase) {
        // every fault planned for this point fires (a panic or hang leaves the rest to the replay)
        while let Some(f) = st.ctx.faults.take(step, phase, Target::Gpu, st.rank) {
            let what = format!("gpu rank {} at step {step}, phase {phase:?}", st.rank);
            match f.kind {
                FaultKind::Drop | FaultKind::Corrupt | FaultKind::Dup => st.armed.push(f),
                _ => fire(f, what, SLOW_UNIT).await,
            }
        }
    }

    /// Feeds the machine one event and carries out what it says.
    async fn drive(st: &mut GpuState, ev: RankEvent<CopyGrads>) -> Result<(), ActorProcessingErr> {
        let cmds = st.machine.on(ev)?;
        for cmd in cmds {
            GpuActor::exec(st, cmd).await?;
        }
        Ok(())
    }

    async fn exec(
        st: &mut GpuState,
        cmd: RankCommand<CopyGrads>,
    ) -> Result<(), ActorProcessingErr> {
        match cmd {
            RankCommand::Starting { step, instr } => {
                for phase in gpu_phases(&instr) {
                    GpuActor::maybe_fail(st, step, *phase).await;
                }
            }
            RankCommand::RunOp {
                op_id,
                copy,
                step,
                attempt,
                op,
            } => {
                let batches = st.batches.ok_or("no batches for the attempt")?;
                st.work(copy, op_id, true);
                if let Some(s) = st.stages.get(&copy) {
                    let _ = s.cast(StageMsg::Op {
                        op_id,
                        step,
                        attempt,
                        op,
                        batches,
                    });
                }
            }
            RankCommand::Send {
                to,
                step,
                attempt,
                arrival,
                data,
            } => {
                let mut frame = st.ctx.wire.encode(arrival, data, st.ctx.hidden);
                let faults = std::mem::take(&mut st.armed);
                if faults.iter().any(|f| f.kind == FaultKind::Drop) {
                    tracing::warn!(rank = st.rank, to, "injected drop of {arrival:?}");
                    return Ok(());
                }
                if faults.iter().any(|f| f.kind == FaultKind::Corrupt) {
                    let i = frame.len() / 2;
                    frame[i] ^= 0x5a;
                    tracing::warn!(rank = st.rank, to, "injected corruption of {arrival:?}");
                }
                let copies = if faults.iter().any(|f| f.kind == FaultKind::Dup) {
                    2
                } else {
                    1
                };
                // a peer that is down loses the message; the step is replayed
                if let Some(peer) = st.ctx.book.gpu(to) {
                    for _ in 0..copies {
                        let _ = peer.cast(GpuMsg::Deliver {
                            step,
                            attempt,
                            arrival,
                            frame: frame.clone(),
                        });
                    }
                }
            }
            RankCommand::TakeGrads {
                copy,
                step,
                attempt,
            } => {
                if let Some(s) = st.stages.get(&copy) {
                    let _ = s.cast(StageMsg::TakeGrads { step, attempt });
                }
            }
            RankCommand::Done {
                step,
                attempt,
                grads,
                stats,
            } => st.ctx.to_coord(CoordMsg::Done {
                rank: st.rank,
                step,
                attempt,
                grads,
                stats,
            }),
            RankCommand::InstallStage {
                copy,
                step,
                attempt,
            } => {
                let updates = st.params.clone().ok_or("no parameters to install")?;
                // an install is work too: a stage (or expert group) stuck in it is hung
                st.work(copy, install_work(step, attempt), true);
                if let Some(s) = st.stages.get(&copy) {
                    let _ = s.cast(StageMsg::Install {
                        step,
                        attempt,
                        updates,
                    });
                }
            }
            RankCommand::Installed { step, attempt } => {
                st.params = None;
                st.ctx.to_coord(CoordMsg::Installed {
                    rank: st.rank,
                    step,
                    attempt,
                });
            }
            RankCommand::Busy {
                step,
                attempt,
                copies,
            } => {
                for copy in copies {
                    if let Some(s) = st.stages.get(&copy) {
                        if st.reported.insert(copy) {
                            st.ctx.to_coord(CoordMsg::RankDown {
                                rank: st.rank,
                                reason: format!(
                                    "stage copy s{copy} on rank {} did not answer before the step deadline",
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

    /// The failure detector's tick: every stage copy's progress counter is its heartbeat; a
    /// copy whose progress froze during an op for the detector's bound is declared dead (hung)
    /// and killed, a straggler is only reported. The rank beats to the coordinator.
    async fn tick(myself: &ActorRef<GpuMsg>, st: &mut GpuState) -> Result<(), ActorProcessingErr> {
        let now = st.ctx.now_ms();
        let beats: Vec<(usize, u64)> = st
            .progress
            .iter()
            .filter(|(c, _)| st.stages.contains_key(c))
            .map(|(&c, p)| (c, p.load(Ordering::Relaxed)))
            .collect();
        for (member, progress) in beats {
            st.detector
                .on(now, DetectorEvent::Heartbeat { member, progress });
        }
        for cmd in st.detector.on(now, DetectorEvent::Tick) {
            match cmd {
                DetectorCommand::Dead {
                    member: copy,
                    silent_ms,
                    reason,
                } => {
                    let Some(s) = st.stages.get(&copy) else {
                        continue;
                    };
                    tracing::warn!(
                        rank = st.rank,
                        copy,
                        silent_ms,
                        "stage copy declared dead ({reason:?}) {silent_ms} ms after its last progress"
                    );
                    st.ctx
                        .detections_ms
                        .lock()
                        .map(|mut d| d.push(silent_ms))
                        .ok();
                    if st.reported.insert(copy) {
                        st.ctx.to_coord(CoordMsg::RankDown {
                            rank: st.rank,
                            reason: format!(
                                "stage copy s{copy} on rank {} made no progress for {silent_ms} ms",
                                st.rank
                            ),
                        });
                    }
                    s.kill();
                }
                DetectorCommand::Slow {
                    member,
                    elapsed_ms,
                    typical_ms,
                    ..
                } => {
                    // counted in the summary (`stragglers`); a warning only when it is far off
                    // (ops of a healthy run on a busy machine vary by 2–3×)
                    if elapsed_ms >= 5 * typical_ms.max(1) {
                        tracing::warn!(
                            rank = st.rank,
                            copy = member,
                            "straggler: an op has taken {elapsed_ms} ms (typical {typical_ms} ms); still progressing, not restarted"
                        );
                    } else {
                        tracing::debug!(
                            rank = st.rank,
                            copy = member,
                            "slow op: {elapsed_ms} ms (typical {typical_ms} ms)"
                        );
                    }
                    st.ctx.stragglers.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        st.ctx.to_coord(CoordMsg::Heartbeat { rank: st.rank });
        let every = Duration::from_millis(st.ctx.detector.heartbeat_interval_ms);
        ractor::time::send_after(every, myself.get_cell(), || GpuMsg::Tick);
        Ok(())
    }

    /// Carries out the Supervisor machine's commands.
    async fn supervise(
        myself: &ActorRef<GpuMsg>,
        st: &mut GpuState,
        cmds: Vec<SupCommand<usize>>,
    ) -> Result<(), ActorProcessingErr> {
        for cmd in cmds {
            match cmd {
                SupCommand::StartTimer { after_ms, token } => {
                    backoff(myself, after_ms, move || GpuMsg::RestartTimer { token })
                }
                SupCommand::Restart { child, restart } => {
                    tracing::warn!(
                        rank = st.rank,
                        copy = child,
                        restart,
                        "restarting stage actor"
                    );
                    GpuActor::spawn_stage(myself, st, child).await?;
                    if st.sup_idle() {
                        st.ctx.to_coord(CoordMsg::RankUp { rank: st.rank });
                    }
                }
                SupCommand::RestartAll { reason } => {
                    tracing::warn!(rank = st.rank, "{reason}");
                    st.ids.clear();
                    for (_, s) in std::mem::take(&mut st.stages) {
                        s.kill();
                    }
                    for copy in st.ctx.schedule.stages_on(st.rank) {
                        GpuActor::spawn_stage(myself, st, copy).await?;
                    }
                    st.ctx.to_coord(CoordMsg::RankUp { rank: st.rank });
                }
                SupCommand::Escalate { reason } | SupCommand::GiveUp { reason } => {
                    return Err(reason.into());
                }
            }
        }
        Ok(())
    }
}

impl GpuState {
    /// Tells the failure detector that stage copy `copy` started (or finished) work `work`.
    fn work(&mut self, copy: usize, work: u64, started: bool) {
        let now = self.ctx.now_ms();
        let ev = if started {
            DetectorEvent::WorkStarted { member: copy, work }
        } else {
            DetectorEvent::WorkDone { member: copy, work }
        };
        self.detector.on(now, ev);
    }

    /// A new or aborted attempt: work handed out before it will not be answered, so the failure
    /// detector stops waiting for it (each stage starts afresh).
    fn forget_work(&mut self) {
        let now = self.ctx.now_ms();
        for &copy in self.stages.keys() {
            self.detector.on(now, DetectorEvent::Join { member: copy });
        }
    }

    /// Hands an owner's reduce (`phase` 1) or update (2) of the current attempt to stage copy
    /// `copy`, as work the failure detector watches; a stale one is dropped.
    fn hand_to_owner(
        &mut self,
        copy: usize,
        (step, attempt): (u64, u32),
        phase: u64,
        msg: StageMsg,
    ) {
        if self.machine.current() != Some((step, attempt)) {
            return;
        }
        if let Some(s) = self.stages.get(&copy) {
            let _ = s.cast(msg);
            self.work(copy, owner_work(phase, step, attempt), true);
        }
    }

    /// Every stage copy is up and no restart is pending.
    fn sup_idle(&self) -> bool {
        !self.sup.is_waiting() && self.stages.len() == self.ctx.schedule.stages_on(self.rank).len()
    }
}

/// The failure detector's id of the install of (step, attempt): above every op id.
fn install_work(step: u64, attempt: u32) -> u64 {
    (1 << 63) | (step << 16) | u64::from(attempt & 0xffff)
}

/// The failure detector's id of an owner's reduce (`phase` 1) or update (2) of (step, attempt).
fn owner_work(phase: u64, step: u64, attempt: u32) -> u64 {
    (phase << 61) | (step << 16) | u64::from(attempt & 0xffff)
}

/// The phases at which a GpuActor fault can fire when it dispatches `instr`.
fn gpu_phases(instr: &Instr) -> &'static [Phase] {
    match instr {
        Instr::F { .. } => &[Phase::Forward],
        Instr::B { .. } => &[Phase::Backward, Phase::Weight],
        Instr::BInput { .. } => &[Phase::Backward],
        Instr::W { .. } => &[Phase::Weight],
        Instr::FB { .. } => &[Phase::Forward, Phase::Backward, Phase::Weight],
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
            machine: RankMachine::new(&a.ctx.schedule, a.rank),
            sup: Supervisor::new(format!("gpu actor of rank {}", a.rank), a.ctx.policy, false),
            stages: BTreeMap::new(),
            ids: BTreeMap::new(),
            reported: BTreeSet::new(),
            batches: None,
            params: None,
            armed: Vec::new(),
            detector: Detector::new(a.ctx.detector),
            progress: BTreeMap::new(),
        };
        for copy in a.ctx.schedule.stages_on(a.rank) {
            GpuActor::spawn_stage(&myself, &mut st, copy).await?;
        }
        a.ctx.book.set_gpu(a.rank, myself.clone());
        Ok(st)
    }

    async fn post_start(
        &self,
        myself: ActorRef<GpuMsg>,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        st.ctx.to_coord(CoordMsg::RankUp { rank: st.rank });
        let every = Duration::from_millis(st.ctx.detector.heartbeat_interval_ms);
        ractor::time::send_after(every, myself.get_cell(), || GpuMsg::Tick);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<GpuMsg>,
        msg: GpuMsg,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GpuMsg::Open {
                step,
                attempt,
                check,
                batches,
                restore,
            } => {
                if check != open_check(step, attempt) {
                    tracing::warn!(rank = st.rank, step, attempt, "refused a damaged open");
                    st.ctx.to_coord(CoordMsg::Lost {
                        rank: st.rank,
                        step,
                        attempt,
                        reason: format!("refused a damaged open of step {step} attempt {attempt}"),
                    });
                    return Ok(());
                }
                if st.machine.current().is_some_and(|c| c >= (step, attempt)) {
                    // a duplicate (or stale) open must not reset the stages mid-attempt
                    return Ok(());
                }
                for s in st.stages.values() {
                    let _ = s.cast(StageMsg::Reset { restore });
                }
                st.batches = Some(batches);
                st.armed.clear();
                st.forget_work();
                GpuActor::drive(st, RankEvent::Open { step, attempt }).await?;
            }
            GpuMsg::Deliver {
                step,
                attempt,
                arrival,
                frame,
            } => match Wire::decode(&frame) {
                Ok(data) => {
                    let ev = RankEvent::Deliver {
                        step,
                        attempt,
                        arrival,
                        data,
                    };
                    GpuActor::drive(st, ev).await?;
                }
                Err(e) => {
                    tracing::warn!(rank = st.rank, "refused a frame for {arrival:?}: {e}");
                    st.ctx.to_coord(CoordMsg::Lost {
                        rank: st.rank,
                        step,
                        attempt,
                        reason: format!("refused the frame of {arrival:?}: {e}"),
                    });
                }
            },
            GpuMsg::OpDone {
                op_id,
                copy,
                step,
                attempt,
                mb,
                result,
            } => {
                st.work(copy, op_id, false);
                let ev = RankEvent::OpDone {
                    op_id,
                    copy,
                    step,
                    attempt,
                    mb,
                    result,
                };
                GpuActor::drive(st, ev).await?;
            }
            GpuMsg::StageGrads {
                copy,
                step,
                attempt,
                grads,
            } => {
                let ev = RankEvent::Grads {
                    copy,
                    step,
                    attempt,
                    grads,
                };
                GpuActor::drive(st, ev).await?;
            }
            GpuMsg::Install {
                step,
                attempt,
                updates,
            } => {
                if st.machine.current() != Some((step, attempt)) {
                    return Ok(());
                }
                GpuActor::maybe_fail(st, step, Phase::Optimizer).await;
                st.params = Some(updates);
                GpuActor::drive(st, RankEvent::Install { step, attempt }).await?;
            }
            GpuMsg::StageInstalled {
                copy,
                step,
                attempt,
            } => {
                st.work(copy, install_work(step, attempt), false);
                let ev = RankEvent::StageInstalled {
                    copy,
                    step,
                    attempt,
                };
                GpuActor::drive(st, ev).await?;
            }
            GpuMsg::Reduce {
                copy,
                step,
                attempt,
                parts,
            } => {
                let msg = StageMsg::Reduce {
                    step,
                    attempt,
                    parts,
                };
                st.hand_to_owner(copy, (step, attempt), 1, msg);
            }
            GpuMsg::Apply {
                copy,
                step,
                attempt,
                update,
            } => {
                let msg = StageMsg::Apply {
                    step,
                    attempt,
                    update,
                };
                st.hand_to_owner(copy, (step, attempt), 2, msg);
            }
            GpuMsg::Reduced {
                copy,
                step,
                attempt,
                result,
            } => {
                st.work(copy, owner_work(1, step, attempt), false);
                let model_stage = st.ctx.schedule.stages[copy].model_stage;
                st.ctx.to_coord(CoordMsg::Reduced {
                    model_stage,
                    step,
                    attempt,
                    result,
                });
            }
            GpuMsg::Applied {
                copy,
                step,
                attempt,
                result,
            } => {
                st.work(copy, owner_work(2, step, attempt), false);
                let model_stage = st.ctx.schedule.stages[copy].model_stage;
                st.ctx.to_coord(CoordMsg::Applied {
                    model_stage,
                    step,
                    attempt,
                    result,
                });
            }
            GpuMsg::Abort { step, attempt } => {
                st.forget_work();
                GpuActor::drive(st, RankEvent::Abort { step, attempt }).await?;
            }
            GpuMsg::Probe { step, attempt } => {
                GpuActor::drive(st, RankEvent::Probe { step, attempt }).await?;
            }
            GpuMsg::RestartTimer { token } => {
                let cmds = st.sup.on(st.ctx.now_ms(), SupEvent::Timer { token });
                GpuActor::supervise(&myself, st, cmds).await?;
            }
            GpuMsg::Progress => {
                st.sup.on(st.ctx.now_ms(), SupEvent::Progress);
            }
            GpuMsg::Hello => {
                GpuActor::drive(st, RankEvent::Reset).await?;
                st.ctx.to_coord(CoordMsg::RankUp { rank: st.rank });
            }
            GpuMsg::Tick => {
                GpuActor::tick(&myself, st).await?;
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
        st.detector
            .on(st.ctx.now_ms(), DetectorEvent::Leave { member: copy });
        if let Some((step, attempt)) = st.machine.current() {
            GpuActor::drive(st, RankEvent::Abort { step, attempt }).await?;
        }
        let what = format!("stage copy s{copy} on rank {} {what}", st.rank);
        if !st.reported.remove(&copy) {
            st.ctx.to_coord(CoordMsg::RankDown {
                rank: st.rank,
                reason: what.clone(),
            });
        }
        let cmds = st
            .sup
            .on(st.ctx.now_ms(), SupEvent::Failed { child: copy, what });
        GpuActor::supervise(&myself, st, cmds).await
    }
}

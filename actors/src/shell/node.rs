//! The NodeSupervisor: supervises the GpuActors of this process through a [`Supervisor`]
//! machine (backoff as a timer, every rank restarted when one is past its budget, escalation to
//! the coordinator past its own).

use super::gpu::{GpuActor, GpuArgs};
use super::protocol::{CoordMsg, NodeMsg};
use super::{Ctx, backoff, is_child_event};
use crate::core::supervisor::{SupCommand, SupEvent, Supervisor};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct NodeSupervisor;

pub struct NodeState {
    ctx: Arc<Ctx>,
    sup: Supervisor<usize>,
    ids: BTreeMap<ActorId, (usize, ActorCell)>,
}

impl NodeSupervisor {
    async fn spawn_gpu(
        myself: &ActorRef<NodeMsg>,
        st: &mut NodeState,
        rank: usize,
    ) -> Result<(), ActorProcessingErr> {
        let args = GpuArgs {
            ctx: st.ctx.clone(),
            rank,
        };
        let (r, _) = Actor::spawn_linked(None, GpuActor, args, myself.get_cell()).await?;
        st.ids.insert(r.get_id(), (rank, r.get_cell()));
        Ok(())
    }

    async fn supervise(
        myself: &ActorRef<NodeMsg>,
        st: &mut NodeState,
        cmds: Vec<SupCommand<usize>>,
    ) -> Result<(), ActorProcessingErr> {
        for cmd in cmds {
            match cmd {
                SupCommand::StartTimer { after_ms, token } => {
                    backoff(myself, after_ms, move || NodeMsg::RestartTimer { token })
                }
                SupCommand::Restart { child, restart } => {
                    tracing::warn!(rank = child, restart, "restarting gpu actor");
                    NodeSupervisor::spawn_gpu(myself, st, child).await?;
                }
                SupCommand::RestartAll { reason } => {
                    tracing::warn!("{reason}");
                    for (_, (rank, cell)) in std::mem::take(&mut st.ids) {
                        st.ctx.to_coord(CoordMsg::RankDown {
                            rank,
                            reason: reason.clone(),
                        });
                        cell.kill();
                    }
                    for rank in 0..st.ctx.schedule.ranks {
                        NodeSupervisor::spawn_gpu(myself, st, rank).await?;
                    }
                }
                SupCommand::Escalate { reason } | SupCommand::GiveUp { reason } => {
                    return Err(reason.into());
                }
            }
        }
        Ok(())
    }
}

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<NodeState, ActorProcessingErr> {
        ctx.book.set_node(myself.clone());
        let mut st = NodeState {
            sup: Supervisor::new("the node supervisor", ctx.policy, false),
            ctx: ctx.clone(),
            ids: BTreeMap::new(),
        };
        for rank in 0..ctx.schedule.ranks {
            NodeSupervisor::spawn_gpu(&myself, &mut st, rank).await?;
        }
        Ok(st)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<NodeMsg>,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        for (_, (_, cell)) in std::mem::take(&mut st.ids) {
            cell.kill();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let ev = match msg {
            NodeMsg::RestartTimer { token } => SupEvent::Timer { token },
            NodeMsg::Progress => SupEvent::Progress,
        };
        let cmds = st.sup.on(st.ctx.now_ms(), ev);
        NodeSupervisor::supervise(&myself, st, cmds).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<NodeMsg>,
        evt: SupervisionEvent,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, what)) = is_child_event(&evt) else {
            return Ok(());
        };
        let Some((rank, _)) = st.ids.remove(&id) else {
            return Ok(());
        };
        if st.ctx.stopping() {
            return Ok(());
        }
        let what = format!("gpu actor of rank {rank} {what}");
        st.ctx.to_coord(CoordMsg::RankDown {
            rank,
            reason: what.clone(),
        });
        let cmds = st
            .sup
            .on(st.ctx.now_ms(), SupEvent::Failed { child: rank, what });
        NodeSupervisor::supervise(&myself, st, cmds).await
    }
}

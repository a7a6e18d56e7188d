//! The Root: parent of the Coordinator and the NodeSupervisor, so that neither takes the other
//! down with it. A dead Coordinator is replaced while every rank keeps its actors and state (the
//! new one asks them to report in and restores the committed step); a dead NodeSupervisor is
//! replaced and the Coordinator told that every rank went down. Its decisions are a root
//! [`Supervisor`] machine: past its budget the run ends with the reason.

use super::coordinator::{CoordArgs, Coordinator};
use super::node::NodeSupervisor;
use super::protocol::{CoordMsg, RootMsg};
use super::{Ctx, backoff, is_child_event};
use crate::core::supervisor::{SupCommand, SupEvent, Supervisor};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::sync::Arc;

/// The Root's children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Child {
    Coordinator,
    Node,
}

pub struct Root;

/// What a Coordinator is started with (a replacement reads the committed step from the context).
pub struct RootArgs {
    pub ctx: Arc<Ctx>,
    pub coord: CoordArgs,
}

pub struct RootState {
    ctx: Arc<Ctx>,
    coord_args: CoordArgs,
    sup: Supervisor<Child>,
    coord: Option<ActorCell>,
    node: Option<ActorCell>,
}

impl Root {
    async fn spawn(
        myself: &ActorRef<RootMsg>,
        st: &mut RootState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        match child {
            Child::Coordinator => {
                let committed = st.ctx.committed.load(std::sync::atomic::Ordering::SeqCst);
                let args = CoordArgs {
                    ctx: st.ctx.clone(),
                    data: st.coord_args.data.clone(),
                    committed,
                    timeouts: st.coord_args.timeouts,
                };
                let (c, _) =
                    Actor::spawn_linked(None, Coordinator, args, myself.get_cell()).await?;
                st.coord = Some(c.get_cell());
            }
            Child::Node => {
                let (n, _) =
                    Actor::spawn_linked(None, NodeSupervisor, st.ctx.clone(), myself.get_cell())
                        .await?;
                st.node = Some(n.get_cell());
            }
        }
        Ok(())
    }

    async fn supervise(
        myself: &ActorRef<RootMsg>,
        st: &mut RootState,
        cmds: Vec<SupCommand<Child>>,
    ) -> Result<(), ActorProcessingErr> {
        for cmd in cmds {
            match cmd {
                SupCommand::StartTimer { after_ms, token } => {
                    backoff(myself, after_ms, move || RootMsg::RestartTimer { token })
                }
                SupCommand::Restart { child, restart } => {
                    tracing::warn!(restart, "starting a new {child:?}");
                    Root::spawn(myself, st, child).await?;
                }
                SupCommand::RestartAll { reason } => {
                    tracing::warn!("{reason}");
                    for cell in [st.coord.take(), st.node.take()].into_iter().flatten() {
                        cell.kill();
                    }
                    Root::spawn(myself, st, Child::Node).await?;
                    Root::spawn(myself, st, Child::Coordinator).await?;
                }
                SupCommand::Escalate { reason } | SupCommand::GiveUp { reason } => {
                    tracing::error!("giving up: {reason}");
                    if let Ok(mut f) = st.ctx.fatal.lock() {
                        *f = Some(reason);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Actor for Root {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        a: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let mut st = RootState {
            sup: Supervisor::new("the root", a.ctx.policy, true),
            ctx: a.ctx,
            coord_args: a.coord,
            coord: None,
            node: None,
        };
        // the coordinator first: the ranks report to it as they come up
        Root::spawn(&myself, &mut st, Child::Coordinator).await?;
        Root::spawn(&myself, &mut st, Child::Node).await?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let RootMsg::RestartTimer { token } = msg;
        let cmds = st.sup.on(st.ctx.now_ms(), SupEvent::Timer { token });
        Root::supervise(&myself, st, cmds).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, what)) = is_child_event(&evt) else {
            return Ok(());
        };
        if st.ctx.stopping() {
            return Ok(());
        }
        let child = if st.coord.as_ref().is_some_and(|c| c.get_id() == id) {
            st.coord = None;
            Child::Coordinator
        } else if st.node.as_ref().is_some_and(|n| n.get_id() == id) {
            st.node = None;
            if let Some(c) = st.ctx.book.coord() {
                let _ = c.cast(CoordMsg::AllDown {
                    reason: format!("the node supervisor {what}"),
                });
            }
            Child::Node
        } else {
            return Ok(());
        };
        tracing::warn!("the {child:?} {what}; starting a new one");
        let what = format!("the {child:?} {what}");
        let cmds = st.sup.on(st.ctx.now_ms(), SupEvent::Failed { child, what });
        Root::supervise(&myself, st, cmds).await
    }
}

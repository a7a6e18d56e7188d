//! The control plane as pure machines: every fault-tolerance decision of a run, written once as
//! `on(now, event) -> commands` with no ractor, no tokio, no clock and no threads. Time is an
//! input and timers are commands, so the ractor shells, the thread engine and the simulator all
//! drive the same code.
//!
//! - [`codec`]: every machine message as bytes (postcard in a CRC-checked link envelope).
//! - [`txn`]: the step transaction (open, done, reduce, install, commit; abort and replay).
//! - [`coordinator`]: around the transaction: waiting for down ranks, deadlines, the probe
//!   protocol, restore decisions, give-up.
//! - [`executor`]: which instruction of a rank's program may run next.
//! - [`ops`]: an instruction as stage operations, and where their results go.
//! - [`rank`]: one pipeline rank around its executor (attempt filtering, early buffer, sends,
//!   gradient hand-over, installs).
//! - [`run`]: the loop around steps (LR, evaluation, records, checkpoints, the end).
//! - [`monitor`]: loss-spike rules: the gate a step is judged by, rollback and skip decisions.
//! - [`supervisor`]: restart budgets, backoff timers, subtree restarts and escalation.
//! - [`detector`]: heartbeats and work progress: slow versus dead.

pub mod codec;
pub mod coordinator;
pub mod detector;
pub mod executor;
pub mod monitor;
pub mod ops;
pub mod rank;
pub mod run;
pub mod supervisor;
pub mod txn;

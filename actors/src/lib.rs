//! Coordinating training: the control plane as pure machines ([`core`]), the pipeline schedules,
//! the run state, and behind the default `runtime` feature the training loop, checkpoints and
//! the ractor shells that drive the machines. Without `runtime` this crate has neither ractor nor
//! tokio, so the simulator can depend on the machines alone.

#[cfg(feature = "runtime")]
pub mod bench;
#[cfg(feature = "runtime")]
pub mod checkpoint;
#[cfg(feature = "runtime")]
pub mod cluster;
pub mod core;
#[cfg(feature = "runtime")]
pub mod engine;
#[cfg(feature = "runtime")]
pub mod export;
#[cfg(feature = "runtime")]
pub mod formation;
pub mod inject;
pub mod report;
#[cfg(feature = "runtime")]
pub mod rollback;
pub mod schedule;
#[cfg(feature = "runtime")]
pub mod shell;
pub mod state;
#[cfg(feature = "runtime")]
pub mod trainer;
#[cfg(feature = "runtime")]
pub mod uploader;

//! Coordinating training: the training loop, pipeline schedules, the control plane as pure
//! machines ([`core`]) and the ractor shells that drive them ([`shell`], behind the default
//! `shells` feature: without it this crate has neither ractor nor tokio, so the simulator can
//! depend on the machines alone).

pub mod bench;
pub mod checkpoint;
pub mod core;
pub mod formation;
pub mod schedule;
#[cfg(feature = "shells")]
pub mod shell;
pub mod state;
pub mod trainer;
pub mod uploader;

//! A run as several OS processes on one or many machines: one worker process per pipeline rank
//! and a coordinator, talking over the authenticated TCP link (`transport::tcp`). The control
//! messages ride the same link as the tensors (not ractor_cluster: see the README), each kind
//! under its own envelope tag.
//!
//! - `protocol`: the messages and their blobs (gradients, parameters, activation frames).
//! - `worker`: a worker process driving its rank's `RankMachine`.
//! - `engine`: `ProcessEngine`, the coordinator as a `StepEngine` driving the `Coordinator`
//!   machine, declaring silent or exited processes dead and having them replaced.
//! - `bench`: `phalanx bench transport` (link throughput, bytes per step).
//! - `launch`: `phalanx launch --local N` (start, restart and stop the workers) and the worker
//!   side of `phalanx train` under a launcher, torchrun or Slurm.

pub mod bench;
pub mod engine;
pub mod launch;
pub mod protocol;
pub mod worker;

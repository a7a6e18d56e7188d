//! A run as several OS processes on one or many machines: one worker process per pipeline rank
//! and a coordinator, talking over the authenticated TCP link (`transport::tcp`). The control
//! messages ride the same link as the tensors (not ractor_cluster: see the README), each kind
//! under its own envelope tag.
//!
//! - `protocol`: the messages and their blobs (gradients, parameters, activation frames).
//! - `worker`: a worker process driving its rank's `RankMachine`.
//! - `engine`: `ProcessEngine`, the coordinator as a `StepEngine` driving the `Coordinator`
//!   machine, declaring silent or exited processes dead and having them replaced, mirroring the
//!   committed state on the ranks and rebuilding it from them.
//! - `bench`: `phalanx bench transport` (link throughput, bytes per step).
//! - `launch`: the coordinator and worker sides of `phalanx train` under a launcher, torchrun or
//!   Slurm (environment, rank 0 coordinating, a coordinator rebuilding from the mirrors).
//! - `supervisor`: `phalanx launch --local N`, the process keeper (start, restart, stop).

pub mod bench;
pub mod engine;
pub mod launch;
pub mod protocol;
pub mod supervisor;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set [`interrupted`] instead of killing the process.
pub fn on_interrupt() {
    // SAFETY: the handler only stores to an atomic
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether Ctrl-C or SIGTERM came.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

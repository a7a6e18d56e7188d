//! Coordinating training: the training loop, pipeline schedules and the state machines that decide.
//! Actor shells (ractor) sit on top of the plain state machines here.

pub mod bench;
pub mod checkpoint;
pub mod formation;
pub mod schedule;
pub mod trainer;

//! The simulated world: a discrete-event engine in virtual time that replays failure scenarios
//! at cluster scale with the real control-plane machines of `actors::core` (the
//! `RunController` deciding steps and checkpoints, the `Detector` declaring nodes dead, the
//! `Supervisor` giving restart backoff), so what it predicts is what phalanx would decide.
//!
//! - [`engine`]: the event queue (integer nanoseconds, ties in scheduling order) and seeded
//!   draws, one stream per purpose.
//! - [`scenario`]: a scenario file (`scenarios/*.toml`), checked key by key.
//! - [`failures`]: failure categories and mixes (Llama 3 Table 5), MTTF.
//! - [`cost`]: training FLOPs per token of a DeepSeek-V3 config; step time.
//! - [`detect`]: when a fault is seen: the `Detector`'s verdict, the `Coordinator`'s deadline
//!   and probe.
//! - [`run`]: a whole run under a recovery policy (whole-job restart, actor restart, peer
//!   restore): effective training time, interruptions, lost GPU-hours by cause.
//! - [`comm`]: communication costs: pipeline sends, the node-limited expert all-to-all (FP8
//!   dispatch, BF16 combine), the data-parallel reduction.
//! - [`choreography`]: one step driven through the `Coordinator` and every rank's
//!   `RankMachine` in virtual time.
//! - [`step`]: one step of a scenario's pipeline with cost-model costs (bubble, exposed
//!   communication, Gantt).
//! - [`report`]: the summary of a simulation and its pictures.

pub mod choreography;
pub mod comm;
pub mod cost;
pub mod detect;
pub mod engine;
pub mod failures;
pub mod report;
pub mod run;
pub mod scenario;
pub mod step;

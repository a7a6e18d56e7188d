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
//! - [`run`]: a whole run under a recovery policy (whole-job restart, actor restart, peer
//!   restore): effective training time, interruptions, lost GPU-hours by cause.
//! - [`step`]: one step's pipeline choreography with cost-model costs (bubble, Gantt).
//! - [`report`]: the summary of a simulation and its pictures.

pub mod cost;
pub mod engine;
pub mod failures;
pub mod report;
pub mod run;
pub mod scenario;
pub mod step;

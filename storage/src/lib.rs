//! Keeping state: training data (synthetic corpus, token files), Hugging Face weights, metrics,
//! checkpoints in an object store (with their garbage collection and the one-writer-per-run lease),
//! the run journal.
//! Everything a run reads from or writes to disk goes through this crate.

pub mod checkpoint;
pub mod dataset;
pub mod gc;
pub mod hf;
pub mod journal;
pub mod lease;
pub mod metrics;
pub mod store;

/// The object store crate this one is built on (for callers that put or inspect objects).
pub use object_store;

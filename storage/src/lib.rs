//! Keeping state: training data (synthetic corpus, token files), Hugging Face weights, metrics,
//! checkpoints in an object store (with their garbage collection and the one-writer-per-run lease),
//! the run journal.
//! Everything a run reads from or writes to disk goes through this crate.

#[cfg(feature = "object-store")]
pub mod checkpoint;
pub mod dataset;
#[cfg(feature = "object-store")]
pub mod gc;
pub mod hf;
pub mod journal;
#[cfg(feature = "object-store")]
pub mod lease;
pub mod metrics;
#[cfg(feature = "object-store")]
pub mod store;

/// The object store crate this one is built on (for callers that put or inspect objects).
#[cfg(feature = "object-store")]
pub use object_store;

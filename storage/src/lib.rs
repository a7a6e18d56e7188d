//! Keeping state: training data (synthetic corpus, token files), Hugging Face weights, metrics,
//! checkpoints in an object store, the run journal.
//! Everything a run reads from or writes to disk goes through this crate.

pub mod checkpoint;
pub mod dataset;
pub mod hf;
pub mod journal;
pub mod metrics;
pub mod store;

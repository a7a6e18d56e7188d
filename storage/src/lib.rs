//! Keeping state: training data (synthetic corpus, token files), checkpoints and the run journal.
//! Everything a run reads from or writes to disk goes through this crate.

//! Shared helpers of the actors integration tests: micro-model options in a scratch directory.
//! Every test gets its own output directory so tests can run in parallel.

#![allow(dead_code)]

#[path = "../../../tests/common/sweep.rs"]
mod sweep;
use actors::trainer::TrainOptions;
use kernels::model::{Precision, RunConfig};
use std::path::PathBuf;
use storage::dataset::DataFormat;
use sweep::sweep_stale;

/// Options for a micro run with `layers` decoder blocks, `batch` sequences and `steps` steps.
pub fn micro_options(name: &str, layers: usize, batch: usize, steps: u64) -> TrainOptions {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/micro.toml");
    let mut config = RunConfig::load(std::path::Path::new(path)).expect("configs/micro.toml loads");
    config.model.num_hidden_layers = layers;
    config.training.batch_size = batch;
    config.training.steps = steps;
    config.training.eval_every = steps;
    config.training.eval_batches = 1;
    options(name, path, config)
}

/// Seed 11, synthetic data, f32, no checkpoints, in a fresh scratch directory.
fn options(name: &str, path: &str, config: RunConfig) -> TrainOptions {
    TrainOptions {
        config,
        config_path: path.to_string(),
        seed: 11,
        data: None,
        data_format: DataFormat::Auto,
        out_dir: scratch(name),
        init_from_hf: None,
        precision: Precision::F32,
        checkpoints: None,
        store_outages: Vec::new(),
    }
}

/// A fresh directory under the target's temp area (directories of earlier, finished test
/// processes are removed first).
pub fn scratch(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| sweep_stale("phalanx-actors-"));
    let dir = std::env::temp_dir().join(format!("phalanx-actors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Options for a tiny run (configs/tiny.toml) of `steps` steps, evaluated once at the end.
pub fn tiny_options(name: &str, steps: u64) -> TrainOptions {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tiny.toml");
    let mut config = RunConfig::load(std::path::Path::new(path)).expect("configs/tiny.toml loads");
    config.training.steps = steps;
    config.training.eval_every = steps;
    config.training.eval_batches = 2;
    options(name, path, config)
}

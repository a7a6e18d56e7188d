//! Shared helpers of the actors integration tests: micro-model options in a scratch directory,
//! and the every-fault-kind inject plan.
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

/// The fault kinds and actor types an inject plan names.
pub const KINDS: [&str; 6] = ["panic", "hang", "slow", "drop", "corrupt", "dup"];
pub const ACTORS: [&str; 5] = ["stage", "expert", "gpu", "coordinator", "dataloader"];
pub const PHASES: [&str; 4] = ["forward", "backward", "weight", "optimizer"];

/// One fault of every kind on every actor type, one fault per step from step 2 (30 faults, steps
/// 2..=31), under a 1 s step timeout.
pub fn every_kind_plan() -> String {
    let mut s = String::from("step_timeout_ms = 1000\n");
    let mut step = 2;
    for (a, actor) in ACTORS.iter().enumerate() {
        for (k, kind) in KINDS.iter().enumerate() {
            let phase = if *actor == "dataloader" {
                "forward"
            } else {
                PHASES[(a + k) % 4]
            };
            let rank = if matches!(*actor, "coordinator" | "dataloader") {
                0
            } else {
                (a + k) % 2
            };
            s.push_str(&format!(
                "\n[[fault]]\nat_step = {step}\nactor = \"{actor}\"\nphase = \"{phase}\"\nrank = {rank}\nkind = \"{kind}\"\n"
            ));
            step += 1;
        }
    }
    s
}

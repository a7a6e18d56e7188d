//! FP8 training (`--precision fp8`) against the f32 reference on the same seed and data: the
//! smoothed training loss may differ by at most 2% at step 300 on micro.

use actors::trainer::{TrainOptions, train};
use kernels::model::{Precision, RunConfig};
use std::path::Path;
use storage::dataset::DataFormat;

fn run(precision: Precision) -> Vec<f64> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = RunConfig::load(&root.join("configs/micro.toml")).unwrap();
    config.training.steps = 300;
    let opts = TrainOptions {
        config,
        config_path: "configs/micro.toml".into(),
        seed: 1,
        data: None,
        data_format: DataFormat::Auto,
        out_dir: std::env::temp_dir()
            .join(format!("phalanx-fp8-{}-{precision:?}", std::process::id())),
        init_from_hf: None,
        precision,
        checkpoints: None,
        store_outages: Vec::new(),
    };
    let mut losses = Vec::new();
    train(&opts, |r, _| losses.push(r.loss)).unwrap();
    losses
}

#[test]
fn fp8_tracks_f32_within_two_percent_at_step_300() {
    let f32_losses = run(Precision::F32);
    let fp8_losses = run(Precision::Fp8);
    assert_ne!(
        f32_losses, fp8_losses,
        "fp8 must actually change the arithmetic"
    );
    let smooth = |l: &[f64]| l[250..300].iter().sum::<f64>() / 50.0;
    let (a, b) = (smooth(&f32_losses), smooth(&fp8_losses));
    let gap = (b - a).abs() / a;
    println!(
        "smoothed loss at step 300: f32 {a:.5}, fp8 {b:.5}, gap {:.3}%",
        100.0 * gap
    );
    assert!(
        gap < 0.02,
        "fp8 loss {b} is {:.2}% away from f32 {a}",
        100.0 * gap
    );
    assert!(b < f32_losses[0] * 0.95, "fp8 training must lower the loss");
}

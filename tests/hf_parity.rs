//! Parity with Hugging Face transformers: the micro model's weights, logits, loss and every
//! parameter gradient from `tests/fixtures/make_hf_reference.py` against phalanx's own kernels.

use kernels::model::{Batch, DeepSeekV3, RunConfig};
use std::path::Path;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// max |a − b| / max |b|: the error relative to the tensor's scale.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    diff / scale.max(1e-30)
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    let reference =
        storage::hf::read_f32_tensors(&fixture("hf_micro_reference.safetensors")).unwrap();
    let mut cfg =
        RunConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/micro.toml"))
            .unwrap()
            .model;
    cfg.aux_loss_alpha = 0.0; // HF has no sequence-wise balance loss
    let mut model = DeepSeekV3::new(&cfg, 0.02, 0);
    let mut loaded = 0;
    for (i, name) in model.params.names.clone().iter().enumerate() {
        match reference.get(name) {
            Some((shape, values)) => {
                assert_eq!(shape, &model.params.tensors[i].shape, "{name}");
                model.params.tensors[i].data = values.clone();
                loaded += 1;
            }
            None => assert!(
                name.starts_with("model.layers.2."),
                "{name} missing from the fixture (only MTP may be)"
            ),
        }
    }
    assert_eq!(
        loaded, 53,
        "every HF tensor of the micro model (incl. the routing bias)"
    );
    let (shape, ids) = &reference["inputs.input_ids"];
    let (b, t) = (shape[0], shape[1]);
    let inputs: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
    let targets: Vec<u32> = reference["inputs.targets"]
        .1
        .iter()
        .map(|&v| v as u32)
        .collect();
    let batch = Batch {
        batch: b,
        seq: t,
        inputs,
        targets,
    };

    let logits = model.logits(&batch);
    let e = rel_err(&logits, &reference["outputs.logits"].1);
    println!("logits rel err {e:.2e}");
    assert!(e < 1e-5, "logits differ: {e:.2e}");

    let mut grads = model.params.zeros_like();
    let stats = model.forward_backward(&batch, 0.0, &mut grads);
    let want = reference["outputs.loss"].1[0] as f64;
    let le = (stats.loss - want).abs() / want;
    println!("loss {} vs {want} rel err {le:.2e}", stats.loss);
    assert!(le < 1e-5);

    let mut worst = (0.0, String::new());
    let mut compared = 0;
    for (i, name) in model.params.names.iter().enumerate() {
        let Some((_, g)) = reference.get(&format!("grad.{name}")) else {
            assert!(
                !model.params.trainable[i] || name.starts_with("model.layers.2."),
                "no reference gradient for {name}"
            );
            continue;
        };
        let e = rel_err(&grads[i].data, g);
        assert!(e < 1e-4, "gradient of {name} differs: {e:.2e}");
        if e > worst.0 {
            worst = (e, name.clone());
        }
        compared += 1;
    }
    println!(
        "{compared} gradients compared; worst rel err {:.2e} ({})",
        worst.0, worst.1
    );
    assert_eq!(compared, 52, "53 tensors minus the routing bias buffer");
}

#[test]
fn eval_of_hf_directories_matches_transformers() {
    for dir in ["hf-micro", "hf-micro-bf16"] {
        let (model, report) = storage::hf::load_dir(&fixture(dir), 0).unwrap();
        assert!(
            report
                .fresh
                .iter()
                .all(|n| n.starts_with("model.layers.2.")),
            "{:?}",
            report.fresh
        );
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(dir).join("expected_eval.json")).unwrap(),
        )
        .unwrap();
        let seq = expected["seq_len"].as_u64().unwrap() as usize;
        let data = storage::dataset::Dataset::open(
            &fixture(dir).join("tokens.u32"),
            storage::dataset::DataFormat::U32,
            64,
        )
        .unwrap();
        let tokens = data.all_tokens();
        let windows: Vec<&[u32]> = tokens.chunks_exact(seq + 1).collect();
        assert_eq!(windows.len() as u64, expected["windows"].as_u64().unwrap());
        let loss = windows
            .iter()
            .map(|w| model.eval_loss(&Batch::from_windows(w, 1, seq)))
            .sum::<f64>()
            / windows.len() as f64;
        let want = expected["loss"].as_f64().unwrap();
        println!("{dir}: loss {loss} vs transformers {want}");
        assert!((loss - want).abs() / want < 1e-5);
    }
}

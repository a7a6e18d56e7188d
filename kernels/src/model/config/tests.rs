//! Tests of config loading: HF names, defaults, and the errors that name file and field.
use super::*;

fn cfg(name: &str) -> RunConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name);
    RunConfig::load(&path).unwrap()
}

#[test]
fn to_toml_reads_back_equal() {
    for name in [
        "micro.toml",
        "tiny.toml",
        "small.toml",
        "medium.toml",
        "deepseek-v3-671b.toml",
    ] {
        let c = cfg(name);
        let back = RunConfig::parse(&c.to_toml(), name).unwrap();
        assert_eq!(back, c, "{name}");
    }
}

#[test]
fn parameter_counts_match_reference() {
    let tiny = cfg("tiny.toml").model.param_counts();
    assert_eq!(
        (tiny.main, tiny.mtp, tiny.total()),
        (1_744_432, 504_560, 2_248_992)
    );
    assert_eq!(tiny.active, 859_648);
    let micro = cfg("micro.toml").model.param_counts();
    assert_eq!((micro.main, micro.total()), (30_184, 49_328));
    let full = cfg("deepseek-v3-671b.toml").model.param_counts();
    assert_eq!(full.main, 671_026_419_200);
    assert_eq!(full.mtp, 11_610_068_224);
    assert_eq!(full.active, 37_552_282_624);
    assert_eq!(full.main + full.mtp, 682_636_487_424);
    // medium (issue 12: hidden 2048, ≥ 16 layers, ≥ 64 routed experts, about 2–4B parameters)
    let m = cfg("medium.toml").model;
    assert_eq!(m.hidden_size, 2048);
    assert!(m.num_hidden_layers >= 16 && m.n_routed_experts >= 64);
    let mc = m.param_counts();
    assert_eq!((mc.main, mc.mtp), (3_467_598_784, 227_552_576));
    assert_eq!(mc.active, 730_814_464);
    assert!((2_000_000_000..=4_000_000_000).contains(&mc.total()));
}

#[test]
fn yarn_softmax_scale() {
    let full = cfg("deepseek-v3-671b.toml").model;
    assert!((full.softmax_scale() - 0.135_233_78).abs() < 1e-6);
    assert!((cfg("tiny.toml").model.softmax_scale() - 0.144_338).abs() < 1e-5);
}

fn micro_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/micro.toml");
    std::fs::read_to_string(path).unwrap()
}

fn refused(text: &str) -> ConfigError {
    RunConfig::parse(text, "bad.toml").unwrap_err()
}

#[test]
fn inconsistent_fields_are_named() {
    let t = micro_text();
    let e = refused(&t.replace("n_group = 4", "n_group = 3"));
    assert_eq!(e.field, "n_group");
    assert!(
        e.to_string().starts_with("bad.toml: field `n_group`"),
        "{e}"
    );
    let e = refused(&t.replace("topk_group = 2", "topk_group = 5"));
    assert_eq!(e.field, "topk_group");
    let e = refused(&t.replace("hidden_size = 32\n", ""));
    assert_eq!(e.field, "hidden_size");
    assert!(e.message.contains("missing"), "{e}");
    let e = refused(&format!("colour = 3\n{t}"));
    assert_eq!(e.field, "colour");
    let e = refused(&t.replace("seq_len = 16", "seq_len = 16\nsteps_per_epoch = 3"));
    assert_eq!(e.field, "training.steps_per_epoch");
    let e = refused(&t.replace("hidden_size = 32", "hidden_size = \"wide\""));
    assert_eq!(e.field, "hidden_size", "{e}");
    let e = refused("not toml [");
    assert!(e.message.contains("TOML"));
}

#[test]
fn bad_training_values_are_refused_naming_the_field() {
    let t = micro_text();
    let with = |line: &str| refused(&t.replace("seq_len = 16", &format!("seq_len = 16\n{line}")));
    for (line, field) in [
        ("eval_every = 0", "training.eval_every"),
        ("eval_batches = 0", "training.eval_batches"),
        ("beta2 = 1.0", "training.beta2"),
        ("beta1 = -0.1", "training.beta1"),
        ("grad_clip = -1.0", "training.grad_clip"),
        ("adam_eps = 0.0", "training.adam_eps"),
        ("weight_decay = -0.5", "training.weight_decay"),
        ("min_lr_ratio = 2.0", "training.min_lr_ratio"),
        ("spike_loss_factor = 0.5", "training.spike_loss_factor"),
        ("spike_window = 0", "training.spike_window"),
        ("rollback_skip_steps = 0", "training.rollback_skip_steps"),
        ("rollback_lr_factor = 2.0", "training.rollback_lr_factor"),
        ("spike_ema_decay = 1.0", "training.spike_ema_decay"),
    ] {
        let e = with(line);
        assert_eq!(e.field, field, "{line}: {e}");
    }
    // a sequence longer than the model's positions
    let e = refused(&t.replace("seq_len = 16", "seq_len = 100000"));
    assert_eq!(e.field, "training.seq_len");
    assert!(e.message.contains("max_position_embeddings"), "{e}");
    // zero turns clipping and decay off: allowed
    RunConfig::parse(
        &t.replace("seq_len = 16", "seq_len = 16\ngrad_clip = 0.0"),
        "ok.toml",
    )
    .expect("grad_clip = 0 is allowed");
}

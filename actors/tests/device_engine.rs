//! The training loop around the device step (`actors::engine::DeviceEngine`) on the CPU backend:
//! the same run as the plain CPU loop, bit for bit (losses, evaluations, final parameters),
//! including the host copies the loop reads (evaluations between steps, checkpoints) and a resume
//! from the device run's own checkpoints, which reloads parameters and moments onto the device.

mod common;

use actors::engine::{train_on_device, train_on_device_over};
use actors::trainer::{self, CheckpointPlan, TrainSummary};
use kernels::device::backend::{Cpu, GemmPrecision};

fn runs_alike(a: &TrainSummary, b: &TrainSummary) {
    assert_eq!(a.params_sha256, b.params_sha256);
    assert_eq!(a.final_loss.to_bits(), b.final_loss.to_bits());
    assert_eq!(a.eval_loss.to_bits(), b.eval_loss.to_bits());
    assert_eq!(a.initial_eval_loss.to_bits(), b.initial_eval_loss.to_bits());
}

#[test]
fn device_engine_on_the_cpu_backend_is_the_plain_loop_bitwise() {
    let mut opts = common::micro_options("device-plain", 2, 4, 8);
    opts.config.training.eval_every = 3;
    let want = trainer::train(&opts, |_, _| {}).expect("plain run");
    let mut evals = Vec::new();
    let mut opts_dev = opts.clone();
    opts_dev.out_dir = common::scratch("device-dev");
    let got = train_on_device(&opts_dev, Cpu::new(), 1, |r, _| evals.push(r.eval_loss))
        .expect("device run");
    runs_alike(&got, &want);
    // evaluations ran between steps (each reads the device's parameters back)
    assert_eq!(evals.iter().filter(|e| e.is_some()).count(), 3, "{evals:?}");
    println!("8 steps: {} = plain", got.params_sha256);
}

#[test]
fn device_run_resumes_from_its_checkpoints_to_the_uninterrupted_weights() {
    let opts = common::micro_options("device-whole", 2, 4, 8);
    let whole = trainer::train(&opts, |_, _| {}).expect("uninterrupted plain run");
    let store = common::scratch("device-store");
    let mut first = common::micro_options("device-first", 2, 4, 4);
    first.checkpoints = Some(CheckpointPlan {
        store: store.display().to_string(),
        every: 2,
        resume: false,
        run: None,
    });
    let half = train_on_device(&first, Cpu::new(), 1, |_, _| {}).expect("first half on the device");
    assert_eq!(half.checkpoints, 2, "checkpoints at steps 2 and 4");
    let mut second = common::micro_options("device-second", 2, 4, 8);
    second.checkpoints = Some(CheckpointPlan {
        store: store.display().to_string(),
        every: 0,
        resume: true,
        run: None,
    });
    let rest = train_on_device(&second, Cpu::new(), 1, |_, _| {}).expect("resumed on the device");
    assert_eq!(rest.resumed_from, Some(4));
    assert_eq!(rest.params_sha256, whole.params_sha256);
    println!("4 + 4 steps resumed on the device: {}", rest.params_sha256);
}

/// `--precision fp8` through the device engine (CPU backend) over an f32 baseline: the CPU
/// model's FP8 recipe with BF16 moments, the plain loop's run bit for bit.
#[test]
fn device_engine_runs_the_fp8_recipe_as_the_plain_loop() {
    let mut opts = common::micro_options("device-fp8-plain", 2, 4, 6);
    opts.precision = kernels::model::Precision::Fp8;
    let want = trainer::train(&opts, |_, _| {}).expect("plain fp8 run");
    let mut opts_dev = opts.clone();
    opts_dev.out_dir = common::scratch("device-fp8-dev");
    let got = train_on_device_over(&opts_dev, Cpu::new(), 1, GemmPrecision::F32, |_, _| {})
        .expect("device fp8 run");
    runs_alike(&got, &want);
    let f32_run = trainer::train(&common::micro_options("device-fp8-f32", 2, 4, 6), |_, _| {})
        .expect("f32 run");
    assert_ne!(f32_run.params_sha256, got.params_sha256, "fp8 took effect");
    println!("6 fp8 steps: {} = plain", got.params_sha256);
}

/// `--precision fp8` on a device runs over BF16 (DeepSeek-V3's setup): `train_on_device` is the
/// BF16-baseline run, which leaves the f32-baseline recipe's bits (the head and attention are
/// BF16) and stays near its loss.
#[test]
fn device_fp8_runs_over_a_bf16_baseline() {
    let mut opts = common::micro_options("device-fp8-bf16", 2, 4, 6);
    opts.precision = kernels::model::Precision::Fp8;
    let got = train_on_device(&opts, Cpu::new(), 1, |_, _| {}).expect("device fp8 run");
    let mut over = opts.clone();
    over.out_dir = common::scratch("device-fp8-over-bf16");
    let bf16 = train_on_device_over(&over, Cpu::new(), 1, GemmPrecision::Bf16, |_, _| {})
        .expect("fp8 over bf16");
    runs_alike(&got, &bf16);
    over.out_dir = common::scratch("device-fp8-over-f32");
    let f32_base = train_on_device_over(&over, Cpu::new(), 1, GemmPrecision::F32, |_, _| {})
        .expect("fp8 over f32");
    assert_ne!(
        got.params_sha256, f32_base.params_sha256,
        "the baseline took effect"
    );
    let rel = ((got.final_loss - f32_base.final_loss) / f32_base.final_loss).abs();
    assert!(rel < 2e-4, "fp8 over bf16 vs over f32: loss rel {rel:.2e}");
    println!(
        "6 fp8 steps over bf16: {} (loss {:.6} vs {:.6} over f32, rel {rel:.2e})",
        got.params_sha256, got.final_loss, f32_base.final_loss
    );
}

/// Gradient accumulation on the device: a step's batch as 4 micro-batches (the halves summed
/// apart, then ×1/4), the plain loop's micro-batched run bit for bit.
#[test]
fn device_microbatches_are_the_plain_microbatched_run() {
    let opts = common::micro_options("device-mb-plain", 2, 8, 5);
    let want = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("plain micro-batched run");
    let mut opts_dev = opts.clone();
    opts_dev.out_dir = common::scratch("device-mb-dev");
    let got =
        train_on_device(&opts_dev, Cpu::new(), 4, |_, _| {}).expect("device micro-batched run");
    runs_alike(&got, &want);
    let whole = trainer::train(
        &common::micro_options("device-mb-whole", 2, 8, 5),
        |_, _| {},
    )
    .expect("one-batch run");
    assert_ne!(
        whole.params_sha256, got.params_sha256,
        "micro-batches changed the arithmetic"
    );
    println!("5 steps of 4 micro-batches: {} = plain", got.params_sha256);
}

/// `bench train --device … --profile`'s library call on the CPU backend: the profiled extra step
/// names the step's regions, the largest first, with shares of that step.
#[test]
fn the_device_bench_profiles_one_more_step() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/micro.toml");
    let f32 = kernels::model::Precision::F32;
    let r = actors::bench::device_step_throughput(Cpu::new(), &config, 2, 16, 1, true, f32, true)
        .expect("bench");
    let p = r.profile.expect("asked for");
    println!("{}\n{}", p.top, p.table);
    assert!(r.tokens_per_s > 0.0 && p.step_ms > 0.0);
    let lines: Vec<&str> = p.table.lines().collect();
    // a header, 19 regions (micro has dense and MoE layers and MTP) and the rest
    assert_eq!(lines.len(), 1 + 19 + 1, "{}", p.table);
    assert!(lines[0].starts_with("region"));
    assert!(lines[20].starts_with("(outside the regions)"));
    let ms = |l: &str| -> f64 { l.split_whitespace().rev().nth(1).unwrap().parse().unwrap() };
    assert!(
        lines[1..20].windows(2).all(|w| ms(w[0]) >= ms(w[1])),
        "largest first: {}",
        p.table
    );
    assert_eq!(p.top.split("; ").count(), 5, "{}", p.top);
    assert!(p.table.contains("forward: moe routed experts"));
    // without --profile nothing is profiled
    let r = actors::bench::device_step_throughput(Cpu::new(), &config, 2, 16, 1, true, f32, false)
        .expect("bench");
    assert!(r.profile.is_none());
}

//! `--device` on `phalanx train` and `phalanx bench train`: a bad name is refused by the flag
//! parser naming the flag and the value; `cuda` never trains on the CPU in its place. Without the
//! `cuda` feature it says the binary lacks it; with it, on a machine without a driver (CI), it says
//! no CUDA driver was found. (With a GPU, `--device cuda` trains: scripts/gpu-check.sh runs it.)

mod common;

use common::{phalanx, refused};

/// The refusal `--device cuda` must give on this machine and build.
fn assert_cuda_refused(err: &str) {
    assert!(err.starts_with("error: "), "{err}");
    if !cfg!(feature = "cuda") {
        assert!(err.contains("built without `--features cuda`"), "{err}");
    } else if err.contains("no CUDA driver was found") {
        assert!(
            err.contains("no CUDA driver was found (libcuda.so.1 could not be loaded): "),
            "{err}"
        );
    } else {
        panic!("a CUDA driver is present: this test is for machines without one ({err})");
    }
}

#[test]
fn train_on_cuda_is_refused_with_the_reason() {
    for args in [
        &[
            "train",
            "--device",
            "cuda",
            "--steps",
            "1",
            "--no-checkpoint",
        ][..],
        &[
            "train",
            "--device",
            "cuda:1",
            "--steps",
            "1",
            "--no-checkpoint",
        ][..],
        &["bench", "train", "--device", "cuda", "--steps", "1"][..],
        // the formation on GPUs: refused before any rank starts
        &[
            "train",
            "--device",
            "cuda",
            "--pp",
            "2",
            "--schedule",
            "dualpipe",
            "--microbatches",
            "4",
            "--steps",
            "1",
            "--no-checkpoint",
        ][..],
    ] {
        let err = refused(args);
        println!("{args:?}: {err}");
        assert_cuda_refused(&err);
    }
}

#[test]
fn a_bad_device_name_is_a_flag_error() {
    for sub in [&["train"][..], &["bench", "train"][..]] {
        let args: Vec<&str> = sub.iter().copied().chain(["--device", "gpu7"]).collect();
        let o = phalanx(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("'gpu7'") && err.contains("--device"), "{err}");
        assert!(err.contains("expected `cpu`, `cuda` or `cuda:N`"), "{err}");
    }
}

/// BF16 mixed precision is the GPU's: on the CPU it is refused by name instead of training f32.
#[test]
fn bf16_on_the_cpu_is_refused_by_name() {
    let err = refused(&[
        "train",
        "--precision",
        "bf16",
        "--steps",
        "1",
        "--no-checkpoint",
    ]);
    assert!(
        err.contains("--precision bf16 is the GPU's mixed precision (--device cuda)"),
        "{err}"
    );
    let err = refused(&["train", "--precision", "bf32", "--steps", "1"]);
    assert!(err.contains("expected f32, bf16 or fp8"), "{err}");
}

/// `--profile` profiles the device step: on the CPU, and on another benchmark, it is refused by
/// name instead of being ignored.
#[test]
fn profile_outside_the_device_step_is_refused_by_name() {
    for args in [
        &["bench", "train", "--profile", "--steps", "1"][..],
        &["bench", "fp8", "--profile"][..],
    ] {
        let err = refused(args);
        assert!(
            err.contains(
                "--profile is for `bench train --device cuda` (the device step's regions)"
            ),
            "{args:?}: {err}"
        );
    }
}

/// `PHALANX_STAGE_BACKEND=cpu` runs the formation's stage copies through the device-stage path on
/// the CPU backend: the same weights as the CPU model's formation, also with `--ep 2` (whose
/// expert groups then compute on their copy's backend); another value is refused by name before
/// anything runs.
#[test]
fn the_device_stage_path_runs_on_the_cpu_backend_by_environment() {
    let run_with = |name: &str, backend: Option<&str>, extra: &[&str]| {
        let out = common::tmp(name);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"));
        cmd.args(["train", "--config", "configs/micro.toml", "--steps", "3"])
            .args(["--pp", "2", "--schedule", "zb1p", "--microbatches", "4"])
            .args(extra)
            .args(["--no-checkpoint", "--out"])
            .arg(&out)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RUST_LOG", "info");
        if let Some(b) = backend {
            cmd.env("PHALANX_STAGE_BACKEND", b);
        }
        cmd.output().expect("phalanx runs")
    };
    let run = |name: &str, backend: Option<&str>| run_with(name, backend, &[]);
    let sha = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["params_sha256"].as_str().unwrap().to_string()
    };
    let model = run("stage-backend-model", None);
    let dev = run("stage-backend-cpu", Some("cpu"));
    let (want, got) = (sha(&model), sha(&dev));
    println!("device stages on the cpu backend: {got} (cpu model {want})");
    assert_eq!(got, want);
    // every copy of the two ranks said where it computes; the CPU model's run said nothing
    let said = |o: &std::process::Output, what: &str| {
        String::from_utf8_lossy(&o.stderr).matches(what).count()
    };
    let copies = "stage copy computes on cpu";
    assert_eq!((said(&dev, copies), said(&model, copies)), (2, 0));
    let ep = ["--ep", "2"];
    let (model_ep, dev_ep) = (
        run_with("stage-backend-model-ep", None, &ep),
        run_with("stage-backend-cpu-ep", Some("cpu"), &ep),
    );
    let (want, got) = (sha(&model_ep), sha(&dev_ep));
    println!("--ep 2, device stages and groups on the cpu backend: {got} (cpu model {want})");
    assert_eq!(got, want);
    // two groups for each of the two copies
    let groups = "expert group computes on cpu";
    assert_eq!((said(&dev_ep, groups), said(&model_ep, groups)), (4, 0));
    let o = run("stage-backend-bad", Some("gpu"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("PHALANX_STAGE_BACKEND=\"gpu\""), "{err}");
}

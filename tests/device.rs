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

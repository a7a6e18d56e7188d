//! The `phalanx` binary end to end: training summaries, determinism by seed, and precise errors
//! (naming the file and field) for bad configs, data files and flags — never a panic.

mod common;

use common::{phalanx, refused, run_json, tmp, write_config};
use std::process::Command;

fn summary(seed: &str, name: &str) -> serde_json::Value {
    let out = tmp(name);
    let sj = out.join("summary.json");
    let o = phalanx(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--steps",
        "25",
        "--seed",
        seed,
        "--out",
        out.to_str().unwrap(),
        "--summary-json",
        sj.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sj).unwrap()).unwrap();
    assert_eq!(printed, written);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 25);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "mtp_loss",
        "lr",
        "grad_norm",
        "expert_load_max_over_mean",
        "tokens_per_s",
    ] {
        assert!(
            first.get(key).is_some(),
            "metrics line lacks {key}: {first}"
        );
    }
    written
}

#[test]
fn same_seed_same_weights_different_seed_different_weights() {
    let a = summary("1", "a");
    let b = summary("1", "b");
    let c = summary("2", "c");
    for key in [
        "steps",
        "final_loss",
        "eval_loss",
        "tokens_per_s",
        "params_sha256",
    ] {
        assert!(a.get(key).is_some(), "summary lacks {key}");
    }
    assert_eq!(a["params_sha256"], b["params_sha256"]);
    assert_eq!(a["final_loss"], b["final_loss"]);
    assert_ne!(a["params_sha256"], c["params_sha256"]);
    assert!(a["eval_loss"].as_f64().unwrap() < a["initial_eval_loss"].as_f64().unwrap());
}

/// With no --config, `phalanx train` uses the tiny config built into the binary, so it runs from a
/// directory that has no `configs/`.
#[test]
fn default_config_is_built_in() {
    let dir = tmp("elsewhere");
    let o = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args([
            "train",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--seq-len",
            "16",
        ])
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("phalanx runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["config"], "configs/tiny.toml (built in)");
    assert_eq!(s["steps"], 2);
    assert!(dir.join("runs/latest/metrics.jsonl").exists());
}

#[test]
fn bad_input_is_refused_with_the_file_and_field() {
    let c = write_config("groups.toml", |t| t.replace("n_group = 4", "n_group = 3"));
    let e = refused(&["train", "--config", &c, "--steps", "1"]);
    assert!(e.contains("groups.toml") && e.contains("`n_group`"), "{e}");
    let c = write_config("unknown.toml", |t| format!("flux_capacitor = 1\n{t}"));
    let e = refused(&["train", "--config", &c, "--steps", "1"]);
    assert!(
        e.contains("unknown.toml") && e.contains("`flux_capacitor`"),
        "{e}"
    );
    let c = write_config("missing.toml", |t| t.replace("kv_lora_rank = 16\n", ""));
    let e = refused(&["train", "--config", &c, "--steps", "1"]);
    assert!(
        e.contains("missing.toml") && e.contains("kv_lora_rank"),
        "{e}"
    );
    let e = refused(&["train", "--config", "configs/nope.toml"]);
    assert!(e.contains("configs/nope.toml: cannot read"), "{e}");
    let e = refused(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--data",
        "/no/such/corpus.bin",
        "--steps",
        "1",
    ]);
    assert!(e.contains("/no/such/corpus.bin"), "{e}");
    assert_eq!(e.matches("No such file").count(), 1, "the cause once: {e}");
    let e = refused(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--precision",
        "fp16",
        "--steps",
        "1",
    ]);
    assert!(e.contains("--precision"), "{e}");
    let e = refused(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--lr=-1",
        "--steps",
        "1",
    ]);
    assert!(e.contains("training.lr"), "{e}");
    let e = refused(&["eval", "--hf", "/no/such/dir", "--data", "x.u32"]);
    assert!(e.contains("/no/such/dir/config.json"), "{e}");
    let o = phalanx(&["train", "--stepz", "3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--stepz"));
    // values that trained silently (or panicked) before
    let c = write_config("eval0.toml", |t| {
        t.replace("[training]", "[training]\neval_every = 0")
    });
    let e = refused(&["train", "--config", &c, "--steps", "1"]);
    assert!(
        e.contains("eval0.toml") && e.contains("training.eval_every"),
        "{e}"
    );
    let c = write_config("beta2.toml", |t| {
        t.replace("[training]", "[training]\nbeta2 = 1.0")
    });
    let e = refused(&["train", "--config", &c, "--steps", "1"]);
    assert!(e.contains("training.beta2"), "{e}");
    let e = refused(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--seq-len",
        "100000",
        "--steps",
        "1",
    ]);
    assert!(
        e.contains("training.seq_len") && e.contains("max_position_embeddings"),
        "{e}"
    );
    // a resume is the run it continues: flags that would make it another run are refused
    let out = tmp("resume-flags");
    let e = refused(&[
        "resume",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "3",
        "--lr",
        "0.1",
    ]);
    assert!(
        e.contains("--seed, --lr") && e.contains("would change the run"),
        "{e}"
    );
}

#[test]
fn eval_prints_the_loss_of_a_hugging_face_directory() {
    let o = phalanx(&[
        "eval",
        "--hf",
        "tests/fixtures/hf-micro",
        "--data",
        "tests/fixtures/hf-micro/tokens.u32",
        "--seq-len",
        "16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().unwrap();
    let loss: f64 = last.strip_prefix("loss=").unwrap().parse().unwrap();
    assert!((loss - 4.169498).abs() < 1e-5, "{last}");
}

#[test]
fn train_from_hugging_face_weights() {
    let out = tmp("hf");
    let o = phalanx(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--init-from-hf",
        "tests/fixtures/hf-micro",
        "--steps",
        "30",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(s["eval_loss"].as_f64().unwrap() < s["initial_eval_loss"].as_f64().unwrap());
}

#[test]
fn schedule_prints_the_dualpipe_program_and_draws_it() {
    let svg = tmp("schedule").join("dp.svg");
    let o = phalanx(&[
        "schedule",
        "--kind",
        "dualpipe",
        "--ranks",
        "4",
        "--microbatches",
        "8",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("F0 F0 F0 F1 B1* W F1 (F0&B1) (F1&B0) B1 (F1&B0) B1 B0* W B0* W"),
        "{out}"
    );
    assert!(out.contains("bubble"), "{out}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.starts_with("<svg") && drawn.trim_end().ends_with("</svg>"));
    let e = refused(&[
        "schedule",
        "--kind",
        "dualpipe",
        "--ranks",
        "3",
        "--microbatches",
        "8",
    ]);
    assert!(e.contains("even"), "{e}");
}

#[test]
fn injected_faults_heal_to_the_clean_weights() {
    let plan = tmp("inject").join("faults.toml");
    std::fs::write(
        &plan,
        "step_timeout_ms = 1500\n\
         [[fault]]\nat_step = 2\nphase = \"backward\"\nactor = \"stage\"\nrank = 1\nkind = \"panic\"\n\
         [[fault]]\nat_step = 4\nphase = \"forward\"\nactor = \"gpu\"\nrank = 0\nkind = \"hang\"\n",
    )
    .unwrap();
    let run = |extra: &[&str], name: &str| -> serde_json::Value {
        let out = tmp(name);
        let mut args = vec![
            "train",
            "--config",
            "configs/micro.toml",
            "--steps",
            "6",
            "--pp",
            "2",
            "--schedule",
            "1f1b",
            "--microbatches",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = phalanx(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let clean = run(&[], "clean");
    let healed = run(&["--inject", plan.to_str().unwrap()], "healed");
    assert_eq!(healed["params_sha256"], clean["params_sha256"]);
    assert_eq!(healed["restarts"], 2);
    assert_eq!(healed["replayed_steps"], 2);
    let bad = tmp("inject").join("bad.toml");
    std::fs::write(&bad, "[[fault]]\nat_step = 2\nphase = \"lunch\"\nactor = \"stage\"\nrank = 0\nkind = \"panic\"\n").unwrap();
    let e = refused(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--steps",
        "3",
        "--pp",
        "2",
        "--microbatches",
        "4",
        "--inject",
        bad.to_str().unwrap(),
    ]);
    assert!(e.contains("bad.toml") && e.contains("phase"), "{e}");
}

#[test]
fn trains_on_a_raw_text_file() {
    // byte-level tokens from a real text file (this repository's README), tiny's vocab of 512
    let out = tmp("text");
    let o = phalanx(&[
        "train",
        "--config",
        "configs/tiny.toml",
        "--data",
        "README.md",
        "--steps",
        "12",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--lr",
        "0.01",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(s["data"].as_str().unwrap().contains("README.md"), "{s}");
    assert!(
        s["eval_loss"].as_f64().unwrap() < s["initial_eval_loss"].as_f64().unwrap(),
        "{s}"
    );
    // text is one token per byte, so a model with fewer than 256 tokens cannot read it
    let e = refused(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--data",
        "README.md",
        "--steps",
        "1",
    ]);
    assert!(
        e.contains("README.md") && e.contains("vocab_size is 64"),
        "{e}"
    );
}

/// A run killed after its step-10 checkpoint (simulated by deleting the step-20 checkpoint, or
/// by leaving a step-20 shard without its manifest) resumes from the store and ends with the
/// weights of the uninterrupted run, also onto a different pipeline layout. A corrupt shard is
/// refused by name.
#[test]
fn resume_from_the_store_reaches_the_uninterrupted_weights() {
    for (name, layout, resume_layout) in [
        ("plain", vec![], vec![]),
        (
            "pipeline",
            vec!["--pp", "2", "--schedule", "zb1p", "--microbatches", "4"],
            vec!["--pp", "2", "--schedule", "dualpipe", "--microbatches", "4"],
        ),
    ] {
        let out = tmp(&format!("resume-{name}"));
        let _ = std::fs::remove_dir_all(&out);
        let o = out.to_str().unwrap();
        let mut args = vec![
            "train",
            "--config",
            "configs/micro.toml",
            "--steps",
            "20",
            "--ckpt-every",
            "10",
            "--out",
            o,
        ];
        args.extend(&layout);
        let full = run_json(&args);
        assert_eq!(full["checkpoints"], 2, "{name}");
        // checkpoints live under the run's name in the store
        let runs: Vec<_> = std::fs::read_dir(out.join("store"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(runs.len(), 1, "{runs:?}");
        let ckpts = runs[0].join("checkpoints");
        let step20 = ckpts.join("step-0000000020");
        // one shard per pipeline stage, written side by side; the manifest says which holds what
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(ckpts.join("step-0000000010/manifest.json")).unwrap(),
        )
        .unwrap();
        let shards = manifest["shards"].as_array().unwrap();
        assert_eq!(shards.len(), if name == "plain" { 1 } else { 2 }, "{name}");
        let held: usize = shards
            .iter()
            .map(|s| s["tensors"].as_array().unwrap().len())
            .sum();
        assert_eq!(held as u64, manifest["tensors"].as_u64().unwrap(), "{name}");
        // the crash left the step-20 shard but never wrote its manifest
        std::fs::remove_file(step20.join("manifest.json")).unwrap();
        let mut resume = vec!["resume", "--out", o];
        resume.extend(&resume_layout);
        let resumed = run_json(&resume);
        assert_eq!(resumed["resumed_from"], 10, "{name}");
        assert_eq!(resumed["params_sha256"], full["params_sha256"], "{name}");
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, (1..=20).collect::<Vec<_>>(), "{name}");
        // the journal tells both runs apart after the processes are gone
        let o2 = phalanx(&["runs", "--out", o]);
        let listing = String::from_utf8_lossy(&o2.stdout);
        assert!(o2.status.success(), "{listing}");
        assert_eq!(listing.matches(" finished ").count(), 2, "{listing}");
        assert!(
            listing.contains("2 (last 20)") && listing.contains("1 (last 20)"),
            "{listing}"
        );
        assert!(
            listing.contains("resumed from 10") && listing.contains("20/20"),
            "{listing}"
        );
        // nothing left to do: said plainly
        let e = refused(&["resume", "--out", o]);
        assert!(e.contains("at step 20") && e.contains("--steps"), "{e}");
        if name == "plain" {
            // a flipped byte in the newest shard is caught by its checksum
            std::fs::remove_dir_all(&step20).unwrap();
            let dir = ckpts.join("step-0000000010");
            let shard = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .unwrap();
            let mut bytes = std::fs::read(&shard).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x40;
            std::fs::write(&shard, &bytes).unwrap();
            let e = refused(&["resume", "--out", o]);
            assert!(
                e.contains("shard-0-") && e.contains("checksum mismatch"),
                "{e}"
            );
            // `phalanx ckpt` lists the committed step and finds the corrupt shard
            let ls = phalanx(&["ckpt", "ls", "--out", o]);
            let ls_out = String::from_utf8_lossy(&ls.stdout);
            assert!(
                ls.status.success() && ls_out.contains("1 committed: 10"),
                "{ls_out}"
            );
            let v = phalanx(&["ckpt", "verify", "--out", o]);
            let v_out = String::from_utf8_lossy(&v.stdout);
            assert_eq!(v.status.code(), Some(1), "{v_out}");
            assert!(
                v_out.contains("step 10")
                    && v_out.contains("FAILED")
                    && v_out.contains("checksum mismatch"),
                "{v_out}"
            );
        }
    }
}

/// Training twice into the same directory keeps both runs: each checkpoints under its own name
/// in the store, and the journal lists both.
#[test]
fn a_second_run_into_the_same_directory_keeps_the_first() {
    let out = tmp("twice");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    let args = [
        "train",
        "--config",
        "configs/micro.toml",
        "--steps",
        "5",
        "--out",
        o,
    ];
    let a = run_json(&args);
    let b = run_json(&args);
    assert_eq!(a["params_sha256"], b["params_sha256"]);
    assert_eq!(
        (a["checkpoints"].as_u64(), b["checkpoints"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(std::fs::read_dir(out.join("store")).unwrap().count(), 2);
    let listing = String::from_utf8_lossy(&phalanx(&["runs", "--out", o]).stdout).to_string();
    assert_eq!(listing.matches(" finished ").count(), 2, "{listing}");
    // the first run's metrics were kept, not truncated
    assert!(out.join("metrics.1.jsonl").exists() && out.join("metrics.jsonl").exists());
}

/// A real crash: the process is killed (SIGKILL) once its step-100 checkpoint is committed, mid
/// run and possibly mid-upload. `phalanx resume` continues from the newest committed checkpoint
/// and ends with the weights of the run that was never interrupted; the journal shows the
/// killed run as died.
#[test]
fn killed_run_resumes_to_the_uninterrupted_weights() {
    let steps = "3000";
    let clean_out = tmp("kill-clean");
    let _ = std::fs::remove_dir_all(&clean_out);
    let clean = run_json(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--steps",
        steps,
        "--no-checkpoint",
        "--out",
        clean_out.to_str().unwrap(),
    ]);
    let out = tmp("kill");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args([
            "train",
            "--config",
            "configs/micro.toml",
            "--steps",
            steps,
            "--ckpt-every",
            "20",
            "--out",
            o,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let committed = |step: &str| {
        std::fs::read_dir(out.join("store"))
            .ok()
            .is_some_and(|runs| {
                runs.flatten().any(|r| {
                    r.path()
                        .join(format!("checkpoints/step-{step}/manifest.json"))
                        .exists()
                })
            })
    };
    let started = std::time::Instant::now();
    while !committed("0000000100") {
        assert!(started.elapsed().as_secs() < 120, "no step-100 checkpoint");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!committed("0000003000"), "killed before the end");
    let resumed = run_json(&["resume", "--out", o]);
    assert!(resumed["resumed_from"].as_u64().unwrap() >= 100);
    assert_eq!(resumed["params_sha256"], clean["params_sha256"]);
    let listing = String::from_utf8_lossy(&phalanx(&["runs", "--out", o]).stdout).to_string();
    assert!(
        listing.contains(" died ") && listing.contains(" finished "),
        "{listing}"
    );
}

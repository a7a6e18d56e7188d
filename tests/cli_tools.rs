//! The `phalanx` binary's tools around runs: `report` (a run drawn as SVG), `simulate` (a
//! failure scenario at cluster scale) and `ckpt export-hf` (a checkpoint for transformers).

mod common;

use common::{phalanx, refused, run_json, tmp, write_config};

/// `phalanx report` draws a run with a restart (an injected stage panic) and a rollback (an
/// injected learning-rate spike, rejected the step after) and says what it marked; a PNG
/// path is refused.
#[test]
fn report_draws_a_run_with_a_restart_and_a_rollback() {
    let out = tmp("report");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    let cfg = write_config("rollback.toml", |t| {
        t.replace("warmup_steps = 20", "warmup_steps = 2")
            + "rollback_skip_steps = 2\nrollback_ring = 2\n"
    });
    let plan = out.with_extension("inject.toml");
    std::fs::write(
        &plan,
        "[[fault]]\nat_step = 4\nactor = \"stage\"\nrank = 1\n\n\
         [[fault]]\nat_step = 14\nactor = \"dataloader\"\nkind = \"loss_spike\"\nfactor = 1000.0\n",
    )
    .unwrap();
    let s = run_json(&[
        "train",
        "--config",
        &cfg,
        "--steps",
        "20",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--ckpt-every",
        "5",
        "--inject",
        plan.to_str().unwrap(),
        "--out",
        o,
    ]);
    assert_eq!(
        (s["restarts"].as_u64(), s["rollbacks"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(s["skipped_steps"], 2);
    assert!(s["train_tokens_per_s"].as_f64().unwrap() >= s["wall_tokens_per_s"].as_f64().unwrap());
    let r = phalanx(&["report", o]);
    let said = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(
        r.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        said.contains(
            "20 steps, 1 evaluations, 4 checkpoints, 1 restarts, 1 rollbacks (2 steps skipped)"
        ),
        "{said}"
    );
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(
        svg.contains("steps 14..=15 skipped (rolled back to 13)"),
        "{svg}"
    );
    assert!(svg.contains("1 restart(s)") && svg.contains("checkpoint 20"));
    let e = refused(&["report", o, "--out", "x.png"]);
    assert!(e.contains("PNG"), "{e}");
}

/// `phalanx simulate` replays a scenario under the three policies (summary JSON with the keys
/// the README names, an event log, a picture), sweeps a key, and refuses a bad scenario naming
/// the file and the key.
#[test]
fn simulate_replays_a_scenario_and_refuses_a_bad_one() {
    let out = tmp("simulate");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    let s = run_json(&[
        "simulate",
        "simulations/scenarios/rsc-6.5.toml",
        "--out",
        o,
        "--sweep",
        "checkpoint.interval_steps=50,600",
    ]);
    let points = s["results"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for p in points {
        let outcomes = p["outcomes"].as_array().unwrap();
        assert_eq!(outcomes.len(), 3);
        for k in [
            "tokens",
            "wall_hours",
            "gpu_hours",
            "effective_training_time",
            "interruptions",
            "lost_gpu_hours_by_cause",
            "checkpoints",
            "rollbacks",
            "events",
        ] {
            assert!(!outcomes[0][k].is_null(), "{k}");
        }
    }
    // checkpointing more often costs the whole-job policy less rework
    let whole = |i: usize| {
        points[i]["outcomes"][0]["effective_training_time"]
            .as_f64()
            .unwrap()
    };
    assert!(whole(0) > whole(1), "{} vs {}", whole(0), whole(1));
    let log = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    // seed 1 of rsc-6.5: 395 failures, under each of 3 policies and 2 sweep values, each with
    // its recovery line (a failure during a recovery has none of its own)
    assert_eq!(log.matches("\"event\":\"failure\"").count(), 6 * 395);
    assert_eq!(log.lines().count(), 4688);
    assert!(
        std::fs::read_to_string(out.join("ettr.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    let progress = std::fs::read_to_string(out.join("progress.svg")).unwrap();
    assert_eq!(
        progress.matches("<polyline").count(),
        3,
        "a line per policy"
    );
    let bad = out.join("bad.toml");
    let text = std::fs::read_to_string("simulations/scenarios/rsc-6.5.toml")
        .unwrap()
        .replace(
            "rate_per_1000_node_days = 6.5",
            "rate_per_1000_node_days = -1.0",
        );
    std::fs::write(&bad, text).unwrap();
    let e = refused(&["simulate", bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.toml") && e.contains("failures.rate_per_1000_node_days"),
        "{e}"
    );
}

/// `phalanx ckpt export-hf` writes a Hugging Face directory whose loss (`eval --hf`) equals the
/// checkpoint's (`eval --store`); a missing step or directory is refused by name.
/// (`scripts/check_export_hf.py` checks the same directory against transformers, by hand.)
#[test]
fn export_hf_gives_the_checkpoints_loss() {
    let out = tmp("export");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    run_json(&[
        "train",
        "--config",
        "configs/micro.toml",
        "--steps",
        "6",
        "--ckpt-every",
        "3",
        "--out",
        o,
    ]);
    let hf = out.join("hf");
    let e = phalanx(&[
        "ckpt",
        "export-hf",
        "--out",
        o,
        "--step",
        "3",
        hf.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&e.stdout).to_string();
    assert!(e.status.success() && said.contains("step 3"), "{said}");
    assert!(hf.join("config.json").exists() && hf.join("model.safetensors").exists());
    let tokens = out.join("tokens.u32");
    let ids: Vec<u8> = (0..17u32 * 6)
        .flat_map(|i| ((i * 7 + 3) % 64).to_le_bytes())
        .collect();
    std::fs::write(&tokens, ids).unwrap();
    let t = tokens.to_str().unwrap();
    let loss = |args: &[&str]| {
        let r = phalanx(args);
        let text = String::from_utf8_lossy(&r.stdout).to_string();
        assert!(
            r.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&r.stderr)
        );
        text.lines()
            .find(|l| l.starts_with("loss="))
            .unwrap()
            .to_string()
    };
    let store = out.join("store");
    let from_store = loss(&[
        "eval",
        "--store",
        store.to_str().unwrap(),
        "--step",
        "3",
        "--data",
        t,
        "--seq-len",
        "16",
    ]);
    let from_hf = loss(&[
        "eval",
        "--hf",
        hf.to_str().unwrap(),
        "--data",
        t,
        "--seq-len",
        "16",
    ]);
    assert_eq!(from_store, from_hf);
    let e = refused(&[
        "ckpt",
        "export-hf",
        "--out",
        o,
        "--step",
        "4",
        hf.to_str().unwrap(),
    ]);
    assert!(e.contains("step 4"), "{e}");
    let e = refused(&["ckpt", "export-hf", "--out", o]);
    assert!(e.contains("directory"), "{e}");
}

/// `simulate --calibrate` takes the time per step of a `phalanx train` summary (log lines before
/// it are skipped) and predicts the live scenario's wall time from it; a summary without the
/// fields is refused naming the file and the field.
#[test]
fn simulate_is_calibrated_from_a_train_summary() {
    let dir = tmp("calibrate");
    let summary = dir.join("clean.json");
    std::fs::write(
        &summary,
        "a log line\n{\n  \"steps\": 40,\n  \"wall_seconds\": 20.0\n}\n",
    )
    .unwrap();
    let out = dir.join("sim");
    let v = run_json(&[
        "simulate",
        "simulations/scenarios/live-tiny.toml",
        "--policy",
        "actor-restart",
        "--calibrate",
        summary.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(v["calibrated_step_seconds"], 0.5);
    let o = &v["results"][0]["outcomes"][0];
    assert_eq!(
        (o["steps"].as_u64(), o["interruptions"].as_u64()),
        (Some(40), Some(8))
    );
    // 40 steps of 0.5 s, plus what the eight faults cost: five hangs and drops of 1.915 s
    // (detector, backoff, restart) after 0.075 or 0.25 s of their step, three panics of 15 ms
    // after 0.25, 0.4 and 0.475 s
    let wall = o["wall_hours"].as_f64().unwrap() * 3600.0;
    assert!((wall - 31.47).abs() < 1e-9, "{wall}");
    std::fs::write(&summary, "{\"steps\": 40}").unwrap();
    let e = refused(&[
        "simulate",
        "simulations/scenarios/live-tiny.toml",
        "--calibrate",
        summary.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        e.contains("clean.json") && e.contains("wall_seconds"),
        "{e}"
    );
}

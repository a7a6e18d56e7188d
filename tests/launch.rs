//! `phalanx launch --local 4`: four real worker processes on 127.0.0.1 against the one-process
//! run of the same layout, with workers killed (SIGKILL), frozen (SIGSTOP), cut off the network
//! and their connections closed, for real. The runs take the machine's cores, so they go one at
//! a time.

mod common;

use common::{phalanx, tmp};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const STEPS: &str = "40";
const LAYOUT: [&str; 6] = ["--pp", "4", "--schedule", "dualpipe", "--steps", STEPS];

/// One multi-process run at a time: four workers already fill two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn train_args(out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--config", "configs/tiny.toml"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(LAYOUT.iter().map(|s| s.to_string()));
    a.extend([
        "--out".into(),
        out.display().to_string(),
        "--no-checkpoint".into(),
    ]);
    a
}

/// The same layout in one process.
fn reference() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| {
        let out = tmp("launch-ref");
        let args = train_args(&out);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = phalanx(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["params_sha256"].as_str().unwrap().to_string()
    })
}

/// Starts `phalanx launch --local 4 -- train ...` with extra environment.
fn start(name: &str, env: &[(&str, &str)]) -> (Child, std::path::PathBuf) {
    let out = tmp(name);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phalanx"));
    cmd.args(["launch", "--local", "4", "--"])
        .args(train_args(&out))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    (cmd.spawn().expect("launch starts"), out)
}

fn finish(child: Child) -> serde_json::Value {
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "launch failed: {err}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {err}"))
}

/// The launcher's children as (role, rank, pid), from their environment.
fn children(parent: u32) -> Vec<(String, usize, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let mut f = after.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid != parent || state == "Z" {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let (mut role, mut rank) = (None, None);
        for var in env.split(|&b| b == 0) {
            let var = String::from_utf8_lossy(var);
            if let Some(r) = var.strip_prefix("PHALANX_ROLE=") {
                role = Some(r.to_string());
            } else if let Some(r) = var.strip_prefix("RANK=") {
                rank = r.parse().ok();
            }
        }
        if let (Some(role), Some(rank)) = (role, rank) {
            out.push((role, rank, pid));
        }
    }
    out.sort();
    out
}

/// Worker pids of launcher `parent`, by rank.
fn workers(parent: u32) -> Vec<(usize, u32)> {
    children(parent)
        .into_iter()
        .filter(|c| c.0 == "worker")
        .map(|c| (c.1, c.2))
        .collect()
}

fn coordinator(parent: u32) -> Option<u32> {
    children(parent)
        .into_iter()
        .find(|c| c.0 == "coordinator")
        .map(|c| c.2)
}

fn wait_workers(parent: u32, n: usize) -> Vec<(usize, u32)> {
    let t = Instant::now();
    loop {
        let w = workers(parent);
        if w.len() == n {
            return w;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "workers: {w:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The newest step in the run's metrics.
fn step_of(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|s| s.lines().count() as u64)
        .unwrap_or(0)
}

fn wait_step(out: &Path, step: u64) {
    let t = Instant::now();
    while step_of(out) < step {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "stuck before step {step}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(pid: u32, sig: &str) {
    let s = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success(), "kill {sig} {pid}");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let after = &s[s.rfind(')').map_or(0, |i| i + 2)..];
        !after.starts_with('Z')
    })
}

fn ms_list(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn four_processes_give_the_one_process_weights() {
    let _g = serial();
    let sha = reference();
    let (child, _) = start("launch-plain", &[]);
    let v = finish(child);
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(v["processes_restarted"], 0);
    assert_eq!(v["replayed_steps"], 0);
}

/// The workers' stage copies on the device-stage path (`PHALANX_STAGE_BACKEND=cpu`: the CPU
/// backend behind the code a GPU runs, W deferred as device jobs): the same weights.
#[test]
fn device_stages_in_four_processes_give_the_one_process_weights() {
    let _g = serial();
    let sha = reference();
    let env = [("PHALANX_STAGE_BACKEND", "cpu"), ("RUST_LOG", "info")];
    let (child, _) = start("launch-device-stages", &env);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "launch failed: {err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(v["processes_restarted"], 0);
    // DualPipe over 4 ranks: two stage copies per worker, each on the device-stage path
    assert_eq!(
        err.matches("stage copy computes on cpu").count(),
        8,
        "{err}"
    );
}

#[test]
fn workers_killed_mid_step_are_replaced_one_each_and_the_weights_do_not_change() {
    let _g = serial();
    let sha = reference();
    let (child, out) = start("launch-kill", &[]);
    let launcher = child.id();
    // seeded choices: which rank, and how far into the step (a different phase each time)
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut kills = Vec::new();
    for at in [4u64, 15, 27] {
        let before = wait_workers(launcher, 4);
        wait_step(&out, at);
        std::thread::sleep(Duration::from_millis(next(280)));
        let rank = next(4) as usize;
        let pid = before[rank].1;
        signal(pid, "-KILL");
        kills.push((at, rank, pid));
        // a replacement comes up for that rank only: the others keep their processes
        let t = Instant::now();
        let after = loop {
            let w = workers(launcher);
            if w.len() == 4 && w[rank].1 != pid {
                break w;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no replacement: {w:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in (0..4).filter(|&r| r != rank) {
            assert_eq!(after[r], before[r], "rank {r} was restarted too");
        }
    }
    let v = finish(child);
    let det = ms_list(&v["detections_ms"]);
    let rec = ms_list(&v["recovery_ms"]);
    eprintln!(
        "kills (after step, rank, pid): {kills:?}; detection ms {det:?}; recovery ms {rec:?}"
    );
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(
        v["processes_restarted"],
        kills.len() as u64,
        "one process per kill"
    );
    assert_eq!(det.len(), kills.len());
    // the launcher reports the exit within its 20 ms poll; the silence it ends is at most one
    // 100 ms heartbeat period plus scheduling on two oversubscribed cores (measured 20-96 ms)
    assert!(det.iter().all(|&d| d <= 500), "detections {det:?}");
    assert_eq!(rec.len(), kills.len());
}

#[test]
fn a_frozen_worker_is_replaced_and_told_to_exit_when_it_wakes() {
    let _g = serial();
    let sha = reference();
    let (child, out) = start("launch-stop", &[]);
    let launcher = child.id();
    let before = wait_workers(launcher, 4);
    wait_step(&out, 3);
    let (rank, pid) = before[2];
    signal(pid, "-STOP");
    // frozen until the run has gone on without it (it cannot pass its step before the worker
    // is declared dead and replaced), then woken at once: a fixed freeze could outlast the
    // rest of the run on a fast machine, and the launcher then kills the frozen process first
    let frozen = Instant::now();
    while step_of(&out) <= 3 {
        assert!(
            frozen.elapsed() < Duration::from_secs(60),
            "the run did not go on without the frozen worker"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let froze_for = frozen.elapsed();
    signal(pid, "-CONT");
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the woken worker (rank {rank}) did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = finish(child);
    let det = ms_list(&v["detections_ms"]);
    eprintln!(
        "SIGSTOP {:.1} s: detection ms {det:?}, recovery ms {:?}",
        froze_for.as_secs_f64(),
        v["recovery_ms"]
    );
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(v["processes_restarted"], 1);
    assert_eq!(det.len(), 1);
    // the 2 s bound plus the coordinator's 20 ms watch cadence and a reduce (measured 2,009)
    assert!((2000..2400).contains(&det[0]), "detection {det:?}");
}

#[test]
fn a_killed_coordinator_is_replaced_and_rebuilds_the_run_from_the_ranks() {
    let _g = serial();
    let sha = reference();
    let (child, out) = start("launch-coord", &[]);
    let launcher = child.id();
    let before = wait_workers(launcher, 4);
    let mut killed = Vec::new();
    for at in [6u64, 21] {
        wait_step(&out, at);
        std::thread::sleep(Duration::from_millis(120));
        let pid = coordinator(launcher).expect("a coordinator");
        signal(pid, "-KILL");
        killed.push(pid);
        // the next one comes up; the workers are the same processes
        let t = Instant::now();
        while coordinator(launcher).is_none_or(|p| p == pid) {
            assert!(t.elapsed() < Duration::from_secs(30), "no new coordinator");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(workers(launcher), before, "a worker was restarted");
    }
    let v = finish(child);
    eprintln!(
        "coordinators killed: {killed:?}; summary restarts {}",
        v["coordinator_restarts"]
    );
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(v["coordinator_restarts"], 2);
    assert_eq!(v["processes_restarted"], 0);
    // the metrics have every step once, in order
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=STEPS.parse::<u64>().unwrap()).collect::<Vec<_>>()
    );
}

#[test]
fn a_coordinator_killed_with_a_mirror_falls_back_to_the_store() {
    let _g = serial();
    let sha = reference();
    let out = tmp("launch-coord-store");
    let mut args = train_args(&out);
    args.retain(|a| a != "--no-checkpoint");
    args.extend(["--ckpt-every".to_string(), "5".to_string()]);
    let child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["launch", "--local", "4", "--"])
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let launcher = child.id();
    let ranks = wait_workers(launcher, 4);
    wait_step(&out, 12);
    // the coordinator and rank 2 together: rank 2's mirror dies with its process
    signal(coordinator(launcher).expect("a coordinator"), "-KILL");
    signal(ranks[2].1, "-KILL");
    let v = finish(child);
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(v["coordinator_restarts"], 1);
    assert_eq!(v["processes_restarted"], 1);
    // the newest checkpoint before the kill: step 10 (or 5 if 10 was still uploading)
    let from = v["resumed_from"].as_u64().unwrap();
    assert!(from == 10 || from == 5, "resumed from {from}");
}

#[test]
fn closed_connections_reconnect_without_a_restart() {
    let _g = serial();
    let sha = reference();
    let (child, _) = start(
        "launch-drop",
        &[
            ("PHALANX_NET_FAULT", "drop@8"),
            ("PHALANX_NET_FAULT_RANK", "1"),
        ],
    );
    let v = finish(child);
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(v["processes_restarted"], 0);
    assert_eq!(v["restarts"], 0);
}

#[test]
fn a_partition_past_the_bound_is_a_failed_process() {
    let _g = serial();
    let sha = reference();
    let (child, _) = start(
        "launch-partition",
        &[
            ("PHALANX_NET_FAULT", "partition@8:3000"),
            ("PHALANX_NET_FAULT_RANK", "2"),
        ],
    );
    let v = finish(child);
    assert_eq!(v["params_sha256"], sha);
    assert_eq!(v["processes_restarted"], 1);
    let det = ms_list(&v["detections_ms"]);
    // declared at the 2 s bound, not before, and promptly after it (measured 2,016)
    assert!(det.len() == 1 && (2000..2400).contains(&det[0]), "{det:?}");
}

#[test]
fn ctrl_c_stops_every_process() {
    let _g = serial();
    let (mut child, out) = start("launch-int", &[]);
    let launcher = child.id();
    let procs: Vec<u32> = children_pids(launcher, 5);
    wait_step(&out, 3);
    signal(launcher, "-INT");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the launcher did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !status.success(),
        "an interrupted run must not report success"
    );
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("interrupted"), "{err}");
    let t = Instant::now();
    while procs.iter().any(|&p| alive(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "orphans left: {procs:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids of the launcher's `n` children (coordinator and workers), once all are up.
fn children_pids(parent: u32, n: usize) -> Vec<u32> {
    let t = Instant::now();
    loop {
        let c = children(parent);
        if c.len() == n {
            return c.into_iter().map(|c| c.2).collect();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "children: {c:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn refused_with(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phalanx"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn bad_worlds_are_refused_clearly() {
    let e = refused_with(
        &[],
        &[
            "launch", "--local", "3", "--", "train", "--pp", "4", "--steps", "1",
        ],
    );
    assert!(e.contains("--local 3 but --pp 4"), "{e}");
    let e = refused_with(&[], &["launch", "--local", "2", "--", "eval"]);
    assert!(e.contains("runs `train`"), "{e}");
    let e = refused_with(
        &[("WORLD_SIZE", "3"), ("RANK", "5")],
        &["train", "--steps", "1"],
    );
    assert!(e.contains("RANK 5 is not below WORLD_SIZE 3"), "{e}");
    let e = refused_with(
        &[("WORLD_SIZE", "two"), ("RANK", "0")],
        &["train", "--steps", "1"],
    );
    assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
    let e = refused_with(
        &[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "no-such-host.invalid"),
        ],
        &["train", "--pp", "2", "--steps", "1"],
    );
    assert!(e.contains("no-such-host.invalid"), "{e}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let e = refused_with(
        &[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &closed_port),
            ("PHALANX_COORDINATOR_TIMEOUT_MS", "1500"),
        ],
        &["train", "--pp", "2", "--steps", "1"],
    );
    assert!(
        e.contains(&format!(
            "cannot reach the coordinator at 127.0.0.1:{closed_port}"
        )),
        "{e}"
    );
    let e = refused_with(
        &[("WORLD_SIZE", "2"), ("RANK", "0")],
        &["train", "--pp", "4", "--steps", "1"],
    );
    assert!(e.contains("WORLD_SIZE is 2 but --pp is 4"), "{e}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let e = refused_with(
        &[],
        &[
            "launch", "--local", "2", "--port", &port, "--", "train", "--pp", "2", "--steps", "1",
        ],
    );
    assert!(e.contains("already in use"), "{e}");
}

//! A store that refuses every request for several checkpoint intervals, against real
//! S3-compatible servers on 127.0.0.1: s3s-fs, served in this process, and moto's
//! `moto_server` when it is installed (`pip install "moto[server]"`; skipped with a printed
//! reason when not). The run goes on, the checkpoints that fall into the outage are reported
//! missed, the next ones commit, and a resume from the first one after the outage ends with the
//! uninterrupted run's weights.
//!
//! This file holds one test: it sets the `AWS_*` variables of its process for the `s3://` store.

use actors::formation::{self, InjectPlan, Layout, Wire};
use actors::schedule::ScheduleKind;
use actors::trainer::{CheckpointPlan, TrainOptions};
#[path = "../storage/tests/support/s3_server.rs"]
mod s3_server;

use kernels::model::{Precision, RunConfig};
use s3_server::start_s3;
use storage::checkpoint;
use storage::object_store::ObjectStoreExt;
use storage::store::{Store, block_on};

/// A tiny run of `steps` steps (configs/tiny.toml, seed 11, synthetic data, f32) writing to
/// `out`.
fn tiny_options(out: std::path::PathBuf, steps: u64) -> TrainOptions {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml");
    let mut config = RunConfig::load(std::path::Path::new(path)).expect("configs/tiny.toml loads");
    config.training.steps = steps;
    config.training.eval_every = steps;
    config.training.eval_batches = 2;
    TrainOptions {
        config,
        config_path: path.to_string(),
        seed: 11,
        data: None,
        data_format: storage::dataset::DataFormat::Auto,
        out_dir: out,
        init_from_hf: None,
        precision: Precision::F32,
        checkpoints: None,
        store_outages: Vec::new(),
    }
}

/// `moto_server` on a free port of 127.0.0.1 with bucket `ckpt`, killed when dropped; None
/// (saying why) when moto is not installed or does not come up.
struct Moto(std::process::Child, String);

impl Moto {
    fn start() -> Option<Moto> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let mut moto = Moto(child, format!("http://127.0.0.1:{port}"));
        // up when it answers; then the bucket (moto takes unsigned requests). An installation
        // that does not come up is reported and skipped: s3s-fs has run the scenario already.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = moto.0.try_wait() {
                println!("moto_server exited at start ({status}): skipped");
                return None;
            }
            use std::io::{Read, Write};
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let req = format!(
                    "PUT /ckpt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let mut answer = String::new();
                if c.write_all(req.as_bytes()).is_ok() && c.read_to_string(&mut answer).is_ok() {
                    if !answer.starts_with("HTTP/1.1 200") {
                        let first = answer.lines().next().unwrap_or("");
                        println!("moto_server refused the bucket ({first}): skipped");
                        return None;
                    }
                    return Some(moto);
                }
            }
            if std::time::Instant::now() >= deadline {
                println!("moto_server did not answer within 30 s: skipped");
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_store_outage_misses_checkpoints_and_the_run_goes_on() {
    let root = std::env::temp_dir().join(format!("phalanx-s3-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let endpoint = start_s3(&root.join("s3"));
    outage_against(&endpoint, &root.join("s3s"));
    match Moto::start() {
        Some(moto) => {
            println!("moto_server at {}", moto.1);
            outage_against(&moto.1, &root.join("moto"));
        }
        None => println!("no moto_server: the outage ran against s3s-fs only"),
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// The outage scenario against the S3 endpoint `endpoint` (bucket `ckpt`), the run's metrics
/// under `root`.
fn outage_against(endpoint: &str, root: &std::path::Path) {
    for (k, v) in [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "testtest"),
        ("AWS_REGION", "us-east-1"),
    ] {
        // SAFETY: this test binary has this one test; the threads of an earlier scenario have
        // ended, and the s3s-fs server thread reads no environment
        unsafe { std::env::set_var(k, v) };
    }
    let url = "s3://ckpt/outage";
    let layout = Layout {
        pp: 2,
        ep: 1,
        schedule: ScheduleKind::OneFOneB,
        microbatches: 2,
        wire: Wire::F32,
        compute: Default::default(),
    };
    let mut opts = tiny_options(root.join("run"), 40);
    opts.checkpoints = Some(CheckpointPlan {
        store: url.into(),
        every: 2,
        resume: false,
        run: None,
    });
    // from the start of step 10, every request fails for 4 s: longer than the uploader's five
    // tries (0.1 + 0.2 + 0.4 + 0.8 s of backoff) of a checkpoint
    let plan = InjectPlan::parse(
        "[[fault]]\nat_step = 10\nactor = \"store\"\nkind = \"store_outage\"\nduration_ms = 4000\n",
        "outage.toml",
    )
    .unwrap();
    let full =
        formation::train(&opts, &layout, Some(plan.clone()), |_, _| {}).expect("the run goes on");
    println!(
        "checkpoints committed {}, missed {}, faults {:?}, restarts {}",
        full.checkpoints, full.checkpoints_missed, full.faults_fired, full.restarts
    );
    // the checkpoint of step 10 misses (its five tries span 1.5 s of the 4 s outage) unless
    // step 8's, still uploading, took the outage's first requests; step 8's and step 12's may
    // miss too (12's unless two steps take more than 1.5 s, tiny: 0.4 s each)
    assert!(
        (1..=3).contains(&full.checkpoints_missed),
        "{} missed",
        full.checkpoints_missed
    );
    assert_eq!(full.checkpoints + full.checkpoints_missed, 20);
    assert_eq!(full.faults_fired.get("store_outage"), Some(&1));
    assert_eq!(full.restarts, 0);

    // what the store holds: the committed steps, with a gap where the outage was
    let store = Store::open(url).unwrap();
    let run = block_on(checkpoint::runs(&store)).unwrap().remove(0);
    let mut steps = block_on(checkpoint::committed_steps(&store, &run)).unwrap();
    steps.sort_unstable();
    println!("committed steps: {steps:?}");
    // the checkpoints before the outage committed; the outage can also catch step 8's while it
    // still uploads at the start of step 10 (a slow store: seen against moto on a fast CPU)
    for s in [2, 4, 6] {
        assert!(steps.contains(&s), "the checkpoint of step {s}: {steps:?}");
    }
    let gap: Vec<u64> = (8..=40).step_by(2).filter(|s| !steps.contains(s)).collect();
    assert_eq!(gap.len() as u64, full.checkpoints_missed, "{steps:?}");
    assert!(
        gap.iter().all(|s| (8..=12).contains(s)) && gap.windows(2).all(|w| w[1] == w[0] + 2),
        "the missed checkpoints are those the outage reached, one run of them: {gap:?}"
    );
    let after = *steps
        .iter()
        .find(|&&s| s > gap[gap.len() - 1])
        .expect("a commit after the outage");

    // a crash right after the first commit after the outage: the later manifests are gone
    for &s in steps.iter().filter(|&&s| s > after) {
        let dir = format!("step-{s:010}");
        let key = Store::key(&[run.as_str(), "checkpoints", &dir, "manifest.json"]);
        block_on(store.inner.delete(&key)).unwrap();
    }
    let mut again = opts.clone();
    again.checkpoints.as_mut().unwrap().resume = true;
    let resumed = formation::train(&again, &layout, Some(plan), |_, _| {}).expect("resume");
    println!(
        "resumed from {:?}: {} (uninterrupted {})",
        resumed.resumed_from, resumed.params_sha256, full.params_sha256
    );
    assert_eq!(resumed.resumed_from, Some(after));
    assert_eq!(resumed.params_sha256, full.params_sha256);
}

//! A store that refuses every request for several checkpoint intervals, against a real
//! S3-compatible server on 127.0.0.1 (s3s-fs, served in this process): the run goes on, the
//! checkpoints that fall into the outage are reported missed, the next ones commit, and a resume
//! from the first one after the outage ends with the uninterrupted run's weights.
//!
//! This file holds one test: it sets the `AWS_*` variables of its process for the `s3://` store.

mod common;

use actors::formation::{self, InjectPlan, Layout, Wire};
use actors::schedule::ScheduleKind;
use actors::trainer::CheckpointPlan;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use storage::checkpoint;
use storage::object_store::ObjectStoreExt;
use storage::store::{Store, block_on};

/// Starts s3s-fs over `root` with bucket `ckpt` on a free port; returns the endpoint.
fn start_s3(root: &std::path::Path) -> String {
    std::fs::create_dir_all(root.join("ckpt")).unwrap();
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single("test", "testtest"));
    let service = b.build();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = ConnBuilder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
    });
    format!("http://{addr}")
}

#[test]
fn a_store_outage_misses_checkpoints_and_the_run_goes_on() {
    let root = common::scratch("s3-outage");
    let endpoint = start_s3(&root.join("s3"));
    for (k, v) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "testtest"),
        ("AWS_REGION", "us-east-1"),
    ] {
        // SAFETY: this test binary has this one test; nothing else reads the environment yet
        unsafe { std::env::set_var(k, v) };
    }
    let url = "s3://ckpt/outage";
    let layout = Layout {
        pp: 2,
        ep: 1,
        schedule: ScheduleKind::OneFOneB,
        microbatches: 2,
        wire: Wire::F32,
    };
    let mut opts = common::tiny_options("outage", 40);
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
    assert!(
        full.checkpoints_missed >= 1,
        "the outage made checkpoints miss"
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
    assert!(
        steps.contains(&8),
        "the checkpoint before the outage: {steps:?}"
    );
    let gap: Vec<u64> = (10..=40)
        .step_by(2)
        .filter(|s| !steps.contains(s))
        .collect();
    assert_eq!(gap.len() as u64, full.checkpoints_missed, "{steps:?}");
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

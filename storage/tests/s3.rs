//! Checkpoints through a real S3-compatible server on 127.0.0.1 (s3s-fs, served in this process):
//! multipart shards, create-only manifests (conditional put), listing, verified reads, the run
//! lease (create-only, then If-Match updates) and gc.

use half::bf16;
#[path = "support/s3_server.rs"]
mod s3_server;

use s3_server::start_s3;
use storage::checkpoint::{self, CheckpointError, SnapData, SnapTensor};
use storage::gc::{GcOptions, gc};
use storage::lease::{self, Lease};
use storage::store::{Store, block_on};

fn options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "testtest"),
        ("aws_region", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn tensors(k: f32, n: usize) -> Vec<SnapTensor> {
    vec![
        SnapTensor {
            name: "a.exp_avg".into(),
            shape: vec![n],
            data: SnapData::Bf16((0..n).map(|i| bf16::from_f32(i as f32 - k)).collect()),
        },
        SnapTensor {
            name: "a.weight".into(),
            shape: vec![n / 4, 4],
            data: SnapData::F32((0..n).map(|i| i as f32 * k).collect()),
        },
    ]
}

#[test]
fn checkpoints_round_trip_through_s3_with_create_only_manifests() {
    let root = std::env::temp_dir().join(format!("phalanx-s3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let endpoint = start_s3(&root);
    let store = Store::open_with("s3://ckpt/jobs/one", options(&endpoint)).unwrap();
    // 3.5 M values: a 21 MB shard, uploaded as two multipart parts (16 MiB and the rest)
    let big = tensors(1.0, 3_500_000);
    block_on(async {
        assert!(matches!(
            checkpoint::latest_manifest(&store, None).await,
            Err(CheckpointError::None { .. })
        ));
        checkpoint::write(&store, "run-a", 10, &big, serde_json::json!({"seed": 7}))
            .await
            .unwrap();
        checkpoint::write(
            &store,
            "run-a",
            20,
            &tensors(2.0, 64),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
        assert_eq!(checkpoint::runs(&store).await.unwrap(), ["run-a"]);
        assert_eq!(
            checkpoint::committed_steps(&store, "run-a").await.unwrap(),
            vec![20, 10]
        );
        let m = checkpoint::read_manifest(&store, "run-a", 10)
            .await
            .unwrap();
        assert_eq!(m.meta["seed"], 7);
        assert_eq!(checkpoint::read_tensors(&store, &m).await.unwrap(), big);
        // the server honours If-None-Match: a second commit of step 20 is refused
        let e = checkpoint::write(
            &store,
            "run-a",
            20,
            &tensors(9.0, 64),
            serde_json::Value::Null,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("run-a/checkpoints/step-0000000020/manifest.json"),
            "{e}"
        );
        let m = checkpoint::latest_manifest(&store, None).await.unwrap();
        assert_eq!(m.step, 20);
        assert_eq!(
            checkpoint::read_tensors(&store, &m).await.unwrap(),
            tensors(2.0, 64)
        );
    });
    // the lease: create-only to take it, a conditional (If-Match) update to renew it
    block_on(async {
        let expiry = std::time::Duration::from_secs(60);
        let mut held = Lease::acquire(&store, "run-a", "train", expiry)
            .await
            .unwrap();
        let e = Lease::acquire(&store, "run-a", "train", expiry)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&held.owner().id()), "{e}");
        held.renew().await.unwrap();
        held.renew().await.unwrap();
        held.release().await.unwrap();
        assert!(lease::holder(&store, "run-a").await.unwrap().is_none());
        // gc through S3 (the lease taken and given back): both checkpoints stay under --keep 3;
        // the shard of the refused second commit of step 20 is an orphan
        let report = gc(&store, &GcOptions::default()).await.unwrap();
        assert_eq!(report.runs[0].kept, [20, 10]);
        let removed: Vec<_> = report.removed().collect();
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(
            removed[0]
                .key
                .starts_with("run-a/checkpoints/step-0000000020/shard-0-")
        );
        assert!(removed[0].why.starts_with("orphan"));
        let m = checkpoint::read_manifest(&store, "run-a", 20)
            .await
            .unwrap();
        assert_ne!(removed[0].key, m.shards[0].key);
        assert_eq!(
            checkpoint::read_tensors(&store, &m).await.unwrap(),
            tensors(2.0, 64)
        );
        assert!(lease::holder(&store, "run-a").await.unwrap().is_none());
    });
    // the objects sit under the URL's prefix in the bucket
    assert!(
        root.join("ckpt/jobs/one/run-a/checkpoints/step-0000000010")
            .is_dir()
    );
    // a wrong key is refused by the server, naming the store
    let mut bad = options(&endpoint);
    bad[3].1 = "wrong".into();
    let store = Store::open_with("s3://ckpt/jobs/one", bad).unwrap();
    let e = block_on(checkpoint::latest_manifest(&store, None))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("s3://ckpt/jobs/one"), "{e}");
}

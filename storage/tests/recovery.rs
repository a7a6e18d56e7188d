//! Recovering from a damaged store: resume falls back past corrupt or incomplete checkpoints
//! (and says why), `gc` removes orphans and old checkpoints but never the newest intact one, and
//! the lease keeps a second writer off a run until the first one's lease expires.

use half::bf16;
use object_store::{ObjectStoreExt, PutPayload};
use std::path::{Path, PathBuf};
use std::time::Duration;
use storage::checkpoint::{self, CheckpointError, Depth, SnapData, SnapTensor};
use storage::gc::{GcOptions, gc};
use storage::lease::{self, Lease, LeaseError, Owner};
use storage::store::{Faulty, Store, block_on};

fn tensors(k: f32) -> Vec<SnapTensor> {
    let mut t = vec![
        SnapTensor {
            name: "a.exp_avg".into(),
            shape: vec![64],
            data: SnapData::Bf16((0..64).map(|i| bf16::from_f32(i as f32 - k)).collect()),
        },
        SnapTensor {
            name: "a.weight".into(),
            shape: vec![16, 4],
            data: SnapData::F32((0..64).map(|i| i as f32 * k).collect()),
        },
    ];
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("phalanx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn step_dir(root: &Path, run: &str, step: u64) -> PathBuf {
    root.join(run)
        .join("checkpoints")
        .join(format!("step-{step:010}"))
}

/// The shard file of a checkpoint in a directory store.
fn shard_file(root: &Path, run: &str, step: u64) -> PathBuf {
    std::fs::read_dir(step_dir(root, run, step))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap()
}

fn flip_a_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(file, bytes).unwrap();
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn write(store: &Store, run: &str, step: u64) {
    block_on(checkpoint::write(
        store,
        run,
        step,
        &tensors(step as f32),
        serde_json::json!({"step": step}),
    ))
    .unwrap();
}

#[test]
fn resume_falls_back_past_a_corrupt_newest_checkpoint_and_says_why() {
    let root = fresh_dir("fallback");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    write(&store, "r", 10);
    write(&store, "r", 20);
    let shard20 = shard_file(&root, "r", 20);
    let key20 = format!(
        "r/checkpoints/step-0000000020/{}",
        shard20.file_name().unwrap().to_str().unwrap()
    );
    flip_a_byte(&shard20);

    block_on(async {
        // the flipped byte: step 20 is skipped for its checksum, step 10 is read
        let got = checkpoint::latest_intact(&store, None).await.unwrap();
        assert_eq!((got.manifest.run.as_str(), got.manifest.step), ("r", 10));
        assert_eq!(got.tensors, tensors(10.0));
        assert_eq!(got.skipped.len(), 1, "{:?}", got.skipped);
        let s = &got.skipped[0];
        assert_eq!(
            (s.run.as_str(), s.step, s.key.as_str()),
            ("r", 20, key20.as_str())
        );
        assert!(
            s.reason.contains(&key20) && s.reason.contains("checksum"),
            "{s}"
        );
        assert!(s.to_string().starts_with("skipped run r step 20: "), "{s}");
        // the cheap check (sizes) cannot see a flipped byte; the checksum walk can
        let (m, skipped) = checkpoint::latest_verified(&store, None, Depth::Sizes)
            .await
            .unwrap();
        assert_eq!((m.step, skipped.len()), (20, 0));
        let (m, skipped) = checkpoint::latest_verified(&store, Some("r"), Depth::Checksums)
            .await
            .unwrap();
        assert_eq!((m.step, skipped[0].step), (10, 20));
    });

    // a truncated shard (an incomplete upload) is caught by its size, by the cheap check too
    let bytes = std::fs::read(&shard20).unwrap();
    std::fs::write(&shard20, &bytes[..bytes.len() / 2]).unwrap();
    block_on(async {
        let (m, skipped) = checkpoint::latest_verified(&store, None, Depth::Sizes)
            .await
            .unwrap();
        assert_eq!(m.step, 10);
        assert!(
            skipped[0].reason.contains(&key20) && skipped[0].reason.contains("incomplete"),
            "{:?}",
            skipped
        );
    });
    // a missing shard, and a newer manifest that is not JSON
    std::fs::remove_file(&shard20).unwrap();
    std::fs::create_dir_all(step_dir(&root, "r", 30)).unwrap();
    std::fs::write(step_dir(&root, "r", 30).join("manifest.json"), "{").unwrap();
    block_on(async {
        let got = checkpoint::latest_intact(&store, None).await.unwrap();
        assert_eq!(got.manifest.step, 10);
        let why: Vec<(u64, &str)> = got
            .skipped
            .iter()
            .map(|s| (s.step, s.key.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                (30, "r/checkpoints/step-0000000030/manifest.json"),
                (20, key20.as_str())
            ]
        );
        assert!(
            got.skipped[1].reason.contains("not found"),
            "{:?}",
            got.skipped
        );
    });

    // a newer run whose only checkpoint is corrupt: the older run's is the newest intact one
    write(&store, "s", 5);
    flip_a_byte(&shard_file(&root, "s", 5));
    block_on(async {
        let got = checkpoint::latest_intact(&store, None).await.unwrap();
        assert_eq!((got.manifest.run.as_str(), got.manifest.step), ("r", 10));
        assert_eq!(got.skipped.len(), 3);
        assert_eq!((got.skipped[0].run.as_str(), got.skipped[0].step), ("s", 5));
        // asked for run s by name: nothing intact, and the error lists why
        let e = checkpoint::latest_intact(&store, Some("s"))
            .await
            .unwrap_err();
        assert!(matches!(e, CheckpointError::NoneIntact { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("no intact checkpoint")
                && e.contains("skipped run s step 5")
                && e.contains("checksum"),
            "{e}"
        );
    });

    // a store that cannot be reached is not a corrupt checkpoint: no silent fallback
    let (faulty, switch) = Faulty::wrap(&store, "step-0000000010/shard-0-");
    switch.fail_reads(1);
    let e = block_on(checkpoint::latest_intact(&faulty, Some("r"))).unwrap_err();
    assert!(
        !e.is_broken() && e.to_string().contains("injected failure"),
        "{e}"
    );
    assert_eq!(switch.failed(), 1);
}

#[test]
fn a_retried_commit_whose_first_answer_was_lost_succeeds() {
    let store = Store::open("memory://").unwrap();
    block_on(async {
        let shard = checkpoint::Shard::new(tensors(1.0)).unwrap();
        let meta = serde_json::json!({"seed": 1});
        let first =
            checkpoint::write_shards(&store, "r", 7, std::slice::from_ref(&shard), meta.clone())
                .await
                .unwrap();
        // the same commit again (the first reply was lost): the committed manifest stands, and
        // the retry's own shard (written under a new name) is removed
        let again = checkpoint::write_shards(&store, "r", 7, &[shard], meta)
            .await
            .unwrap();
        assert_eq!(first, again);
        use futures_util::StreamExt;
        use object_store::ObjectStore;
        let dir = object_store::path::Path::from("r/checkpoints/step-0000000007");
        let listed: Vec<_> = store.inner.list(Some(&dir)).collect::<Vec<_>>().await;
        assert_eq!(listed.len(), 2, "the manifest and one shard: {listed:?}");
        // other contents at a committed step are still refused
        let other = checkpoint::Shard::new(tensors(2.0)).unwrap();
        let e = checkpoint::write_shards(
            &store,
            "r",
            7,
            std::slice::from_ref(&other),
            serde_json::Value::Null,
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("step-0000000007/manifest.json"),
            "{e}"
        );
        assert!(e.is_permanent());
    });
}

#[test]
fn a_corrupt_committed_checkpoint_is_replaced_by_a_new_commit_of_its_step() {
    let root = fresh_dir("replace");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    write(&store, "r", 10);
    write(&store, "r", 20);
    let old_shard = shard_file(&root, "r", 20);
    flip_a_byte(&old_shard);
    // the run resumed from step 10 reaches step 20 again, with other weights
    block_on(async {
        let m = checkpoint::write(&store, "r", 20, &tensors(99.0), serde_json::json!({}))
            .await
            .unwrap();
        let got = checkpoint::latest_intact(&store, None).await.unwrap();
        assert_eq!((got.manifest.step, got.skipped.len()), (20, 0));
        assert_eq!(got.manifest, m);
        assert_eq!(got.tensors, tensors(99.0));
    });
    // the corrupt shard is now an orphan that gc removes
    let report = block_on(gc(&store, &GcOptions::default())).unwrap();
    let removed: Vec<&str> = report.removed().map(|r| r.key.as_str()).collect();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].ends_with(old_shard.file_name().unwrap().to_str().unwrap()));
    assert!(!old_shard.exists());
}

#[test]
fn gc_removes_orphans_and_old_checkpoints_and_keeps_the_newest_intact() {
    let root = fresh_dir("gc");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    for step in 1..=5 {
        write(&store, "r", step);
    }
    // step 5 is corrupt; step 6 never committed (a shard without a manifest); step 4 holds a
    // stray object no manifest names
    flip_a_byte(&shard_file(&root, "r", 5));
    block_on(async {
        for (key, len) in [
            (
                "r/checkpoints/step-0000000006/shard-0-0123456789abcdef.safetensors",
                1000,
            ),
            (
                "r/checkpoints/step-0000000004/shard-0-feedfacefeedface.safetensors",
                300,
            ),
        ] {
            let key = object_store::path::Path::from(key);
            store
                .inner
                .put(&key, PutPayload::from(vec![7u8; len]))
                .await
                .unwrap();
        }
    });
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let old: Vec<PathBuf> = [1, 2]
        .iter()
        .flat_map(|&s| files_under(&step_dir(&root, "r", s)))
        .collect();
    assert_eq!(old.len(), 4);
    let want_freed: u64 = old.iter().map(|p| size(p)).sum::<u64>() + 1000 + 300;

    // a dry run lists everything and removes nothing
    let before = files_under(&root);
    let opts = GcOptions {
        keep: 2,
        dry_run: true,
        ..Default::default()
    };
    let dry = block_on(gc(&store, &opts)).unwrap();
    assert_eq!(dry.bytes_freed(), want_freed);
    assert_eq!(files_under(&root), before);

    let opts = GcOptions {
        keep: 2,
        ..Default::default()
    };
    let report = block_on(gc(&store, &opts)).unwrap();
    assert_eq!(report.runs.len(), 1);
    let r = &report.runs[0];
    assert_eq!(r.kept, [4, 3]);
    assert_eq!(r.corrupt.len(), 1);
    assert!(
        r.corrupt[0].step == 5 && r.corrupt[0].reason.contains("checksum"),
        "{:?}",
        r.corrupt
    );
    assert_eq!(report.bytes_freed(), want_freed);
    let mut keys: Vec<&str> = report.removed().map(|x| x.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys.len(), 6, "{keys:?}");
    assert!(
        keys.iter()
            .filter(|k| k.contains("step-0000000001/"))
            .count()
            == 2
    );
    assert!(
        keys.iter()
            .filter(|k| k.contains("step-0000000002/"))
            .count()
            == 2
    );
    assert!(keys.contains(&"r/checkpoints/step-0000000006/shard-0-0123456789abcdef.safetensors"));
    assert!(keys.contains(&"r/checkpoints/step-0000000004/shard-0-feedfacefeedface.safetensors"));
    // an old checkpoint loses its manifest before its shard
    let first_of_1 = report
        .removed()
        .find(|x| x.key.contains("step-0000000001/"))
        .unwrap();
    assert!(first_of_1.key.ends_with("manifest.json"), "{first_of_1:?}");
    assert!(
        report
            .removed()
            .any(|x| x.key.contains("step-0000000006/") && x.why.starts_with("orphan"))
    );
    // on disk: steps 1, 2 and 6 are empty, 3, 4 and 5 (corrupt, newer than the kept ones) stay
    for s in [1, 2, 6] {
        assert!(files_under(&step_dir(&root, "r", s)).is_empty(), "step {s}");
    }
    for s in [3, 4, 5] {
        assert_eq!(files_under(&step_dir(&root, "r", s)).len(), 2, "step {s}");
    }
    // gc released its lease
    assert!(block_on(lease::holder(&store, "r")).unwrap().is_none());
    assert!(!root.join("r/lease.json").exists());

    // --keep 0 keeps the newest intact checkpoint, and says so
    let opts = GcOptions {
        keep: 0,
        ..Default::default()
    };
    let report = block_on(gc(&store, &opts)).unwrap();
    assert_eq!(report.keep, 1);
    assert!(
        report.notes[0].contains("--keep 0 taken as 1"),
        "{:?}",
        report.notes
    );
    assert_eq!(report.runs[0].kept, [4]);
    assert!(files_under(&step_dir(&root, "r", 3)).is_empty());
    let got = block_on(checkpoint::latest_intact(&store, None)).unwrap();
    assert_eq!(got.manifest.step, 4);

    // a live writer holds the run: its orphans (maybe an upload in flight) stay, old
    // checkpoints go
    let writer = block_on(Lease::acquire(&store, "r", "train", lease::DEFAULT_EXPIRY)).unwrap();
    write(&store, "r", 7);
    block_on(async {
        let key = object_store::path::Path::from(
            "r/checkpoints/step-0000000008/shard-0-00000000000000aa.safetensors",
        );
        store
            .inner
            .put(&key, PutPayload::from(vec![1u8; 10]))
            .await
            .unwrap();
    });
    let report = block_on(gc(&store, &opts)).unwrap();
    let r = &report.runs[0];
    assert_eq!(r.kept, [7]);
    assert!(
        r.notes[0].contains("live writer") && r.notes[0].contains(&writer.owner().id()),
        "{:?}",
        r.notes
    );
    // steps 4 and 5 (the corrupt one, now older than the kept one) go
    assert!(
        r.removed
            .iter()
            .all(|x| x.key.contains("step-0000000004/") || x.key.contains("step-0000000005/")),
        "{:?}",
        r.removed
    );
    assert_eq!(r.removed.len(), 4);
    assert_eq!(files_under(&step_dir(&root, "r", 8)).len(), 1);
    // the writer's lease is untouched
    let held = block_on(lease::holder(&store, "r")).unwrap().unwrap();
    assert_eq!(&held.owner, writer.owner());
    block_on(writer.release()).unwrap();

    // a run with no intact checkpoint keeps them all
    write(&store, "q", 1);
    flip_a_byte(&shard_file(&root, "q", 1));
    let opts = GcOptions {
        run: Some("q".into()),
        keep: 1,
        ..Default::default()
    };
    let report = block_on(gc(&store, &opts)).unwrap();
    assert_eq!(report.runs.len(), 1);
    assert!(report.runs[0].removed.is_empty());
    assert!(report.runs[0].notes[0].contains("no intact checkpoint"));
    assert_eq!(files_under(&step_dir(&root, "q", 1)).len(), 2);
}

#[test]
fn a_second_writer_is_refused_until_the_lease_expires() {
    assert_eq!(lease::DEFAULT_EXPIRY, Duration::from_secs(60));
    let dir = fresh_dir("lease");
    for url in ["memory://".to_string(), dir.display().to_string()] {
        let store = Store::open(&url).unwrap();
        let expiry = Duration::from_millis(300);
        block_on(async {
            let mut a = Lease::acquire(&store, "run-1", "train", expiry)
                .await
                .unwrap();
            let a_id = a.owner().id();
            // a second writer of the same run: refused, naming the run and the holder
            let e = Lease::acquire(&store, "run-1", "train", expiry)
                .await
                .unwrap_err();
            assert!(matches!(e, LeaseError::Held { .. }), "{url}: {e}");
            let e = e.to_string();
            assert!(
                e.contains("run run-1") && e.contains(&a_id) && e.contains("already has a writer"),
                "{url}: {e}"
            );
            // another run is free
            let other = Lease::acquire(&store, "run-2", "train", expiry)
                .await
                .unwrap();
            other.release().await.unwrap();
            // renewed in time, it holds
            for _ in 0..3 {
                tokio::time::sleep(expiry / 3).await;
                a.renew().await.unwrap();
            }
            assert!(
                Lease::acquire(&store, "run-1", "train", expiry)
                    .await
                    .is_err()
            );
            // not renewed for longer than the expiry (the holder died or hangs): taken over
            tokio::time::sleep(expiry + Duration::from_millis(100)).await;
            let b = Lease::acquire(&store, "run-1", "train", expiry)
                .await
                .unwrap();
            // the old holder learns it lost the lease, and cannot release the new one
            let e = a.renew().await.unwrap_err();
            assert!(
                matches!(e, LeaseError::Lost { .. }) && e.to_string().contains(&b.owner().id()),
                "{url}: {e}"
            );
            a.release().await.unwrap();
            assert_eq!(
                &lease::holder(&store, "run-1").await.unwrap().unwrap().owner,
                b.owner()
            );
            // released: the next writer gets it at once
            b.release().await.unwrap();
            assert!(lease::holder(&store, "run-1").await.unwrap().is_none());
            let c = Lease::acquire(&store, "run-1", "train", lease::DEFAULT_EXPIRY)
                .await
                .unwrap();
            // a lease with a long expiry is not taken over early
            tokio::time::sleep(expiry + Duration::from_millis(100)).await;
            assert!(Lease::acquire(&store, "run-1", "gc", expiry).await.is_err());
            c.release().await.unwrap();
        });
    }
}

#[test]
fn the_lease_of_a_process_that_is_gone_is_taken_at_once() {
    let me = Owner::this_process("train");
    if me.boot_id.is_none() || me.pid_ns.is_none() {
        eprintln!("no /proc: skipped");
        return;
    }
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let gone = Owner {
        pid: child.id(),
        start_ticks: None,
        ..me
    };
    let store = Store::open("memory://").unwrap();
    block_on(async {
        let held = Lease::acquire_as(&store, "r", gone.clone(), lease::DEFAULT_EXPIRY)
            .await
            .unwrap();
        // alive: refused
        assert!(
            Lease::acquire(&store, "r", "train", lease::DEFAULT_EXPIRY)
                .await
                .is_err()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // killed and reaped, its lease fresh: granted
        let mine = Lease::acquire(&store, "r", "train", lease::DEFAULT_EXPIRY)
            .await
            .unwrap();
        assert_ne!(mine.owner(), held.owner());
        mine.release().await.unwrap();
    });
}

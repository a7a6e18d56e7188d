//! Garbage collection of a checkpoint store: per run, the newest N intact checkpoints stay;
//! older checkpoints go, and so do orphans (objects under `<run>/checkpoints/` that no
//! manifest references: shards of uploads that never committed). The newest intact checkpoint
//! of a run is never removed.

use crate::checkpoint::{self, CheckpointError, CheckpointManifest, Depth, Skipped};
use crate::lease::{self, Lease, LeaseError};
use crate::store::Store;
use futures_util::TryStreamExt;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// What `gc` removes and how it behaves.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Only this run (default: every run in the store).
    pub run: Option<String>,
    /// Intact checkpoints kept per run (0 is taken as 1).
    pub keep: usize,
    /// List what would go, remove nothing.
    pub dry_run: bool,
    /// A writer's lease older than this no longer protects its run's orphans.
    pub lease_expiry: Duration,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            run: None,
            keep: 3,
            dry_run: false,
            lease_expiry: lease::DEFAULT_EXPIRY,
        }
    }
}

/// One removed (or, in a dry run, removable) object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Removed {
    /// Key relative to the store root.
    pub key: String,
    pub bytes: u64,
    /// `orphan` or `step N, older than the newest K intact`.
    pub why: String,
}

/// What `gc` did to one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunGc {
    pub run: String,
    /// The intact checkpoints kept, newest first.
    pub kept: Vec<u64>,
    /// Committed checkpoints found corrupt or incomplete on the way (newer than the oldest kept
    /// one: left in place; older ones are removed with the rest).
    pub corrupt: Vec<Skipped>,
    pub removed: Vec<Removed>,
    pub notes: Vec<String>,
}

/// What `gc` did to the store.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub url: String,
    /// The number of intact checkpoints kept per run (after 0 became 1).
    pub keep: usize,
    pub dry_run: bool,
    pub notes: Vec<String>,
    pub runs: Vec<RunGc>,
}

impl GcReport {
    pub fn removed(&self) -> impl Iterator<Item = &Removed> {
        self.runs.iter().flat_map(|r| r.removed.iter())
    }

    pub fn bytes_freed(&self) -> u64 {
        self.removed().map(|r| r.bytes).sum()
    }
}

/// Removes orphans and checkpoints older than the newest `keep` intact ones, per run (see the
/// module docs). Checkpoints are verified (size and checksum, streamed) newest first until
/// `keep` intact ones are found; a run without any intact checkpoint keeps all its committed
/// checkpoints. Old checkpoints lose their manifest first, so a gc cut short leaves orphans,
/// never a committed checkpoint with missing shards. While gc works on a run it holds the run's
/// lease; a run whose lease another process holds (a live writer) keeps its orphans, since a
/// shard without a manifest may be an upload in flight.
pub async fn gc(store: &Store, opts: &GcOptions) -> Result<GcReport, CheckpointError> {
    let mut report = GcReport {
        url: store.url.clone(),
        keep: opts.keep.max(1),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    if opts.keep == 0 {
        report.notes.push(
            "--keep 0 taken as 1: the newest intact checkpoint of a run is never removed".into(),
        );
    }
    let runs = match &opts.run {
        Some(r) => vec![r.clone()],
        None => checkpoint::runs(store).await?,
    };
    for run in runs {
        report
            .runs
            .push(gc_run(store, &run, report.keep, opts).await?);
    }
    Ok(report)
}

async fn gc_run(
    store: &Store,
    run: &str,
    keep: usize,
    opts: &GcOptions,
) -> Result<RunGc, CheckpointError> {
    let mut out = RunGc {
        run: run.to_string(),
        ..Default::default()
    };
    // the lease: held by us while we remove anything (no writer can start meanwhile)
    let mut lease = None;
    let writer = if opts.dry_run {
        match lease::holder(store, run).await? {
            Some(r)
                if (r.age_ms() as u128)
                    <= opts
                        .lease_expiry
                        .max(Duration::from_millis(r.expiry_ms))
                        .as_millis()
                    && !r.owner.is_gone_here() =>
            {
                Some(r.owner.to_string())
            }
            _ => None,
        }
    } else {
        match Lease::acquire(store, run, "gc", opts.lease_expiry).await {
            Ok(l) => {
                lease = Some(l);
                None
            }
            Err(LeaseError::Held { holder, .. }) => Some(holder),
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(holder) = &writer {
        out.notes.push(format!(
            "run {run} has a live writer, {holder}: its orphans are left alone (a shard without a manifest may be an upload in flight)"
        ));
    }
    let result = collect(store, run, keep, writer.is_none(), &mut out).await;
    let result = match result {
        Ok(()) if !opts.dry_run => remove(store, &out.removed).await,
        other => other,
    };
    if let Some(l) = lease {
        l.release().await?;
    }
    result.map(|()| out)
}

/// Fills `out` with what stays and what goes.
async fn collect(
    store: &Store,
    run: &str,
    keep: usize,
    orphans: bool,
    out: &mut RunGc,
) -> Result<(), CheckpointError> {
    let root = Store::key(&[run, "checkpoints"]);
    let objects: Vec<ObjectMeta> =
        store
            .inner
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(|source| CheckpointError::Store {
                url: store.url.clone(),
                key: root.to_string(),
                source,
            })?;
    // objects by step directory; anything else under checkpoints/ is not ours to judge
    let prefix = format!("{root}/");
    let mut by_step: BTreeMap<u64, Vec<ObjectMeta>> = BTreeMap::new();
    for o in objects {
        let Some((dir, _)) = o
            .location
            .as_ref()
            .strip_prefix(&prefix)
            .and_then(|r| r.split_once('/'))
        else {
            continue;
        };
        if let Some(step) = dir.strip_prefix("step-").and_then(|s| s.parse().ok()) {
            by_step.entry(step).or_default().push(o);
        }
    }
    let manifest_name = |step: u64| checkpoint::manifest_key(run, step).to_string();
    let committed: Vec<u64> = by_step
        .iter()
        .rev()
        .filter(|(step, objs)| {
            let m = manifest_name(**step);
            objs.iter().any(|o| o.location.as_ref() == m)
        })
        .map(|(step, _)| *step)
        .collect();
    // newest first: read manifests, verify until `keep` intact ones are found
    let mut manifests: BTreeMap<u64, CheckpointManifest> = BTreeMap::new();
    let mut unreadable: HashSet<u64> = HashSet::new();
    for &step in &committed {
        if out.kept.len() == keep {
            break;
        }
        let checked = match checkpoint::read_manifest(store, run, step).await {
            Ok(m) => {
                let v = checkpoint::verify(store, &m, Depth::Checksums).await;
                manifests.insert(step, m);
                v
            }
            Err(e) => {
                if e.is_broken() {
                    unreadable.insert(step);
                }
                Err(e)
            }
        };
        match checked {
            Ok(()) => out.kept.push(step),
            Err(e) if e.is_broken() => out.corrupt.push(Skipped {
                run: run.to_string(),
                step,
                key: e.key().unwrap_or_default().to_string(),
                reason: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    let old: Vec<u64> = match out.kept.last() {
        Some(&oldest) => committed.iter().copied().filter(|&s| s < oldest).collect(),
        None => {
            if !committed.is_empty() {
                out.notes.push(format!(
                    "run {run} has no intact checkpoint: its {} committed checkpoint(s) are left in place",
                    committed.len()
                ));
            }
            Vec::new()
        }
    };
    for &step in &old {
        let why = format!(
            "step {step}, older than the newest {} intact",
            out.kept.len()
        );
        // the manifest first: from then on the step is no longer a checkpoint
        let m = manifest_name(step);
        let mut objs: Vec<&ObjectMeta> = by_step[&step].iter().collect();
        objs.sort_by_key(|o| o.location.as_ref() != m);
        out.removed.extend(objs.into_iter().map(|o| Removed {
            key: o.location.to_string(),
            bytes: o.size,
            why: why.clone(),
        }));
    }
    if orphans {
        for (step, objs) in &by_step {
            if old.contains(step) || unreadable.contains(step) {
                continue;
            }
            let m = manifest_name(*step);
            let committed_here = committed.contains(step);
            // a committed step whose manifest was not read (older than what was verified, kept
            // because nothing newer is intact) keeps everything
            let referenced: HashSet<&str> = match manifests.get(step) {
                Some(man) => man.shards.iter().map(|s| s.key.as_str()).collect(),
                None if committed_here => continue,
                None => HashSet::new(),
            };
            for o in objs {
                let key = o.location.as_ref();
                if key != m && !referenced.contains(key) {
                    out.removed.push(Removed {
                        key: key.to_string(),
                        bytes: o.size,
                        why: "orphan: no manifest references it".into(),
                    });
                }
            }
        }
    }
    Ok(())
}

async fn remove(store: &Store, removed: &[Removed]) -> Result<(), CheckpointError> {
    for r in removed {
        let key = object_store::path::Path::from(r.key.as_str());
        match store.inner.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(CheckpointError::Store {
                    url: store.url.clone(),
                    key: r.key.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

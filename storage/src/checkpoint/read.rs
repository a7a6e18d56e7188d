//! Reading checkpoints back: listing runs and committed steps, manifests and shards checked
//! against their sizes and checksums, and the newest intact checkpoint (falling back past corrupt or
//! incomplete ones, saying which and why).

use super::*;

/// The names under `prefix` (the store root when None), like a directory listing.
pub(super) async fn children(
    store: &Store,
    prefix: Option<&ObjPath>,
) -> Result<Vec<String>, CheckpointError> {
    let listing = store
        .inner
        .list_with_delimiter(prefix)
        .await
        .map_err(|source| CheckpointError::Store {
            url: store.url.clone(),
            key: prefix.map(|p| p.to_string()).unwrap_or_default(),
            source,
        })?;
    Ok(listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .collect())
}

/// Runs with a checkpoint directory in the store, newest name first (run names start with
/// their start time).
pub async fn runs(store: &Store) -> Result<Vec<String>, CheckpointError> {
    let mut out = Vec::new();
    for run in children(store, None).await? {
        if children(store, Some(&Store::key(&[&run])))
            .await?
            .iter()
            .any(|c| c == "checkpoints")
        {
            out.push(run);
        }
    }
    out.sort_unstable_by(|a, b| b.cmp(a));
    Ok(out)
}

/// Steps of `run` that have a manifest, newest first (a step whose manifest is missing was
/// never committed and is skipped).
pub async fn committed_steps(store: &Store, run: &str) -> Result<Vec<u64>, CheckpointError> {
    let root = Store::key(&[run, "checkpoints"]);
    let mut steps = Vec::new();
    for d in children(store, Some(&root)).await? {
        let Some(step) = d.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        match store.inner.head(&manifest_key(run, step)).await {
            Ok(_) => steps.push(step),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(CheckpointError::Store {
                    url: store.url.clone(),
                    key: manifest_key(run, step).to_string(),
                    source,
                });
            }
        }
    }
    steps.sort_unstable_by(|a, b| b.cmp(a));
    Ok(steps)
}

/// The manifest of the newest committed checkpoint of `run`, or of the newest run that has one.
pub async fn latest_manifest(
    store: &Store,
    run: Option<&str>,
) -> Result<CheckpointManifest, CheckpointError> {
    let candidates = match run {
        Some(r) => vec![r.to_string()],
        None => runs(store).await?,
    };
    for run in candidates {
        if let Some(&step) = committed_steps(store, &run).await?.first() {
            return read_manifest(store, &run, step).await;
        }
    }
    Err(CheckpointError::None {
        url: store.url.clone(),
    })
}

/// The manifest of the checkpoint of `run` at `step`.
pub async fn read_manifest(
    store: &Store,
    run: &str,
    step: u64,
) -> Result<CheckpointManifest, CheckpointError> {
    let key = manifest_key(run, step);
    let bytes = get(store, &key).await?;
    let m: CheckpointManifest =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(store, &key, format!("{e}")))?;
    if m.format != FORMAT {
        return Err(corrupt(
            store,
            &key,
            format!("format {} (this build reads {FORMAT})", m.format),
        ));
    }
    if m.step != step || m.run != run {
        return Err(corrupt(
            store,
            &key,
            format!(
                "says run {} step {} inside run {run} step {step}'s directory",
                m.run, m.step
            ),
        ));
    }
    Ok(m)
}

/// The tensors of a checkpoint, each shard checked against its size and checksum.
pub async fn read_tensors(
    store: &Store,
    manifest: &CheckpointManifest,
) -> Result<Vec<SnapTensor>, CheckpointError> {
    let mut out = Vec::with_capacity(manifest.tensors);
    for shard in &manifest.shards {
        let key = ObjPath::from(shard.key.as_str());
        let bytes = get(store, &key).await?;
        check_size(store, &key, bytes.len() as u64, shard)?;
        let mut sum = Checksum::for_entry(shard);
        sum.update(&bytes);
        check_sum(store, &key, sum, shard)?;
        let tensors = deserialize(&bytes).map_err(|m| corrupt(store, &key, m))?;
        if !shard.tensors.is_empty() {
            let mut listed = shard.tensors.clone();
            listed.sort();
            if tensors.iter().map(|t| &t.name).ne(listed.iter()) {
                return Err(corrupt(
                    store,
                    &key,
                    "holds other tensors than the manifest lists for it".into(),
                ));
            }
        }
        out.extend(tensors);
    }
    // one list in name order, whatever the shards
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(corrupt(
            store,
            &manifest_key(&manifest.run, manifest.step),
            format!("tensor {} is in two shards", w[0].name),
        ));
    }
    if out.len() != manifest.tensors {
        return Err(corrupt(
            store,
            &manifest_key(&manifest.run, manifest.step),
            format!(
                "lists {} tensors, the shards hold {}",
                manifest.tensors,
                out.len()
            ),
        ));
    }
    Ok(out)
}

pub(super) fn check_size(
    store: &Store,
    key: &ObjPath,
    bytes: u64,
    shard: &ShardEntry,
) -> Result<(), CheckpointError> {
    if bytes == shard.bytes {
        return Ok(());
    }
    Err(corrupt(
        store,
        key,
        format!(
            "incomplete: {bytes} bytes, the manifest says {}",
            shard.bytes
        ),
    ))
}

pub(super) fn check_sum(
    store: &Store,
    key: &ObjPath,
    sum: Checksum,
    shard: &ShardEntry,
) -> Result<(), CheckpointError> {
    let name = sum.name();
    let got = sum.finish();
    if got == shard.checksum() {
        return Ok(());
    }
    Err(corrupt(
        store,
        key,
        format!(
            "checksum mismatch: {name} {got}, the manifest says {}",
            shard.checksum()
        ),
    ))
}

/// Checks that the shards of `manifest` are there and whole: their sizes (one HEAD each), and
/// with [`Depth::Checksums`] their checksums (each shard streamed through it, not kept).
pub async fn verify(
    store: &Store,
    manifest: &CheckpointManifest,
    depth: Depth,
) -> Result<(), CheckpointError> {
    for shard in &manifest.shards {
        let key = ObjPath::from(shard.key.as_str());
        let err = |source| CheckpointError::Store {
            url: store.url.clone(),
            key: key.to_string(),
            source,
        };
        match depth {
            Depth::Sizes => {
                let meta = store.inner.head(&key).await.map_err(err)?;
                check_size(store, &key, meta.size, shard)?;
            }
            Depth::Checksums => {
                let r = store.inner.get(&key).await.map_err(err)?;
                check_size(store, &key, r.meta.size, shard)?;
                let mut stream = r.into_stream();
                let mut hasher = Checksum::for_entry(shard);
                let mut n = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(err)?;
                    n += chunk.len() as u64;
                    hasher.update(&chunk);
                }
                check_size(store, &key, n, shard)?;
                check_sum(store, &key, hasher, shard)?;
            }
        }
    }
    Ok(())
}

/// Logs a skipped checkpoint once per process (a resume looks at the same checkpoints twice:
/// for its config, then for its tensors).
pub(super) fn warn_skipped(store: &Store, s: &Skipped) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = WARNED.get_or_init(Default::default);
    let fresh = seen
        .lock()
        .map(|mut set| set.insert(format!("{} {s}", store.url)))
        .unwrap_or(true);
    if fresh {
        tracing::warn!(
            store = %store.url,
            run = %s.run,
            step = s.step,
            "checkpoint {} is corrupt or incomplete, falling back to an older one: {}",
            s.key,
            s.reason
        );
    }
}

/// Walks the committed checkpoints of `run` (else of every run, newest run first), newest
/// first, and returns what `accept` makes of the first one it accepts, with the ones passed over
/// before it. A checkpoint is passed over (and logged) when its manifest or `accept` reports it
/// broken ([`CheckpointError::is_broken`]); any other error (the store cannot be asked) ends
/// the walk, so a network failure never silently resumes from an older checkpoint.
pub(super) async fn newest_accepted<T, F, Fut>(
    store: &Store,
    run: Option<&str>,
    mut accept: F,
) -> Result<(T, Vec<Skipped>), CheckpointError>
where
    F: FnMut(CheckpointManifest) -> Fut,
    Fut: std::future::Future<Output = Result<T, CheckpointError>>,
{
    let candidates = match run {
        Some(r) => vec![r.to_string()],
        None => runs(store).await?,
    };
    let mut skipped = Vec::new();
    for run in candidates {
        for step in committed_steps(store, &run).await? {
            let checked = match read_manifest(store, &run, step).await {
                Ok(m) => accept(m).await,
                Err(e) => Err(e),
            };
            match checked {
                Ok(t) => return Ok((t, skipped)),
                Err(e) if e.is_broken() => {
                    let s = Skipped {
                        run: run.clone(),
                        step,
                        key: e.key().unwrap_or_default().to_string(),
                        reason: e.to_string(),
                    };
                    warn_skipped(store, &s);
                    skipped.push(s);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(if skipped.is_empty() {
        CheckpointError::None {
            url: store.url.clone(),
        }
    } else {
        CheckpointError::NoneIntact {
            url: store.url.clone(),
            skipped,
        }
    })
}

/// The manifest of the newest committed checkpoint of `run` (else of the newest run that has
/// one) that passes [`verify`] at `depth`, and the newer ones skipped as corrupt or incomplete.
pub async fn latest_verified(
    store: &Store,
    run: Option<&str>,
    depth: Depth,
) -> Result<(CheckpointManifest, Vec<Skipped>), CheckpointError> {
    newest_accepted(store, run, |m| async move {
        verify(store, &m, depth).await.map(|()| m)
    })
    .await
}

/// The newest intact checkpoint: read, verified and decoded.
#[derive(Clone, Debug)]
pub struct Intact {
    pub manifest: CheckpointManifest,
    pub tensors: Vec<SnapTensor>,
    /// Newer committed checkpoints passed over, newest first, each with its reason.
    pub skipped: Vec<Skipped>,
}

/// The newest committed checkpoint of `run` (else of the newest run that has one) whose shards
/// read back whole (size and checksum) and decode: a corrupt or incomplete newer one is skipped,
/// logged with `tracing::warn!` and listed in [`Intact::skipped`]. When none is intact the
/// error ([`CheckpointError::NoneIntact`]) lists every reason.
pub async fn latest_intact(store: &Store, run: Option<&str>) -> Result<Intact, CheckpointError> {
    let ((manifest, tensors), skipped) = newest_accepted(store, run, |m| async move {
        let t = read_tensors(store, &m).await?;
        Ok((m, t))
    })
    .await?;
    Ok(Intact {
        manifest,
        tensors,
        skipped,
    })
}

pub(super) async fn get(store: &Store, key: &ObjPath) -> Result<Vec<u8>, CheckpointError> {
    let err = |source| CheckpointError::Store {
        url: store.url.clone(),
        key: key.to_string(),
        source,
    };
    let r = store.inner.get(key).await.map_err(err)?;
    Ok(r.bytes().await.map_err(err)?.to_vec())
}

pub(super) fn corrupt(store: &Store, key: &ObjPath, message: String) -> CheckpointError {
    CheckpointError::Corrupt {
        url: store.url.clone(),
        key: key.to_string(),
        message,
    }
}

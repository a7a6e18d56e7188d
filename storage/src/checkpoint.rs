//! Checkpoints in an object store, under `<run>/checkpoints/step-<t>/`: a step's tensors as one
//! safetensors shard (named by its SHA-256, uploaded in 5 MiB multipart parts), then a manifest
//! written create-only. No manifest, no checkpoint.

use crate::store::Store;
use futures_util::StreamExt;
use half::bf16;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Multipart part size (S3 requires at least 5 MiB per part but the last).
const PART: usize = 5 << 20;

/// The values of one tensor of a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub enum SnapData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// One named tensor of a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: SnapData,
}

/// One uploaded shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Key relative to the store root.
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The object that makes a checkpoint exist: written last, never overwritten.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    pub format: u32,
    /// The run this checkpoint belongs to (its key prefix in the store).
    pub run: String,
    pub step: u64,
    pub tensors: usize,
    pub shards: Vec<ShardEntry>,
    /// What the trainer needs to continue (config, seed, data, optimizer step …), opaque here.
    pub meta: serde_json::Value,
}

/// A checkpoint that cannot be written or read, naming the object at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{url}/{key}: {source}")]
    Store {
        url: String,
        key: String,
        source: object_store::Error,
    },
    #[error("{url}/{key}: {message}")]
    Corrupt {
        url: String,
        key: String,
        message: String,
    },
    #[error("{url}: no complete checkpoint (no <run>/checkpoints/step-*/manifest.json)")]
    None { url: String },
    #[error("{url}: no intact checkpoint; {}", list_skipped(skipped))]
    NoneIntact { url: String, skipped: Vec<Skipped> },
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
}

impl CheckpointError {
    /// Whether the error says the checkpoint itself is broken (an object corrupt, truncated or
    /// missing) rather than that the store could not be asked (network, permissions …).
    pub fn is_broken(&self) -> bool {
        match self {
            CheckpointError::Corrupt { .. } => true,
            CheckpointError::Store { source, .. } => {
                matches!(source, object_store::Error::NotFound { .. })
            }
            _ => false,
        }
    }

    /// The object at fault, if the error names one.
    pub fn key(&self) -> Option<&str> {
        match self {
            CheckpointError::Store { key, .. } | CheckpointError::Corrupt { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A committed checkpoint passed over because it is corrupt or incomplete, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Skipped {
    pub run: String,
    pub step: u64,
    /// The object at fault (key relative to the store root).
    pub key: String,
    /// What is wrong with it, naming the object (`checksum mismatch …`, `… bytes, the manifest
    /// says …`, `… not found …`, an unreadable manifest).
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "skipped run {} step {}: {}",
            self.run, self.step, self.reason
        )
    }
}

fn list_skipped(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(Skipped::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How far [`verify`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// Every shard is there with the size the manifest gives (one HEAD per shard).
    Sizes,
    /// Every shard is read back (streamed, not kept) and its size and SHA-256 checked.
    Checksums,
}

/// The directory of the checkpoint of `step`.
pub(crate) fn step_dir(step: u64) -> String {
    format!("step-{step:010}")
}

pub(crate) fn manifest_key(run: &str, step: u64) -> ObjPath {
    Store::key(&[run, "checkpoints", &step_dir(step), "manifest.json"])
}

/// A snapshot serialised as one safetensors shard, with its SHA-256: what an upload sends, kept
/// so that a retried upload does not serialise and hash again.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub tensors: usize,
}

/// Serialises `tensors` (in name order) and hashes the result.
pub fn encode(tensors: &[SnapTensor]) -> Result<Encoded, String> {
    let bytes = serialize(tensors)?;
    let sha256 = hex(&Sha256::digest(&bytes));
    Ok(Encoded {
        bytes,
        sha256,
        tensors: tensors.len(),
    })
}

/// Writes the checkpoint of `step`: the shard, then the manifest (create-only: an existing
/// checkpoint of the same step is never replaced). Returns the manifest.
pub async fn write(
    store: &Store,
    run: &str,
    step: u64,
    tensors: &[SnapTensor],
    meta: serde_json::Value,
) -> Result<CheckpointManifest, CheckpointError> {
    let encoded = encode(tensors).map_err(|message| CheckpointError::Corrupt {
        url: store.url.clone(),
        key: format!("{run}/checkpoints/{}", step_dir(step)),
        message,
    })?;
    write_encoded(store, run, step, &encoded, meta).await
}

/// [`write`] of an already encoded snapshot. Safe to call again after a failure: the shard is
/// named by its content, and a manifest already committed with the same shards and meta (a
/// retry whose first commit succeeded but whose answer was lost) counts as this commit. Another
/// committed checkpoint of the step is kept (an error) when it is intact, and replaced when it is
/// corrupt or incomplete (its shards fail [`verify`]).
pub async fn write_encoded(
    store: &Store,
    run: &str,
    step: u64,
    encoded: &Encoded,
    meta: serde_json::Value,
) -> Result<CheckpointManifest, CheckpointError> {
    let err = |key: &ObjPath| {
        let url = store.url.clone();
        let key = key.to_string();
        move |source| CheckpointError::Store { url, key, source }
    };
    let bytes = &encoded.bytes;
    // content-addressed: a second attempt at a committed step never touches the committed shard
    let shard_name = format!("shard-0-{}.safetensors", &encoded.sha256[..16]);
    let shard_key = Store::key(&[run, "checkpoints", &step_dir(step), &shard_name]);
    let upload = store
        .inner
        .put_multipart(&shard_key)
        .await
        .map_err(err(&shard_key))?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
    for part in bytes.chunks(PART) {
        w.wait_for_capacity(4).await.map_err(err(&shard_key))?;
        w.write(part);
    }
    w.finish().await.map_err(err(&shard_key))?;
    let manifest = CheckpointManifest {
        format: FORMAT,
        run: run.to_string(),
        step,
        tensors: encoded.tensors,
        shards: vec![ShardEntry {
            key: shard_key.to_string(),
            bytes: bytes.len() as u64,
            sha256: encoded.sha256.clone(),
        }],
        meta,
    };
    let key = manifest_key(run, step);
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store
        .inner
        .put_opts(&key, PutPayload::from(json), opts)
        .await
    {
        Ok(_) => Ok(manifest),
        Err(source @ object_store::Error::AlreadyExists { .. }) => {
            // what is committed there: this very commit (a retry), an intact other one (kept),
            // or a broken one (replaced: a resume that fell back past it reaches its step again)
            let broken = match read_manifest(store, run, step).await {
                Ok(existing)
                    if existing.shards == manifest.shards
                        && existing.tensors == manifest.tensors
                        && existing.meta == manifest.meta =>
                {
                    return Ok(existing);
                }
                Ok(existing) => match verify(store, &existing, Depth::Checksums).await {
                    Err(e) if e.is_broken() => e,
                    _ => return Err(err(&key)(source)),
                },
                Err(e) if e.is_broken() => e,
                Err(_) => return Err(err(&key)(source)),
            };
            tracing::warn!(
                store = %store.url,
                run,
                step,
                "replacing the corrupt committed checkpoint of step {step} ({broken})"
            );
            let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
            store
                .inner
                .put(&key, PutPayload::from(json))
                .await
                .map_err(err(&key))?;
            Ok(manifest)
        }
        Err(source) => Err(err(&key)(source)),
    }
}

impl CheckpointError {
    /// Whether trying the same write again cannot help: the snapshot does not serialise, or an
    /// intact checkpoint of the step is already committed.
    pub fn is_permanent(&self) -> bool {
        match self {
            CheckpointError::Corrupt { .. } => true,
            CheckpointError::Store { source, .. } => {
                matches!(source, object_store::Error::AlreadyExists { .. })
            }
            _ => false,
        }
    }
}

/// The names under `prefix` (the store root when None), like a directory listing.
async fn children(store: &Store, prefix: Option<&ObjPath>) -> Result<Vec<String>, CheckpointError> {
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

/// The tensors of a checkpoint, each shard checked against its size and SHA-256.
pub async fn read_tensors(
    store: &Store,
    manifest: &CheckpointManifest,
) -> Result<Vec<SnapTensor>, CheckpointError> {
    let mut out = Vec::with_capacity(manifest.tensors);
    for shard in &manifest.shards {
        let key = ObjPath::from(shard.key.as_str());
        let bytes = get(store, &key).await?;
        check_size(store, &key, bytes.len() as u64, shard)?;
        let sha = hex(&Sha256::digest(&bytes));
        check_sha(store, &key, &sha, shard)?;
        out.extend(deserialize(&bytes).map_err(|m| corrupt(store, &key, m))?);
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

fn check_size(
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

fn check_sha(
    store: &Store,
    key: &ObjPath,
    sha: &str,
    shard: &ShardEntry,
) -> Result<(), CheckpointError> {
    if sha == shard.sha256 {
        return Ok(());
    }
    Err(corrupt(
        store,
        key,
        format!(
            "checksum mismatch: SHA-256 {sha}, the manifest says {}",
            shard.sha256
        ),
    ))
}

/// Checks that the shards of `manifest` are there and whole: their sizes (one HEAD each), and
/// with [`Depth::Checksums`] their SHA-256 (each shard streamed through the hash, not kept).
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
                let mut hasher = Sha256::new();
                let mut n = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(err)?;
                    n += chunk.len() as u64;
                    hasher.update(&chunk);
                }
                check_size(store, &key, n, shard)?;
                check_sha(store, &key, &hex(&hasher.finalize()), shard)?;
            }
        }
    }
    Ok(())
}

/// Logs a skipped checkpoint once per process (a resume looks at the same checkpoints twice:
/// for its config, then for its tensors).
fn warn_skipped(store: &Store, s: &Skipped) {
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
async fn newest_accepted<T, F, Fut>(
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
/// read back whole (size and SHA-256) and decode: a corrupt or incomplete newer one is skipped,
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

async fn get(store: &Store, key: &ObjPath) -> Result<Vec<u8>, CheckpointError> {
    let err = |source| CheckpointError::Store {
        url: store.url.clone(),
        key: key.to_string(),
        source,
    };
    let r = store.inner.get(key).await.map_err(err)?;
    Ok(r.bytes().await.map_err(err)?.to_vec())
}

fn corrupt(store: &Store, key: &ObjPath, message: String) -> CheckpointError {
    CheckpointError::Corrupt {
        url: store.url.clone(),
        key: key.to_string(),
        message,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One snapshot tensor seen by the safetensors writer: its values as bytes, borrowed.
struct ShardView<'a>(&'a SnapTensor);

impl safetensors::View for ShardView<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.data {
            SnapData::F32(_) => Dtype::F32,
            SnapData::Bf16(_) => Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        // safetensors stores little-endian values: on a little-endian machine they are the
        // in-memory bytes (the build refuses other targets below)
        match &self.0.data {
            SnapData::F32(v) => bytemuck::cast_slice(v).into(),
            SnapData::Bf16(v) => bytemuck::cast_slice(v).into(),
        }
    }

    fn data_len(&self) -> usize {
        match &self.0.data {
            SnapData::F32(v) => 4 * v.len(),
            SnapData::Bf16(v) => 2 * v.len(),
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("checkpoint shards are written from in-memory bytes: little-endian targets only");

/// The tensors as safetensors bytes, in name order.
fn serialize(tensors: &[SnapTensor]) -> Result<Vec<u8>, String> {
    for t in tensors {
        let n: usize = t.shape.iter().product();
        let len = match &t.data {
            SnapData::F32(v) => v.len(),
            SnapData::Bf16(v) => v.len(),
        };
        if n != len {
            return Err(format!(
                "tensor {}: shape {:?} but {len} values",
                t.name, t.shape
            ));
        }
    }
    safetensors::serialize(
        tensors.iter().map(|t| (t.name.as_str(), ShardView(t))),
        None,
    )
    .map_err(|e| e.to_string())
}

fn deserialize(bytes: &[u8]) -> Result<Vec<SnapTensor>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not safetensors: {e}"))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data = match view.dtype() {
            Dtype::F32 => SnapData::F32(
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::BF16 => SnapData::Bf16(
                d.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            other => return Err(format!("tensor {name}: dtype {other:?} (want F32 or BF16)")),
        };
        out.push(SnapTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::block_on;

    fn tensors(k: f32) -> Vec<SnapTensor> {
        vec![
            SnapTensor {
                name: "a.weight".into(),
                shape: vec![3, 2],
                data: SnapData::F32((0..6).map(|i| i as f32 * k).collect()),
            },
            SnapTensor {
                name: "a.exp_avg".into(),
                shape: vec![6],
                data: SnapData::Bf16((0..6).map(|i| bf16::from_f32(i as f32 - k)).collect()),
            },
        ]
    }

    fn sorted(mut t: Vec<SnapTensor>) -> Vec<SnapTensor> {
        t.sort_by(|a, b| a.name.cmp(&b.name));
        t
    }

    #[test]
    fn round_trip_newest_first_and_create_only() {
        let dir = std::env::temp_dir().join(format!("phalanx-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for url in ["memory://".to_string(), dir.display().to_string()] {
            let store = Store::open(&url).unwrap();
            block_on(async {
                assert!(matches!(
                    latest_manifest(&store, None).await,
                    Err(CheckpointError::None { .. })
                ));
                let seed = serde_json::json!({"seed": 3});
                write(&store, "r1", 5, &tensors(1.0), seed.clone())
                    .await
                    .unwrap();
                write(&store, "r1", 12, &tensors(2.0), seed).await.unwrap();
                assert_eq!(committed_steps(&store, "r1").await.unwrap(), vec![12, 5]);
                let m = latest_manifest(&store, None).await.unwrap();
                assert_eq!((m.step, m.meta["seed"].as_u64()), (12, Some(3)));
                assert_eq!(
                    read_tensors(&store, &m).await.unwrap(),
                    sorted(tensors(2.0))
                );
                // a second commit of the same step is refused; the first stays
                let e = write(&store, "r1", 12, &tensors(9.0), serde_json::Value::Null)
                    .await
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains("r1/checkpoints/step-0000000012/manifest.json"),
                    "{e}"
                );
                let m = read_manifest(&store, "r1", 12).await.unwrap();
                assert_eq!(
                    read_tensors(&store, &m).await.unwrap(),
                    sorted(tensors(2.0))
                );
                // a newer run's checkpoint is the latest; an older run is still reachable by name
                write(&store, "r2", 3, &tensors(3.0), serde_json::Value::Null)
                    .await
                    .unwrap();
                assert_eq!(runs(&store).await.unwrap(), ["r2", "r1"]);
                let m = latest_manifest(&store, None).await.unwrap();
                assert_eq!((m.run.as_str(), m.step), ("r2", 3));
                assert_eq!(latest_manifest(&store, Some("r1")).await.unwrap().step, 12);
            });
        }
    }

    #[test]
    fn uncommitted_and_corrupt_checkpoints() {
        let store = Store::open("memory://").unwrap();
        block_on(async {
            write(&store, "r", 1, &tensors(1.0), serde_json::Value::Null)
                .await
                .unwrap();
            // a shard without a manifest (a crash mid-checkpoint) is not a checkpoint
            let orphan = Store::key(&[
                "r",
                "checkpoints",
                "step-0000000002",
                "shard-0-0.safetensors",
            ]);
            store
                .inner
                .put(&orphan, PutPayload::from(vec![1u8, 2, 3]))
                .await
                .unwrap();
            assert_eq!(committed_steps(&store, "r").await.unwrap(), vec![1]);
            // a flipped byte in the shard is caught by the checksum, naming the object
            let m = read_manifest(&store, "r", 1).await.unwrap();
            let key = ObjPath::from(m.shards[0].key.as_str());
            let mut bytes = get(&store, &key).await.unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            store
                .inner
                .put(&key, PutPayload::from(bytes))
                .await
                .unwrap();
            let e = read_tensors(&store, &m).await.unwrap_err().to_string();
            assert!(e.contains("/shard-0-") && e.contains("SHA-256"), "{e}");
            // a manifest that is not JSON names itself
            let mk = manifest_key("r", 3);
            store
                .inner
                .put(&mk, PutPayload::from(b"{".to_vec()))
                .await
                .unwrap();
            let e = latest_manifest(&store, None).await.unwrap_err().to_string();
            assert!(
                e.contains("r/checkpoints/step-0000000003/manifest.json"),
                "{e}"
            );
        });
    }
}

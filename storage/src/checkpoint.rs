//! Checkpoints in an object store, under `<run>/checkpoints/step-<t>/`: a step's tensors as one
//! safetensors shard (named by its SHA-256, uploaded in 5 MiB multipart parts), then a manifest
//! written create-only. No manifest, no checkpoint.

use crate::store::Store;
use half::bf16;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
}

/// The directory of the checkpoint of `step`.
fn step_dir(step: u64) -> String {
    format!("step-{step:010}")
}

fn manifest_key(run: &str, step: u64) -> ObjPath {
    Store::key(&[run, "checkpoints", &step_dir(step), "manifest.json"])
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
    let err = |key: &ObjPath| {
        let url = store.url.clone();
        let key = key.to_string();
        move |source| CheckpointError::Store { url, key, source }
    };
    let bytes = serialize(tensors).map_err(|message| CheckpointError::Corrupt {
        url: store.url.clone(),
        key: format!("{run}/checkpoints/{}", step_dir(step)),
        message,
    })?;
    let sha256 = hex(&Sha256::digest(&bytes));
    // content-addressed: a second attempt at a committed step never touches the committed shard
    let shard_name = format!("shard-0-{}.safetensors", &sha256[..16]);
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
        tensors: tensors.len(),
        shards: vec![ShardEntry {
            key: shard_key.to_string(),
            bytes: bytes.len() as u64,
            sha256,
        }],
        meta,
    };
    let key = manifest_key(run, step);
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    store
        .inner
        .put_opts(&key, PutPayload::from(json), opts)
        .await
        .map_err(err(&key))?;
    Ok(manifest)
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
        if bytes.len() as u64 != shard.bytes {
            return Err(corrupt(
                store,
                &key,
                format!("{} bytes, the manifest says {}", bytes.len(), shard.bytes),
            ));
        }
        let sha = hex(&Sha256::digest(&bytes));
        if sha != shard.sha256 {
            return Err(corrupt(
                store,
                &key,
                format!("SHA-256 {sha}, the manifest says {}", shard.sha256),
            ));
        }
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

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

mod read;
pub use read::*;

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

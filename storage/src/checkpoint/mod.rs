//! Checkpoints in an object store, under `<run>/checkpoints/step-<t>/`: a step's tensors as
//! safetensors shards (one per owner, streamed in multipart parts), then a manifest written
//! create-only that maps tensors to shards. No manifest, no checkpoint.

use crate::store::Store;
use futures_util::StreamExt;
use half::bf16;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

mod checksum;
mod read;
mod write;
pub use checksum::Checksum;
pub use read::*;
pub use write::*;

/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;

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
    /// The shard's SHA-256 (manifests of earlier builds).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// The shard's CRC-64/NVME, as 16 hex digits (what this build writes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crc64nvme: String,
    /// The tensors it holds (empty in manifests written before shards were per owner).
    #[serde(default)]
    pub tensors: Vec<String>,
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
    /// Every shard is read back (streamed, not kept) and its size and checksum checked.
    Checksums,
}

/// The directory of the checkpoint of `step`.
pub(crate) fn step_dir(step: u64) -> String {
    format!("step-{step:010}")
}

pub(crate) fn manifest_key(run: &str, step: u64) -> ObjPath {
    Store::key(&[run, "checkpoints", &step_dir(step), "manifest.json"])
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
            assert!(
                e.contains("/shard-0-") && e.contains("checksum mismatch: CRC-64/NVME"),
                "{e}"
            );
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

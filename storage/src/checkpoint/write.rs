//! Writing checkpoints: each owner's tensors as one safetensors shard, streamed to the store
//! part by part straight from the snapshot's buffers (no serialised copy), checksummed on another
//! thread while the parts go out; the shards of a step upload side by side; then the manifest,
//! create-only.

use super::*;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

/// Parts of a multipart upload in flight at once, per shard.
const IN_FLIGHT: usize = 4;
/// S3 takes at most this many parts per upload.
const MAX_PARTS: u64 = 10_000;

/// One owner's share of a snapshot, laid out as a safetensors file: the header is built, the
/// values stay in the snapshot's own buffers. Cheap to clone (the tensors are shared), so a
/// retried upload sends the same bytes again; [`Shard::into_tensors`] gives the buffers back for
/// the next snapshot once no upload holds them.
#[derive(Clone, Debug)]
pub struct Shard {
    /// In file order: 4-byte values first (so that every value is aligned), then by name.
    tensors: Arc<Vec<SnapTensor>>,
    header: Bytes,
    bytes: u64,
}

/// One tensor's values as bytes, owned through the shard (for zero-copy [`Bytes`]).
struct TensorBytes {
    tensors: Arc<Vec<SnapTensor>>,
    i: usize,
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        self.tensors[self.i].data.as_bytes()
    }
}

impl SnapData {
    /// The values as little-endian bytes (the in-memory bytes: little-endian targets only).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            SnapData::F32(v) => bytemuck::cast_slice(v),
            SnapData::Bf16(v) => bytemuck::cast_slice(v),
        }
    }

    fn dtype_name(&self) -> &'static str {
        match self {
            SnapData::F32(_) => "F32",
            SnapData::Bf16(_) => "BF16",
        }
    }

    fn value_bytes(&self) -> usize {
        match self {
            SnapData::F32(_) => 4,
            SnapData::Bf16(_) => 2,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            SnapData::F32(v) => v.len(),
            SnapData::Bf16(v) => v.len(),
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("checkpoint shards are written from in-memory bytes: little-endian targets only");

impl Shard {
    /// Lays out `tensors`; refuses a tensor whose values do not fill its shape, or a name twice.
    pub fn new(mut tensors: Vec<SnapTensor>) -> Result<Shard, String> {
        for t in &tensors {
            let n: usize = t.shape.iter().product();
            if n != t.data.len() {
                return Err(format!(
                    "tensor {}: shape {:?} but {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                ));
            }
        }
        tensors
            .sort_by(|a, b| (b.data.value_bytes(), &a.name).cmp(&(a.data.value_bytes(), &b.name)));
        if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(format!("tensor {} appears twice", w[0].name));
        }
        let mut entries = serde_json::Map::new();
        let mut offset = 0usize;
        for t in &tensors {
            let end = offset + t.data.as_bytes().len();
            entries.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.data.dtype_name(),
                    "shape": t.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        let mut json = serde_json::to_vec(&entries).expect("a header serialises");
        // the data starts 8-aligned (safetensors pads its header with spaces)
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&json);
        let bytes = (header.len() + offset) as u64;
        Ok(Shard {
            tensors: Arc::new(tensors),
            header: header.into(),
            bytes,
        })
    }

    /// The shard's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many tensors it holds.
    pub fn tensors(&self) -> usize {
        self.tensors.len()
    }

    /// The tensors' names, in file order.
    pub fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// The snapshot's buffers back, when no clone of this shard (no upload) holds them.
    pub fn into_tensors(self) -> Option<Vec<SnapTensor>> {
        Arc::try_unwrap(self.tensors).ok()
    }

    /// The file, in order, as pieces that borrow the snapshot's buffers.
    fn pieces(&self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(1 + self.tensors.len());
        out.push(self.header.clone());
        for i in 0..self.tensors.len() {
            if !self.tensors[i].data.as_bytes().is_empty() {
                out.push(Bytes::from_owner(TensorBytes {
                    tensors: self.tensors.clone(),
                    i,
                }));
            }
        }
        out
    }

    /// The file as upload parts of `part` bytes (the last may be shorter), each a list of
    /// slices of the pieces: nothing is copied.
    fn parts(&self, part: usize) -> Vec<Vec<Bytes>> {
        let mut parts = Vec::new();
        let mut current = Vec::new();
        let mut room = part;
        for mut piece in self.pieces() {
            while !piece.is_empty() {
                let take = room.min(piece.len());
                current.push(piece.split_to(take));
                room -= take;
                if room == 0 {
                    parts.push(std::mem::take(&mut current));
                    room = part;
                }
            }
        }
        if !current.is_empty() {
            parts.push(current);
        }
        parts
    }

    /// The checksum of the file ([`Checksum::new`]'s kind), as lowercase hex.
    pub fn checksum(&self) -> String {
        let mut h = Checksum::new();
        self.pieces().iter().for_each(|p| h.update(p));
        h.finish()
    }
}

/// The part size for a shard of `bytes`: 16 MiB, larger when S3's part limit needs it.
fn part_size(bytes: u64) -> usize {
    (16u64 << 20).max(bytes.div_ceil(MAX_PARTS)) as usize
}

/// A name no earlier upload used: a retry never writes over a committed shard.
fn nonce(step: u64) -> u64 {
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(step);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// Uploads one shard under `key`, its parts streamed while another thread hashes the same
/// bytes. Aborts the multipart upload on failure.
async fn upload_shard(
    store: &Store,
    key: ObjPath,
    shard: &Shard,
) -> Result<ShardEntry, CheckpointError> {
    let err = |source| CheckpointError::Store {
        url: store.url.clone(),
        key: key.to_string(),
        source,
    };
    let hashed = {
        let shard = shard.clone();
        tokio::task::spawn_blocking(move || shard.checksum())
    };
    let mut upload = store.inner.put_multipart(&key).await.map_err(err)?;
    let mut in_flight = FuturesUnordered::new();
    let mut sent: Result<(), object_store::Error> = Ok(());
    for part in shard.parts(part_size(shard.bytes)) {
        if in_flight.len() >= IN_FLIGHT
            && let Some(Err(e)) = in_flight.next().await
        {
            sent = Err(e);
            break;
        }
        in_flight.push(upload.put_part(part.into_iter().collect()));
    }
    while let Some(r) = in_flight.next().await {
        if sent.is_ok() {
            sent = r;
        }
    }
    let done = match sent {
        Ok(()) => upload.complete().await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = done {
        let _ = upload.abort().await;
        return Err(err(e));
    }
    let crc64nvme = hashed.await.expect("hashing a shard does not panic");
    Ok(ShardEntry {
        key: key.to_string(),
        bytes: shard.bytes,
        sha256: String::new(),
        crc64nvme,
        tensors: shard.names(),
    })
}

/// Writes the checkpoint of `step` as one shard of `tensors` (see [`write_shards`]).
pub async fn write(
    store: &Store,
    run: &str,
    step: u64,
    tensors: &[SnapTensor],
    meta: serde_json::Value,
) -> Result<CheckpointManifest, CheckpointError> {
    let shard = Shard::new(tensors.to_vec()).map_err(|message| CheckpointError::Corrupt {
        url: store.url.clone(),
        key: format!("{run}/checkpoints/{}", step_dir(step)),
        message,
    })?;
    write_shards(store, run, step, &[shard], meta).await
}

/// Writes the checkpoint of `step`: the shards side by side (one per owner, `shard-<i>-…`),
/// then the manifest (create-only: an existing checkpoint of the same step is never replaced).
/// Safe to call again after a failure: every try writes shards under new names, and a manifest
/// already committed with the same shard contents and meta (a retry whose first commit
/// succeeded but whose answer was lost) counts as this commit (the retry's shards are removed).
/// Another committed checkpoint of the step is kept (an error) when it is intact, and replaced
/// when it is corrupt or incomplete (its shards fail [`verify`]). Returns the manifest.
pub async fn write_shards(
    store: &Store,
    run: &str,
    step: u64,
    shards: &[Shard],
    meta: serde_json::Value,
) -> Result<CheckpointManifest, CheckpointError> {
    let tag = nonce(step);
    let uploads = shards.iter().enumerate().map(|(i, shard)| {
        let name = format!("shard-{i}-{tag:016x}.safetensors");
        upload_shard(
            store,
            Store::key(&[run, "checkpoints", &step_dir(step), &name]),
            shard,
        )
    });
    let entries = futures_util::future::try_join_all(uploads).await?;
    let manifest = CheckpointManifest {
        format: FORMAT,
        run: run.to_string(),
        step,
        tensors: shards.iter().map(Shard::tensors).sum(),
        shards: entries,
        meta,
    };
    commit(store, &manifest).await
}

/// The contents of shards, without their names: what makes two commits the same.
fn contents(shards: &[ShardEntry]) -> Vec<(u64, &str)> {
    shards.iter().map(|s| (s.bytes, s.checksum())).collect()
}

/// Writes the manifest of uploaded shards, create-only.
async fn commit(
    store: &Store,
    manifest: &CheckpointManifest,
) -> Result<CheckpointManifest, CheckpointError> {
    let (run, step) = (manifest.run.as_str(), manifest.step);
    let key = manifest_key(run, step);
    let err = |source| CheckpointError::Store {
        url: store.url.clone(),
        key: key.to_string(),
        source,
    };
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let source = match store
        .inner
        .put_opts(&key, PutPayload::from(json.clone()), opts)
        .await
    {
        Ok(_) => return Ok(manifest.clone()),
        Err(source @ object_store::Error::AlreadyExists { .. }) => source,
        Err(source) => return Err(err(source)),
    };
    // what is committed there: this very commit (a retry), an intact other one (kept), or a
    // broken one (replaced: a resume that fell back past it reaches its step again)
    let broken = match read_manifest(store, run, step).await {
        Ok(existing)
            if contents(&existing.shards) == contents(&manifest.shards)
                && existing.tensors == manifest.tensors
                && existing.meta == manifest.meta =>
        {
            for s in &manifest.shards {
                let _ = store.inner.delete(&ObjPath::from(s.key.as_str())).await;
            }
            return Ok(existing);
        }
        Ok(existing) => match verify(store, &existing, Depth::Checksums).await {
            Err(e) if e.is_broken() => e,
            _ => return Err(err(source)),
        },
        Err(e) if e.is_broken() => e,
        Err(_) => return Err(err(source)),
    };
    tracing::warn!(
        store = %store.url,
        run,
        step,
        "replacing the corrupt committed checkpoint of step {step} ({broken})"
    );
    store
        .inner
        .put(&key, PutPayload::from(json))
        .await
        .map_err(err)?;
    Ok(manifest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, data: SnapData) -> SnapTensor {
        let n = data.len();
        SnapTensor {
            name: name.into(),
            shape: vec![n],
            data,
        }
    }

    #[test]
    fn a_shard_is_a_safetensors_file_whatever_the_part_size() {
        let shard = Shard::new(vec![
            t(
                "b",
                SnapData::Bf16((0..5).map(|i| bf16::from_f32(i as f32)).collect()),
            ),
            t("a", SnapData::F32((0..7).map(|i| i as f32 * 0.5).collect())),
            t("c", SnapData::F32(vec![])),
        ])
        .unwrap();
        let whole: Vec<u8> = shard.pieces().iter().flat_map(|p| p.to_vec()).collect();
        assert_eq!(whole.len() as u64, shard.bytes());
        // the header is 8-aligned, F32 values come first
        let header = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
        assert_eq!(header % 8, 0);
        assert_eq!(shard.names(), ["a", "c", "b"]);
        let back = super::super::deserialize(&whole).unwrap();
        assert_eq!(
            back.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(
            back[0].data,
            SnapData::F32((0..7).map(|i| i as f32 * 0.5).collect())
        );
        for part in [1, 3, 8, 16, 1 << 20] {
            let parts = shard.parts(part);
            assert!(
                parts[..parts.len() - 1]
                    .iter()
                    .all(|p| p.iter().map(Bytes::len).sum::<usize>() == part)
            );
            let joined: Vec<u8> = parts.iter().flatten().flat_map(|b| b.to_vec()).collect();
            assert_eq!(joined, whole, "part size {part}");
        }
        let mut sum = Checksum::new();
        sum.update(&whole);
        assert_eq!(shard.checksum(), sum.finish());
        // the buffers come back once nothing holds them
        let copy = shard.clone();
        let shard = match copy.into_tensors() {
            None => shard,
            Some(_) => panic!("a clone still held them"),
        };
        assert_eq!(shard.into_tensors().unwrap().len(), 3);
    }

    #[test]
    fn bad_tensors_are_refused_by_name() {
        let mut bad = t("w", SnapData::F32(vec![1.0; 3]));
        bad.shape = vec![2, 2];
        assert!(Shard::new(vec![bad]).unwrap_err().contains("tensor w"));
        let twice = vec![
            t("w", SnapData::F32(vec![1.0])),
            t("w", SnapData::F32(vec![2.0])),
        ];
        assert!(Shard::new(twice).unwrap_err().contains("w appears twice"));
    }

    #[test]
    fn parts_respect_the_s3_limit() {
        assert_eq!(part_size(1 << 30), 16 << 20);
        let huge = 1u64 << 40;
        assert!(huge.div_ceil(part_size(huge) as u64) <= MAX_PARTS);
    }
}

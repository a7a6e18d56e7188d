//! What the processes of a multi-process run say to each other over the TCP link. Every
//! message is one envelope whose payload is `[u32 head length][postcard head][blob]`: the head
//! names the message and the shapes, the blob carries tensors as raw little-endian bytes (an
//! activation's blob is its wire frame, sent from the caller's buffer without a copy).
//!
//! Peer ids on the link: the pipeline ranks are `0..ranks`, the coordinator is `ranks`.

use crate::core::executor::Arrival;
use crate::core::rank::RankStats;
use anyhow::{Result, anyhow, bail};
use kernels::model::Batch;
use kernels::model::params::{ParamId, WeightGrad};
use kernels::model::stage::{GradSums, HalfSum, Stage};
use kernels::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Envelope tags.
pub const TAG_TO_COORD: u32 = 0x5043_0001;
pub const TAG_TO_WORKER: u32 = 0x5043_0002;
pub const TAG_ACTIVATION: u32 = 0x5043_0003;
pub const TAG_SUPERVISOR: u32 = 0x5043_0004;

/// A member of the run: where a rank's process listens and which incarnation it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub rank: usize,
    pub addr: String,
    pub incarnation: u64,
}

/// One micro-batch's tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tokens {
    pub batch: usize,
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Tokens {
    pub fn of(b: &Batch) -> Tokens {
        Tokens {
            batch: b.batch,
            seq: b.seq,
            inputs: b.inputs.clone(),
            targets: b.targets.clone(),
        }
    }

    pub fn batch(self) -> Batch {
        Batch {
            batch: self.batch,
            seq: self.seq,
            inputs: self.inputs,
            targets: self.targets,
        }
    }
}

/// One half's running sum of a stage copy: where it got to; its tensors are in the blob, in
/// local tensor order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HalfHead {
    pub next: usize,
}

/// A job on a shared tensor (the embedding): its micro-batch, local tensor, and the lengths of
/// its token ids and gradient rows in the blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedHead {
    pub mb: usize,
    pub w: usize,
    pub ids: usize,
    pub dy: usize,
}

/// One stage copy's gradients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyGrads {
    pub copy: usize,
    pub halves: [Option<HalfHead>; 2],
    pub shared: Vec<SharedHead>,
}

/// Worker → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToCoord {
    Hello {
        rank: usize,
        incarnation: u64,
        addr: String,
        pid: u32,
    },
    /// The committed state this rank mirrors (answer to `Report`): its tensors' parameters and
    /// moments as of `step` (blob), and the loss monitor's memory.
    State {
        step: Option<u64>,
        monitor: String,
        tensors: Vec<SnapHead>,
    },
    Heartbeat {
        incarnation: u64,
    },
    /// The rank's program ran; the blob holds its copies' gradients.
    Done {
        step: u64,
        attempt: u32,
        stats: RankStats,
        copies: Vec<CopyGrads>,
    },
    Installed {
        step: u64,
        attempt: u32,
    },
    /// The attempt failed on this rank (a broken invariant or a lost peer).
    Failed {
        step: u64,
        attempt: u32,
        reason: String,
    },
}

/// Coordinator → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Peers {
        members: Vec<Member>,
    },
    /// Run attempt `attempt` of `step`. `params`: the committed values of the given global
    /// tensors (blob) to load first, with the stages reset.
    Open {
        step: u64,
        attempt: u32,
        batches: Vec<Tokens>,
        params: Vec<(usize, usize)>,
    },
    /// The step's new values of the given global tensors (blob).
    Install {
        step: u64,
        attempt: u32,
        params: Vec<(usize, usize)>,
    },
    Abort {
        step: u64,
        attempt: u32,
    },
    /// The committed state of `step` for this rank's tensors (blob): kept as the mirror a new
    /// coordinator rebuilds the run from.
    Mirror {
        step: u64,
        monitor: String,
        tensors: Vec<SnapHead>,
    },
    /// A new coordinator asks for the newest mirror every rank holds, at or before `at_most`.
    Report {
        at_most: Option<u64>,
    },
    /// This process was replaced or the run is over.
    Exit {
        reason: String,
    },
}

/// Between the launcher (which keeps the processes) and the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Supervision {
    /// Launcher → coordinator: a rank's process ended (the launcher starts the next one).
    Exited { rank: usize, how: String },
    /// Coordinator → launcher: replace this rank's process (it was declared dead while alive).
    Replace { rank: usize },
}

/// One snapshot tensor in a blob: name, shape, and whether its values are bf16 (else f32).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapHead {
    pub name: String,
    pub shape: Vec<usize>,
    pub bf16: bool,
    pub len: usize,
}

/// Snapshot tensors as heads and a blob.
pub fn snap_blob(tensors: &[storage::checkpoint::SnapTensor]) -> (Vec<SnapHead>, Vec<u8>) {
    use storage::checkpoint::SnapData;
    let mut blob = Vec::new();
    let heads = tensors
        .iter()
        .map(|t| {
            let (bf16, len) = match &t.data {
                SnapData::F32(v) => {
                    put_f32(&mut blob, v);
                    (false, v.len())
                }
                SnapData::Bf16(v) => {
                    for x in v {
                        blob.extend_from_slice(&x.to_bits().to_le_bytes());
                    }
                    (true, v.len())
                }
            };
            SnapHead {
                name: t.name.clone(),
                shape: t.shape.clone(),
                bf16,
                len,
            }
        })
        .collect();
    (heads, blob)
}

/// Snapshot tensors back from heads and a blob.
pub fn read_snap(heads: &[SnapHead], blob: &[u8]) -> Result<Vec<storage::checkpoint::SnapTensor>> {
    use storage::checkpoint::{SnapData, SnapTensor};
    let mut r = BlobReader { rest: blob };
    let out = heads
        .iter()
        .map(|h| {
            let data = if h.bf16 {
                let raw = r.take(h.len * 2, "bf16 values")?;
                SnapData::Bf16(
                    raw.chunks_exact(2)
                        .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                        .collect(),
                )
            } else {
                SnapData::F32(r.f32s(h.len, "f32 values")?)
            };
            Ok(SnapTensor {
                name: h.name.clone(),
                shape: h.shape.clone(),
                data,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    r.finish()?;
    Ok(out)
}

/// Worker → worker: an activation or gradient of (step, attempt); the blob is its wire frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    pub step: u64,
    pub attempt: u32,
    pub arrival: Arrival,
}

/// The head's bytes with their length in front (the blob goes after them on the wire).
pub fn head<T: Serialize>(h: &T) -> Result<Vec<u8>> {
    let body = postcard::to_allocvec(h).map_err(|e| anyhow!("encoding a message: {e}"))?;
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// A payload as its head and its blob.
pub fn split<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<(T, &'a [u8])> {
    if payload.len() < 4 {
        bail!("message of {} bytes has no head", payload.len());
    }
    let n = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    if payload.len() < 4 + n {
        bail!(
            "message head of {n} bytes is cut at {} bytes",
            payload.len() - 4
        );
    }
    let h = postcard::from_bytes(&payload[4..4 + n]).map_err(|e| anyhow!("message head: {e}"))?;
    Ok((h, &payload[4 + n..]))
}

pub fn put_f32(out: &mut Vec<u8>, x: &[f32]) {
    out.reserve(x.len() * 4);
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads blobs front to back, every read checked against what is left.
pub struct BlobReader<'a> {
    pub rest: &'a [u8],
}

impl<'a> BlobReader<'a> {
    fn take(&mut self, bytes: usize, what: &str) -> Result<&'a [u8]> {
        if self.rest.len() < bytes {
            bail!(
                "the blob is cut: {what} needs {bytes} bytes, {} are left",
                self.rest.len()
            );
        }
        let (a, b) = self.rest.split_at(bytes);
        self.rest = b;
        Ok(a)
    }

    pub fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>> {
        Ok(self
            .take(n * 4, what)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    pub fn u32s(&mut self, n: usize, what: &str) -> Result<Vec<u32>> {
        Ok(self
            .take(n * 4, what)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    pub fn finish(&self) -> Result<()> {
        if !self.rest.is_empty() {
            bail!("{} bytes left over after the blob", self.rest.len());
        }
        Ok(())
    }
}

/// Tensors `ids` of `params` as a list of (id, length) and a blob.
pub fn tensors_blob(tensors: &[Tensor], ids: &[usize]) -> (Vec<(usize, usize)>, Vec<u8>) {
    let mut blob = Vec::new();
    let list = ids
        .iter()
        .map(|&g| {
            put_f32(&mut blob, &tensors[g].data);
            (g, tensors[g].data.len())
        })
        .collect();
    (list, blob)
}

/// Writes the tensors of a `tensors_blob` into `into`, checking each id and length.
pub fn read_tensors(list: &[(usize, usize)], blob: &[u8], into: &mut [Tensor]) -> Result<()> {
    let mut r = BlobReader { rest: blob };
    for &(g, n) in list {
        let t = into
            .get_mut(g)
            .ok_or_else(|| anyhow!("tensor id {g} is not in this model"))?;
        if t.data.len() != n {
            bail!("tensor {g} has {} values here, {n} were sent", t.data.len());
        }
        t.data = r.f32s(n, "a tensor")?;
    }
    r.finish()
}

/// A copy's gradient sums as a head and blob bytes appended to `blob`.
pub fn grads_blob(copy: usize, sums: GradSums, blob: &mut Vec<u8>) -> Result<CopyGrads> {
    let mut halves = [None, None];
    let GradSums {
        halves: parts,
        shared,
        ..
    } = sums;
    for (h, part) in parts.into_iter().enumerate() {
        if let Some(half) = part {
            for t in &half.sums {
                put_f32(blob, &t.data);
            }
            halves[h] = Some(HalfHead { next: half.next });
        }
    }
    let mut heads = Vec::new();
    for (mb, jobs) in shared {
        for job in jobs {
            match job {
                WeightGrad::Embedding { w, ids, dy } => {
                    for id in ids.iter() {
                        blob.extend_from_slice(&id.to_le_bytes());
                    }
                    put_f32(blob, &dy);
                    heads.push(SharedHead {
                        mb,
                        w: w.0,
                        ids: ids.len(),
                        dy: dy.len(),
                    });
                }
                other => bail!(
                    "stage copy s{copy}: a shared-tensor job on tensor {} is not an embedding job",
                    other.param().0
                ),
            }
        }
    }
    Ok(CopyGrads {
        copy,
        halves,
        shared: heads,
    })
}

/// The sums of one copy back from its head and the blob (tensor shapes from `stage`).
pub fn read_grads(
    head: &CopyGrads,
    stage: &Stage,
    microbatches: usize,
    r: &mut BlobReader<'_>,
) -> Result<GradSums> {
    let mut halves = [None, None];
    for (h, part) in head.halves.iter().enumerate() {
        if let Some(p) = part {
            let sums = stage
                .params
                .tensors
                .iter()
                .map(|t| {
                    Ok(Tensor {
                        data: r.f32s(t.data.len(), "a gradient sum")?,
                        shape: t.shape.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            halves[h] = Some(HalfSum { sums, next: p.next });
        }
    }
    let mut shared: BTreeMap<usize, Vec<WeightGrad>> = BTreeMap::new();
    for s in &head.shared {
        if s.w >= stage.params.tensors.len() {
            bail!(
                "shared job on local tensor {} of a stage of {}",
                s.w,
                stage.params.tensors.len()
            );
        }
        let ids = r.u32s(s.ids, "embedding ids")?;
        let dy = r.f32s(s.dy, "embedding gradient rows")?;
        shared.entry(s.mb).or_default().push(WeightGrad::Embedding {
            w: ParamId(s.w),
            ids: Arc::new(ids),
            dy,
        });
    }
    Ok(GradSums::from_parts(microbatches, halves, shared))
}

//! The trainer's side of checkpoints: a `TrainState` to and from named snapshot tensors, and the
//! resume read (the newest intact checkpoint, falling back past corrupt ones). The background
//! uploader is in [`crate::uploader`].

use crate::state::{TrainOptions, TrainState};
use anyhow::{Result, anyhow, bail};
use kernels::ops::adamw::Moments;
use std::collections::HashMap;
use storage::checkpoint::{self, CheckpointManifest, Depth, Skipped, SnapData, SnapTensor};
use storage::store::{Store, block_on};

/// Names of a parameter's AdamW moments in a checkpoint (PyTorch's state names).
fn moment_names(param: &str) -> (String, String) {
    (format!("{param}.exp_avg"), format!("{param}.exp_avg_sq"))
}

/// Copies the parameters (routing-bias buffers included) and the optimizer moments.
pub fn snapshot(state: &TrainState) -> Vec<SnapTensor> {
    let all: Vec<usize> = (0..state.model.params.len()).collect();
    snapshot_of(state, &all)
}

/// The same for tensors `ids` only (a stage's share of the state).
pub fn snapshot_of(state: &TrainState, ids: &[usize]) -> Vec<SnapTensor> {
    snapshot_into(state, &[ids.to_vec()], Vec::new())
        .pop()
        .unwrap_or_default()
}

/// One snapshot per owner (`owners[o]`: the tensor ids it holds), copied into `reuse`'s buffers
/// where a buffer of the same name, dtype and size is there (the previous checkpoint's, given
/// back by the uploader: no page is touched for the first time), else into new ones. The copy
/// runs in chunks on every core.
pub fn snapshot_into(
    state: &TrainState,
    owners: &[Vec<usize>],
    reuse: Vec<Vec<SnapTensor>>,
) -> Vec<Vec<SnapTensor>> {
    let mut spare: HashMap<String, SnapData> = reuse
        .into_iter()
        .flatten()
        .map(|t| (t.name, t.data))
        .collect();
    let mut sources = Vec::new();
    let mut out: Vec<Vec<SnapTensor>> = snapshot_sources(state, owners)
        .into_iter()
        .map(|tensors| {
            tensors
                .into_iter()
                .map(|(name, shape, src)| {
                    let data = match spare.remove(&name) {
                        Some(d) if src.fits(&d) => d,
                        _ => src.fresh(),
                    };
                    sources.push(src.bytes());
                    SnapTensor { name, shape, data }
                })
                .collect()
        })
        .collect();
    let dsts = out.iter_mut().flatten().map(|t| match &mut t.data {
        SnapData::F32(v) => bytemuck::cast_slice_mut::<f32, u8>(v),
        SnapData::Bf16(v) => bytemuck::cast_slice_mut::<half::bf16, u8>(v),
    });
    crate::state::parallel_copy(dsts.zip(sources).collect());
    out
}

/// The tensors [`snapshot_into`] makes for `owners`, with names, shapes and dtypes and no values
/// (for [`crate::uploader::Uploader::prepare`]).
pub fn snapshot_layout(state: &TrainState, owners: &[Vec<usize>]) -> Vec<Vec<SnapTensor>> {
    snapshot_sources(state, owners)
        .into_iter()
        .map(|tensors| {
            tensors
                .into_iter()
                .map(|(name, shape, src)| SnapTensor {
                    name,
                    shape,
                    data: src.empty(),
                })
                .collect()
        })
        .collect()
}

/// Per owner, the snapshot's tensors in order: name, shape and the state's values (each
/// parameter, then its AdamW moments when it has them).
fn snapshot_sources<'s>(
    state: &'s TrainState,
    owners: &[Vec<usize>],
) -> Vec<Vec<(String, Vec<usize>, SnapSource<'s>)>> {
    let p = &state.model.params;
    owners
        .iter()
        .map(|ids| {
            let mut out = Vec::with_capacity(3 * ids.len());
            for &i in ids {
                let (name, t) = (&p.names[i], &p.tensors[i]);
                out.push((name.clone(), t.shape.clone(), SnapSource::F32(&t.data)));
                let (m_name, v_name) = moment_names(name);
                let n = vec![t.data.len()];
                let (m, v) = match &state.moments[i] {
                    None => continue,
                    Some(Moments::F32 { m, v }) => (SnapSource::F32(m), SnapSource::F32(v)),
                    Some(Moments::Bf16 { m, v }) => (SnapSource::Bf16(m), SnapSource::Bf16(v)),
                };
                out.push((m_name, n.clone(), m));
                out.push((v_name, n, v));
            }
            out
        })
        .collect()
}

/// A tensor of the state to copy into a snapshot buffer.
#[derive(Clone, Copy)]
enum SnapSource<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl<'a> SnapSource<'a> {
    fn fits(&self, d: &SnapData) -> bool {
        match (self, d) {
            (SnapSource::F32(s), SnapData::F32(d)) => s.len() == d.len(),
            (SnapSource::Bf16(s), SnapData::Bf16(d)) => s.len() == d.len(),
            _ => false,
        }
    }

    /// No values, of the right dtype (a layout).
    fn empty(&self) -> SnapData {
        match self {
            SnapSource::F32(_) => SnapData::F32(Vec::new()),
            SnapSource::Bf16(_) => SnapData::Bf16(Vec::new()),
        }
    }

    /// A buffer of the right size (zeroed pages, mapped lazily: the copy touches them).
    fn fresh(&self) -> SnapData {
        match self {
            SnapSource::F32(s) => SnapData::F32(vec![0.0; s.len()]),
            SnapSource::Bf16(s) => SnapData::Bf16(vec![half::bf16::ZERO; s.len()]),
        }
    }

    fn bytes(self) -> &'a [u8] {
        match self {
            SnapSource::F32(s) => bytemuck::cast_slice(s),
            SnapSource::Bf16(s) => bytemuck::cast_slice(s),
        }
    }
}

/// The owners of a model's tensors when it is cut into `stages` pipeline stages: one list of
/// tensor ids per stage (a tensor two stages hold goes to the first), the shards a checkpoint
/// writes side by side.
pub fn stage_owners(state: &TrainState, stages: usize) -> Vec<Vec<usize>> {
    kernels::model::stage::owners(&state.model, stages.max(1))
}

/// Puts the tensors of a checkpoint of store run `run` into `state` (built for the same config)
/// and sets its step. Every parameter and every moment of a trainable parameter must be present
/// with its shape.
pub fn restore(
    state: &mut TrainState,
    tensors: Vec<SnapTensor>,
    run: &str,
    step: u64,
) -> Result<()> {
    let mut by_name: HashMap<String, SnapTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut take = |name: &str, shape: &[usize]| -> Result<SnapData> {
        let t = by_name
            .remove(name)
            .ok_or_else(|| anyhow!("tensor {name} is missing"))?;
        if t.shape != shape {
            bail!(
                "tensor {name} has shape {:?}, the model wants {shape:?}",
                t.shape
            );
        }
        Ok(t.data)
    };
    let p = &mut state.model.params;
    for i in 0..p.len() {
        let name = p.names[i].clone();
        let shape = p.tensors[i].shape.clone();
        match take(&name, &shape)? {
            SnapData::F32(v) => p.tensors[i].data = v,
            SnapData::Bf16(_) => bail!("tensor {name} is BF16; parameters are stored in F32"),
        }
        if state.moments[i].is_some() {
            let n = shape.iter().product::<usize>();
            let (m_name, v_name) = moment_names(&name);
            state.moments[i] = Some(match (take(&m_name, &[n])?, take(&v_name, &[n])?) {
                (SnapData::F32(m), SnapData::F32(v)) => Moments::F32 { m, v },
                (SnapData::Bf16(m), SnapData::Bf16(v)) => Moments::Bf16 { m, v },
                _ => bail!("moments {m_name} and {v_name} differ in dtype"),
            });
        }
    }
    if let Some(extra) = by_name.keys().next() {
        bail!("tensor {extra} is not part of this model");
    }
    state.step = step;
    state.restored_from = Some(run.to_string());
    Ok(())
}

/// What a checkpoint records beside the tensors, enough for `phalanx resume` to rebuild the run.
pub fn meta(opts: &TrainOptions, state: &TrainState, every: u64) -> serde_json::Value {
    serde_json::json!({
        "optimizer_step": state.step,
        "monitor": state.monitor,
        "config_toml": opts.config.to_toml(),
        "config_path": opts.config_path,
        "seed": opts.seed,
        "data": opts.data.as_ref().map(|p| p.display().to_string()),
        "data_format": opts.data_format.to_string(),
        "precision": opts.precision.to_string(),
        "checkpoint_every": every,
    })
}

/// The first committed checkpoint, runs newest first (`run` alone when given) and within a run
/// steps newest first, whose step `want` accepts: read and verified (size and checksum of every
/// shard); None when none is accepted.
pub fn load_first(
    url: &str,
    run: Option<&str>,
    want: impl Fn(u64) -> bool,
) -> Result<Option<Loaded>> {
    let store = Store::open(url)?;
    let runs = match run {
        Some(r) => vec![r.to_string()],
        None => block_on(checkpoint::runs(&store))?,
    };
    for r in &runs {
        let steps = block_on(checkpoint::committed_steps(&store, r))?;
        if let Some(&at) = steps.iter().find(|&&s| want(s)) {
            let manifest = block_on(checkpoint::read_manifest(&store, r, at))?;
            let tensors = block_on(checkpoint::read_tensors(&store, &manifest))?;
            return Ok(Some(Loaded {
                manifest,
                tensors,
                skipped: Vec::new(),
            }));
        }
    }
    Ok(None)
}

/// The newest checkpoint of store run `run` at or before `step`; None when there is none.
pub fn load_at_or_before(url: &str, run: &str, step: u64) -> Result<Option<Loaded>> {
    load_first(url, Some(run), |s| s <= step)
}

/// The run config a manifest records, and the name its errors give it ("<config path> (from
/// <store>: run R checkpoint of step S)").
pub fn config_of(url: &str, m: &CheckpointManifest) -> Result<(kernels::model::RunConfig, String)> {
    let at = format!("{url}: run {} checkpoint of step {}", m.run, m.step);
    let text = |key: &str| {
        m.meta[key]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{at}: manifest meta lacks `{key}`"))
    };
    let file = format!("{} (from {at})", text("config_path")?);
    let cfg = kernels::model::RunConfig::parse(text("config_toml")?, &file)?;
    Ok((cfg, file))
}

/// The newest intact checkpoint in `url` (of `run`, else of the newest run that has one): its
/// manifest and tensors (sizes and checksums verified). Newer committed checkpoints that are
/// corrupt or incomplete are skipped: each is logged (`tracing::warn!`) and listed, with its
/// reason, in [`Loaded::skipped`] so the caller can say which one it resumed instead.
pub fn load_latest_checked(url: &str, run: Option<&str>) -> Result<Loaded> {
    let store = Store::open(url)?;
    let got = block_on(checkpoint::latest_intact(&store, run))?;
    Ok(Loaded {
        manifest: got.manifest,
        tensors: got.tensors,
        skipped: got.skipped,
    })
}

/// A checkpoint read back for a resume, and the newer ones passed over.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub manifest: CheckpointManifest,
    pub tensors: Vec<SnapTensor>,
    /// Newer committed checkpoints skipped as corrupt or incomplete, newest first; each names
    /// the object at fault and why (`checksum mismatch`, `incomplete`, `not found` …).
    pub skipped: Vec<Skipped>,
}

/// What a run was, as its newest checkpoint's manifest recorded it.
pub struct RecordedRun {
    pub config: kernels::model::RunConfig,
    /// Where the config came from, for error messages ("configs/tiny.toml (from …)").
    pub config_file: String,
    pub seed: u64,
    pub data: Option<std::path::PathBuf>,
    pub data_format: storage::dataset::DataFormat,
    pub precision: kernels::model::Precision,
    /// The checkpoint interval the run was started with.
    pub ckpt_every: Option<u64>,
    /// The run's name in the store.
    pub run: String,
}

/// Decodes the newest checkpoint manifest of `url` (of `run`, or of the newest run with one)
/// into the run it records; a missing or malformed field is named with the store and step.
pub fn recorded_run(url: &str, run: Option<&str>) -> Result<RecordedRun> {
    let m = latest_manifest(url, run)?;
    let at = format!("{url}: run {} checkpoint of step {}", m.run, m.step);
    let text = |key: &str| {
        m.meta[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("{at}: manifest meta lacks `{key}`"))
    };
    let (config, config_file) = config_of(url, &m)?;
    Ok(RecordedRun {
        config,
        seed: m.meta["seed"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("{at}: manifest meta lacks `seed`"))?,
        data: m.meta["data"].as_str().map(std::path::PathBuf::from),
        data_format: text("data_format")?
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{at}: data_format: {e}"))?,
        precision: text("precision")?
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{at}: precision: {e}"))?,
        ckpt_every: m.meta["checkpoint_every"].as_u64(),
        config_file,
        run: m.run,
    })
}

/// [`load_latest_checked`] without the list of skipped checkpoints (they are logged).
pub fn load_latest(url: &str, run: Option<&str>) -> Result<(CheckpointManifest, Vec<SnapTensor>)> {
    let l = load_latest_checked(url, run)?;
    Ok((l.manifest, l.tensors))
}

/// The manifest of the newest committed checkpoint in `url` (of `run`, else of any run) whose
/// manifest reads and whose shards are all there with their sizes (a cheap check: the checksums
/// are verified when the tensors are read, by [`load_latest`]). Skipped ones are logged.
pub fn latest_manifest(url: &str, run: Option<&str>) -> Result<CheckpointManifest> {
    let store = Store::open(url)?;
    Ok(block_on(checkpoint::latest_verified(&store, run, Depth::Sizes))?.0)
}

pub use crate::uploader::{UploadPolicy, UploadSummary, Uploader};

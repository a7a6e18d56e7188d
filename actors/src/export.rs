//! Reading a checkpoint as a model: `phalanx eval --store` evaluates it, `phalanx ckpt
//! export-hf` writes it as a Hugging Face DeepseekV3 directory (`config.json` and
//! `model.safetensors`) that `transformers`' `DeepseekV3ForCausalLM.from_pretrained` loads.
//! The MTP modules are left out of the export: transformers' DeepseekV3 has none, so their
//! tensors would be unexpected keys.

use crate::state::TrainState;
use anyhow::{Context, Result, anyhow, bail};
use kernels::model::DeepSeekV3;
use std::path::Path;
use storage::checkpoint::{CheckpointManifest, SnapData, SnapTensor};

/// The checkpoint of `run` (else of the newest run that has one) at `step` (else the newest
/// intact one), verified, with its tensors.
pub fn load(
    url: &str,
    run: Option<&str>,
    step: Option<u64>,
) -> Result<(CheckpointManifest, Vec<SnapTensor>)> {
    let Some(step) = step else {
        return crate::checkpoint::load_latest(url, run);
    };
    let l = crate::checkpoint::load_first(url, run, |s| s == step)?
        .ok_or_else(|| anyhow!("{url}: no committed checkpoint of step {step}"))?;
    Ok((l.manifest, l.tensors))
}

/// The model of a checkpoint, in f32 (the numerics transformers runs).
pub fn model(
    url: &str,
    run: Option<&str>,
    step: Option<u64>,
) -> Result<(DeepSeekV3, CheckpointManifest)> {
    let (m, tensors) = load(url, run, step)?;
    let (cfg, _) = crate::checkpoint::config_of(url, &m)?;
    let mut state = TrainState::new(DeepSeekV3::new(&cfg.model, 0.0, 0));
    crate::checkpoint::restore(&mut state, tensors, &m.run, m.step)
        .with_context(|| format!("{url}: checkpoint of step {}", m.step))?;
    Ok((state.model, m))
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    pub run: String,
    pub step: u64,
    pub tensors: usize,
    /// MTP tensors left out.
    pub mtp_left_out: usize,
}

/// Writes the checkpoint as a Hugging Face directory `dir`.
pub fn export_hf(url: &str, run: Option<&str>, step: Option<u64>, dir: &Path) -> Result<Exported> {
    let (m, tensors) = load(url, run, step)?;
    let (cfg, _) = crate::checkpoint::config_of(url, &m)?;
    // the parameters only (moments are `<name>.exp_avg` / `.exp_avg_sq`), in the model's order
    let fresh = DeepSeekV3::new(&cfg.model, 0.0, 0);
    let mtp_from = cfg.model.num_hidden_layers;
    let is_mtp = |name: &str| {
        name.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l >= mtp_from)
    };
    let mut by_name: std::collections::BTreeMap<String, SnapTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut out = Vec::new();
    let mut mtp = 0;
    for name in &fresh.params.names {
        let t = by_name
            .remove(name)
            .ok_or_else(|| anyhow!("{url}: checkpoint of step {} lacks tensor {name}", m.step))?;
        if is_mtp(name) {
            mtp += 1;
            continue;
        }
        let SnapData::F32(v) = t.data else {
            bail!("{url}: tensor {name} is not F32");
        };
        out.push((t.name, t.shape, v));
    }
    storage::hf::write_dir(dir, &cfg.model, &out)?;
    Ok(Exported {
        run: m.run,
        step: m.step,
        tensors: out.len(),
        mtp_left_out: mtp,
    })
}

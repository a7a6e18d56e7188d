//! The trainer's side of checkpoints: a `TrainState` to and from named snapshot tensors, and the
//! background uploader (the step pays for the in-memory copy, the upload overlaps later steps).

use crate::trainer::{TrainOptions, TrainState};
use anyhow::{Context, Result, anyhow, bail};
use kernels::ops::adamw::Moments;
use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use storage::checkpoint::{self, CheckpointManifest, SnapData, SnapTensor};
use storage::journal::Journal;
use storage::store::{Store, block_on};

/// Names of a parameter's AdamW moments in a checkpoint (PyTorch's state names).
fn moment_names(param: &str) -> (String, String) {
    (format!("{param}.exp_avg"), format!("{param}.exp_avg_sq"))
}

/// Copies the parameters (routing-bias buffers included) and the optimizer moments.
pub fn snapshot(state: &TrainState) -> Vec<SnapTensor> {
    let p = &state.model.params;
    let mut out = Vec::with_capacity(3 * p.len());
    for i in 0..p.len() {
        let name = &p.names[i];
        let shape = p.tensors[i].shape.clone();
        out.push(SnapTensor {
            name: name.clone(),
            shape: shape.clone(),
            data: SnapData::F32(p.tensors[i].data.clone()),
        });
        let (m_name, v_name) = moment_names(name);
        let (m, v) = match &state.moments[i] {
            None => continue,
            Some(Moments::F32 { m, v }) => (SnapData::F32(m.clone()), SnapData::F32(v.clone())),
            Some(Moments::Bf16 { m, v }) => (SnapData::Bf16(m.clone()), SnapData::Bf16(v.clone())),
        };
        let n = shape.iter().product::<usize>();
        for (name, data) in [(m_name, m), (v_name, v)] {
            out.push(SnapTensor {
                name,
                shape: vec![n],
                data,
            });
        }
    }
    out
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
        "config_toml": opts.config.to_toml(),
        "config_path": opts.config_path,
        "seed": opts.seed,
        "data": opts.data.as_ref().map(|p| p.display().to_string()),
        "data_format": opts.data_format.to_string(),
        "precision": opts.precision.to_string(),
        "checkpoint_every": every,
    })
}

/// The newest committed checkpoint in `url` (of `run`, else of the newest run that has one):
/// its manifest and tensors (checksums verified).
pub fn load_latest(url: &str, run: Option<&str>) -> Result<(CheckpointManifest, Vec<SnapTensor>)> {
    let store = Store::open(url)?;
    block_on(async {
        let m = checkpoint::latest_manifest(&store, run).await?;
        let t = checkpoint::read_tensors(&store, &m).await?;
        Ok::<_, anyhow::Error>((m, t))
    })
}

/// The manifest of the newest committed checkpoint in `url` (of `run`, else of any run).
pub fn latest_manifest(url: &str, run: Option<&str>) -> Result<CheckpointManifest> {
    let store = Store::open(url)?;
    Ok(block_on(checkpoint::latest_manifest(&store, run))?)
}

struct Job {
    step: u64,
    tensors: Vec<SnapTensor>,
    meta: serde_json::Value,
}

/// Uploads snapshots on its own thread, one at a time: `save` waits only while the previous
/// upload is still running (one snapshot in memory besides the model).
pub struct Uploader {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl Uploader {
    /// Starts the uploader of checkpoints of run `ckpt_run` to store `url`; each commit is also
    /// recorded in `journal` under the journal's run id `run`.
    pub fn start(url: &str, ckpt_run: &str, journal: Journal, run: &str) -> Result<Uploader> {
        let store = Store::open(url)?;
        let run = run.to_string();
        let ckpt_run = ckpt_run.to_string();
        let (tx, rx) = mpsc::sync_channel::<Job>(0);
        let thread = std::thread::Builder::new()
            .name("checkpoint-upload".into())
            .spawn(move || -> Result<u64> {
                let mut committed = 0;
                for job in rx {
                    block_on(checkpoint::write(
                        &store,
                        &ckpt_run,
                        job.step,
                        &job.tensors,
                        job.meta,
                    ))
                    .with_context(|| format!("checkpoint of step {}", job.step))?;
                    tracing::info!(step = job.step, store = %store.url, "checkpoint committed");
                    // on disk at once: the journal's record of commits survives a kill
                    journal.update(&run, |e| e.checkpoints.push(job.step))?;
                    journal.flush()?;
                    committed += 1;
                }
                Ok(committed)
            })
            .context("cannot start the checkpoint uploader")?;
        Ok(Uploader {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands over the snapshot of `step`; fails if an earlier upload failed.
    pub fn save(
        &mut self,
        step: u64,
        tensors: Vec<SnapTensor>,
        meta: serde_json::Value,
    ) -> Result<()> {
        let sent = self
            .jobs
            .as_ref()
            .map(|tx| {
                tx.send(Job {
                    step,
                    tensors,
                    meta,
                })
                .is_ok()
            })
            .unwrap_or(false);
        if !sent {
            // the uploader stopped: its own error says why
            self.finish()?;
            bail!("the checkpoint uploader stopped before step {step}");
        }
        Ok(())
    }

    /// Waits for every handed-over snapshot to be committed; returns how many were.
    pub fn finish(&mut self) -> Result<u64> {
        self.jobs.take();
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the checkpoint uploader panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

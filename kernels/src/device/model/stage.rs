//! One pipeline stage copy on a `Backend` (issue 12: the formation with each GpuActor on a
//! device): `BackendStage` runs a `model::stage::Stage`'s layer range with the device step's
//! layers, so a formation's stage copies compute on a GPU while the pipeline, the reduce and the
//! update stay what they are.
//!
//! F uploads the input activations (or embeds the tokens on stage 0), runs the blocks (and the
//! tail on the last stage) and downloads the output. B* uploads the output gradient, runs the
//! backward and downloads the input gradient; its weight gradients are deferred as jobs holding
//! device copies of their inputs (`weight.rs`), the CPU's W queue on the device. W runs a
//! micro-batch's jobs into the running sum of its half, micro-batches in order (an early W
//! waits), as the CPU runner's `GradSums` does, so on the CPU backend the sums are the CPU
//! runner's bits whatever the schedule. Jobs on a shared tensor (the embedding stage 0 and the
//! last stage both hold under MTP) are handed to the reduce as host jobs, as the CPU runner
//! hands them.

use super::experts::BackendExperts;
use super::layers::{
    BlockSt, Ctx, Positions, block_backward, block_forward, check_batch, embedding_backward,
    ensure_table, upload_params,
};
use super::remote::Remote;
use super::tail::{TailSt, tail_backward, tail_forward};
use super::weight::OwedJob;
use crate::device::Device;
use crate::device::backend::{Backend, BackendError, BackendResult, Cpu, GemmPrecision};
use crate::model::deepseek::Batch;
use crate::model::experts::DeviceExperts;
use crate::model::layers::{ExpertCompute, Rows};
use crate::model::params::WeightGrad;
use crate::model::stage::{DeviceStage, GradSums, HalfOrder, HalfSum, Stage, StageStats, half_of};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// Where a formation's stage copies compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StagePlacement {
    /// The CPU model (`StageRunner`'s own F, B and W with its W queues): the default.
    #[default]
    Model,
    /// A [`BackendStage`] per copy: on `Device::Cpu` the reference backend (the CPU ops through
    /// the `Backend` trait, which the tests compare with the CPU model), on `cuda:N` a GPU, the
    /// copies of pipeline rank `r` on `cuda:(N + r)` (modulo the devices there are). `gemm` is the
    /// precision of the Linears' GEMMs.
    Backend { device: Device, gemm: GemmPrecision },
}

impl StagePlacement {
    /// The device stage of a copy on pipeline rank `rank` for steps of `microbatches`
    /// micro-batches (None on the CPU model); the error names the device that did not open.
    pub fn open(
        self,
        rank: usize,
        microbatches: usize,
    ) -> Result<Option<Box<dyn DeviceStage>>, String> {
        let StagePlacement::Backend { device, gemm } = self else {
            return Ok(None);
        };
        Ok(Some(match device {
            Device::Cpu => Box::new(BackendStage::new(Cpu::new(), microbatches, gemm)),
            #[cfg(feature = "cuda")]
            Device::Cuda(first) => {
                Box::new(BackendStage::new(cuda(first, rank)?, microbatches, gemm))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(not_built(rank)),
        }))
    }

    /// The device of an expert group serving a stage copy on pipeline rank `rank`: the copy's
    /// own (None on the CPU model).
    pub fn open_experts(self, rank: usize) -> Result<Option<Box<dyn DeviceExperts>>, String> {
        let StagePlacement::Backend { device, gemm } = self else {
            return Ok(None);
        };
        Ok(Some(match device {
            Device::Cpu => Box::new(BackendExperts::new(Cpu::new(), gemm)),
            #[cfg(feature = "cuda")]
            Device::Cuda(first) => Box::new(BackendExperts::new(cuda(first, rank)?, gemm)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(not_built(rank)),
        }))
    }
}

/// The GPU of pipeline rank `rank`: `cuda:(first + rank)`, modulo the devices there are.
#[cfg(feature = "cuda")]
fn cuda(first: usize, rank: usize) -> Result<crate::device::cuda::backend::CudaBackend, String> {
    use crate::device::DeviceError;
    let want = first + rank;
    let ordinal = match Device::Cuda(want).probe() {
        Ok(_) => want,
        Err(DeviceError::NoSuchDevice { found, .. }) if found > 0 => want % found,
        Err(e) => return Err(format!("pipeline rank {rank} on cuda:{want}: {e}")),
    };
    crate::device::cuda::backend::CudaBackend::open(ordinal)
        .map_err(|e| format!("pipeline rank {rank} on cuda:{ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn not_built(rank: usize) -> String {
    format!(
        "pipeline rank {rank}: {}",
        crate::device::DeviceError::NotBuilt
    )
}

/// What a micro-batch's forward keeps for its backward.
struct Stash<B: Backend> {
    /// The tokens (stage 0 embeds them; its backward adds their embedding gradient).
    ids: Option<(B::Ids, Vec<u32>)>,
    rows: Rows,
    pos: Positions<B>,
    blocks: Vec<BlockSt<B>>,
    tail: Option<TailSt<B>>,
}

/// A stage copy's parameters, stashes and gradient sums on backend `B`.
pub struct BackendStage<B: Backend> {
    backend: B,
    /// By the stage's local tensor id.
    params: Vec<B::Buf>,
    gemm: GemmPrecision,
    table: Option<(usize, B::Table)>,
    microbatches: usize,
    stashes: BTreeMap<usize, Stash<B>>,
    /// Per micro-batch whose B* ran and whose W has not been asked for: its owed jobs.
    queues: BTreeMap<usize, Owed<B>>,
    /// Per half of the step's micro-batches: its running sums (by local id), once a W ran.
    halves: [Option<Vec<B::Buf>>; 2],
    /// The order W runs in (the CPU runner's); a W that comes early waits in it.
    order: HalfOrder<Owed<B>>,
    /// Per micro-batch: the jobs on shared tensors (local ids), for the reduce.
    shared: BTreeMap<usize, Vec<WeightGrad>>,
    /// The backend holds `params` (`Backend::hold_weights`) from one `load` to the next: they
    /// change only there, so each W is rounded or quantised once per step.
    held: bool,
}

/// What a micro-batch's B* leaves for its W: the device's jobs, and the host jobs on shared
/// tensors that go to the reduce.
struct Owed<B: Backend> {
    jobs: Vec<OwedJob<B>>,
    handed: Vec<WeightGrad>,
}

impl<B: Backend> std::fmt::Debug for BackendStage<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BackendStage({}, {} stashed, {} W owed)",
            self.backend.describe(),
            self.stashes.len(),
            self.queues.len()
        )
    }
}

impl<B: Backend> Drop for BackendStage<B> {
    /// The device buffers are freed on whatever thread drops the stage (an actor's restart):
    /// the device is made current there first (best effort).
    fn drop(&mut self) {
        let _ = self.backend.enter();
    }
}

impl<B: Backend> BackendStage<B> {
    /// A stage copy on `backend` for steps of `microbatches` micro-batches, its Linears' GEMMs in
    /// `gemm` (FP8 Linears follow the stage's own precision); parameters come with
    /// [`DeviceStage::load`].
    pub fn new(backend: B, microbatches: usize, gemm: GemmPrecision) -> BackendStage<B> {
        BackendStage {
            backend,
            params: Vec::new(),
            gemm,
            table: None,
            microbatches,
            stashes: BTreeMap::new(),
            queues: BTreeMap::new(),
            halves: [None, None],
            order: HalfOrder::new(microbatches),
            shared: BTreeMap::new(),
            held: false,
        }
    }

    fn forward_in(
        &mut self,
        stage: &Stage,
        mb: usize,
        batch: &Batch,
        input: Option<Vec<f32>>,
        mtp_weight: f32,
        experts: Option<&mut dyn ExpertCompute>,
    ) -> BackendResult<(Option<Vec<f32>>, StageStats)> {
        if self.stashes.contains_key(&mb) {
            return Err(BackendError(format!(
                "forward of micro-batch {mb} ran twice"
            )));
        }
        check_batch(batch)?;
        self.backend.enter()?;
        let b = &self.backend;
        let cfg = &stage.cfg;
        let table = ensure_table(b, &mut self.table, cfg, batch.seq)?;
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let rows = Rows {
            batch: batch.batch,
            seq: batch.seq,
        };
        let remote = experts.map(|e| Remote::new(e, mb));
        let mut c = Ctx::forward_only(b, &self.params, table, self.gemm);
        c.remote = remote.as_ref();
        let pos = Positions::new(b, rows, cfg.num_attention_heads)?;
        let (mut x, ids) = match (stage.is_first(), input) {
            (true, _) => {
                let table = stage.embed.expect("stage 0 holds the embedding");
                let ids = b.ids(&batch.inputs, vocab)?;
                let x = b.embedding_forward(&ids, &c.p[table.0], d)?;
                (x, Some((ids, batch.inputs.clone())))
            }
            (false, Some(x)) => {
                if x.len() != rows.n() * d {
                    return Err(BackendError(format!(
                        "input has {} values, want {}×{d}",
                        x.len(),
                        rows.n()
                    )));
                }
                (b.upload(&x)?, None)
            }
            (false, None) => {
                return Err(BackendError(
                    "a stage after the first needs its input activations".into(),
                ));
            }
        };
        let mut stats = StageStats::default();
        let mut blocks = Vec::with_capacity(stage.blocks.len());
        let mut moe_stats = Vec::new();
        for (i, blk) in stage.blocks.iter().enumerate() {
            let layer = stage.layers.start + i;
            let (y, st, ms) = block_forward(&c, blk, x, rows, &pos, layer)?;
            moe_stats.extend(ms);
            blocks.push(st);
            x = y;
        }
        // the balance losses are read once the stage's output (or its cross-entropy) has waited
        // for the device
        let read_moe = |stats: &mut StageStats| -> BackendResult<()> {
            for ms in moe_stats {
                let ms = ms.read(b)?;
                stats.balance.push(ms.balance_loss);
                stats.loads.push(ms.loads);
            }
            Ok(())
        };
        let (out, tail) = match &stage.tail {
            None => {
                let out = b.download(&x)?;
                read_moe(&mut stats)?;
                (Some(out), None)
            }
            Some(tail) => {
                // a missing table is only read when MTP runs, and the last stage holds it then
                let embed = stage
                    .embed
                    .unwrap_or(crate::model::params::ParamId(usize::MAX));
                let (st, ts) = tail_forward(&c, tail, embed, cfg, batch, x, mtp_weight)?;
                read_moe(&mut stats)?;
                stats.loss = ts.loss;
                stats.mtp_loss = ts.mtp_loss;
                stats.mtp_objective = ts.mtp_objective;
                stats.balance.extend(ts.balance);
                stats.loads.extend(ts.loads);
                (None, Some(st))
            }
        };
        let stash = Stash {
            ids,
            rows,
            pos,
            blocks,
            tail,
        };
        self.stashes.insert(mb, stash);
        Ok((out, stats))
    }

    fn backward_input_in(
        &mut self,
        stage: &Stage,
        mb: usize,
        dy: Option<Vec<f32>>,
        experts: Option<&mut dyn ExpertCompute>,
    ) -> BackendResult<Option<Vec<f32>>> {
        if self.queues.contains_key(&mb) || self.order.waiting().any(|w| w == mb) {
            return Err(BackendError(format!(
                "backward of micro-batch {mb} ran twice"
            )));
        }
        let Some(st) = self.stashes.remove(&mb) else {
            return Err(BackendError(format!(
                "backward of micro-batch {mb} before its forward"
            )));
        };
        self.backend.enter()?;
        let b = &self.backend;
        let cfg = &stage.cfg;
        let d = cfg.hidden_size;
        let (mut jobs, mut handed) = (Vec::new(), Vec::new());
        let shares_embed = stage.embed.is_some_and(|e| stage.shared[e.0]);
        let remote = experts.map(|e| Remote::new(e, mb));
        let mut c = Ctx {
            b,
            p: &self.params,
            // every weight gradient is deferred: nothing is added now
            g: &mut [],
            table: &self.table.as_ref().expect("the forward made it").1,
            gemm: self.gemm,
            handed: shares_embed.then_some(&mut handed),
            defer: Some(&mut jobs),
            remote: remote.as_ref(),
            prof: None,
        };
        let Stash {
            ids,
            rows,
            pos,
            blocks,
            tail,
        } = st;
        let mut dx = match (&stage.tail, tail, dy) {
            (Some(tl), Some(st), _) => {
                let embed = stage
                    .embed
                    .unwrap_or(crate::model::params::ParamId(usize::MAX));
                tail_backward(&mut c, tl, embed, cfg, st, rows)?
            }
            (None, None, Some(dy)) => {
                if dy.len() != rows.n() * d {
                    return Err(BackendError(format!(
                        "output gradient has {} values, want {}×{d}",
                        dy.len(),
                        rows.n()
                    )));
                }
                b.upload(&dy)?
            }
            (None, None, None) => {
                return Err(BackendError(
                    "a stage before the last needs the gradient of its output".into(),
                ));
            }
            _ => unreachable!("the stash has a tail exactly on the last stage"),
        };
        for (i, (blk, st)) in stage.blocks.iter().zip(blocks).enumerate().rev() {
            let layer = stage.layers.start + i;
            dx = block_backward(&mut c, blk, dx, st, rows, &pos, layer)?;
        }
        let out = match ids {
            Some((ids, host)) => {
                let table = stage.embed.expect("stage 0 holds the embedding");
                embedding_backward(&mut c, table, &ids, &host, &dx, d)?;
                None
            }
            None => Some(b.download(&dx)?),
        };
        self.queues.insert(mb, Owed { jobs, handed });
        Ok(out)
    }

    /// W of `mb`: its jobs into the running sums of its half when it is next there, then every
    /// waiting successor's; otherwise it waits (the CPU runner's order, `HalfOrder`).
    fn backward_weight_in(&mut self, mb: usize) -> BackendResult<()> {
        let Some(owed) = self.queues.remove(&mb) else {
            return Err(BackendError(format!(
                "W of micro-batch {mb} before its backward"
            )));
        };
        let ready = self.order.arrive(mb, owed).map_err(BackendError)?;
        if ready.is_empty() {
            return Ok(());
        }
        self.backend.enter()?;
        let b = &self.backend;
        let h = half_of(mb, self.microbatches);
        if self.halves[h].is_none() {
            let sums = self
                .params
                .iter()
                .map(|p| b.zeros(b.len(p)))
                .collect::<BackendResult<Vec<_>>>()?;
            self.halves[h] = Some(sums);
        }
        let sums = self.halves[h].as_mut().expect("made above");
        for (mb, owed) in ready {
            for job in &owed.jobs {
                job.run(b, sums)?;
            }
            if !owed.handed.is_empty() {
                self.shared.insert(mb, owed.handed);
            }
        }
        Ok(())
    }

    fn take_grads_in(&mut self, stage: &Stage) -> BackendResult<GradSums> {
        self.backend.enter()?;
        let m = self.microbatches;
        let mut halves: [Option<HalfSum>; 2] = [None, None];
        for (h, slot) in halves.iter_mut().enumerate() {
            let Some(sums) = self.halves[h].take() else {
                continue;
            };
            let next = self.order.next(h);
            let sums = sums
                .iter()
                .zip(&stage.params.tensors)
                .map(|(s, t)| Ok(Tensor::from_vec(&t.shape, self.backend.download(s)?)))
                .collect::<BackendResult<Vec<_>>>()?;
            *slot = Some(HalfSum { sums, next });
        }
        let shared = std::mem::take(&mut self.shared);
        self.order = HalfOrder::new(m);
        Ok(GradSums::from_parts(m, halves, shared))
    }
}

impl<B: Backend + Send> DeviceStage for BackendStage<B> {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn forward(
        &mut self,
        stage: &Stage,
        mb: usize,
        batch: &Batch,
        input: Option<Vec<f32>>,
        mtp_weight: f32,
        experts: Option<&mut dyn ExpertCompute>,
    ) -> Result<(Option<Vec<f32>>, StageStats), String> {
        self.forward_in(stage, mb, batch, input, mtp_weight, experts)
            .map_err(|e| e.0)
    }

    fn backward_input(
        &mut self,
        stage: &Stage,
        mb: usize,
        dy: Option<Vec<f32>>,
        experts: Option<&mut dyn ExpertCompute>,
    ) -> Result<Option<Vec<f32>>, String> {
        self.backward_input_in(stage, mb, dy, experts)
            .map_err(|e| e.0)
    }

    fn backward_weight(&mut self, _: &Stage, mb: usize) -> Result<(), String> {
        self.backward_weight_in(mb).map_err(|e| e.0)
    }

    fn stashed(&self) -> usize {
        self.stashes.len()
    }

    fn pending_weight(&self) -> usize {
        self.queues.len()
    }

    fn take_grads(&mut self, stage: &Stage) -> Result<GradSums, String> {
        self.take_grads_in(stage).map_err(|e| e.0)
    }

    fn reset(&mut self) {
        // the buffers are freed on this thread: the device must be current (best effort)
        let _ = self.backend.enter();
        self.stashes.clear();
        self.queues.clear();
        self.halves = [None, None];
        self.order = HalfOrder::new(self.microbatches);
        self.shared.clear();
    }

    fn load(&mut self, stage: &Stage) -> Result<(), String> {
        // the old parameters are freed here: their prepared copies go first
        if std::mem::take(&mut self.held) {
            self.backend.release_weights();
        }
        self.params = upload_params(&self.backend, &stage.params)
            .map_err(|e| format!("uploading the parameters: {e}"))?;
        self.backend.hold_weights();
        self.held = true;
        Ok(())
    }
}

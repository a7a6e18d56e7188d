//! Pipeline stages of a DeepSeek-V3: contiguous layer ranges with their own parameter stores, the
//! runner that executes F, B* and W per micro-batch, and the canonical gradient reduce.
//!
//! # Partition
//!
//! [`partition`] splits the `num_hidden_layers` decoder blocks into `S` contiguous ranges (earlier
//! stages take the remainder, because the last stage also carries the head and the MTP modules).
//! Stage 0 owns the token embedding; the last stage owns the final norm, the output head and every
//! MTP module. A stage may have no blocks (more stages than layers): it passes activations through.
//!
//! # The shared embedding
//!
//! MTP modules embed their shifted tokens with the main embedding table, so when the model has MTP
//! and `S > 1` the last stage holds its own copy of `model.embed_tokens.weight`. Both copies get
//! the same values at every parameter load. Its gradient is a *shared tensor*: per micro-batch the
//! whole-model backward (see [`DeepSeekV3::forward_backward_input`]) queues the MTP embedding
//! jobs first (they sit in the last stage) and the main embedding job last (stage 0). To reproduce
//! that sum bit for bit, every stage holding a shared tensor hands its jobs for it to the reduce
//! ([`GradSums::shared`], activation-sized); the reduce runs them per micro-batch, stages in
//! descending order, exactly where the single-process backward would have run them.
//!
//! # Canonical reduction
//!
//! A step's micro-batches form two halves, `0..⌈m/2⌉` and the rest (DualPipe's two lanes). Each
//! half's W jobs run, micro-batch by micro-batch in order, straight into one zeroed buffer per
//! tensor; the step's gradient is the first half's sum plus the second's: `g = H₀ + H₁`. A stage
//! copy keeps one running sum per half it runs ([`GradSums`]; a W that comes early waits as its
//! queued jobs), so it holds at most two gradient copies, never one per micro-batch.
//! [`forward_backward_microbatches`] is the single-process reference with the same arithmetic and
//! [`reduce`] puts the copies' sums together, so a pipelined step equals it bit for bit in f32.
//!
//! # On a device
//!
//! A [`StageRunner`] given a [`DeviceStage`] (`set_device`) hands it F, B* and W; the device keeps
//! its own parameters, stashes and W jobs, and returns the same [`GradSums`] (see
//! `kernels::device::model::stage`), so the reduce and the update do not change.

use super::config::ModelConfig;
use super::deepseek::{Batch, DeepSeekV3, Mtp, StepStats, Tail, TailStash, embed_rows, rope_table};
use super::layers::{
    Block, BlockStash, ExpertCompute, Ffn, Linear, Mla, Moe, RmsNorm, Rows, SwiGlu, experts_at,
};
use super::params::{Init, ParamId, ParamStore, TensorSource, WeightGrad, WeightGradQueue};
use crate::ops::rope::RopeTable;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

mod device;
mod microbatch;
mod sum;
pub use device::DeviceStage;
pub(crate) use device::{lock, or_panic, unlocked};
pub use microbatch::*;
pub use sum::*;

/// Contiguous layer ranges of `stages` pipeline stages over `layers` decoder blocks; the first
/// `layers % stages` stages get one block more. Stages past the last block are empty.
pub fn partition(layers: usize, stages: usize) -> Vec<Range<usize>> {
    assert!(stages >= 1, "a pipeline has at least one stage");
    let (base, extra) = (layers / stages, layers % stages);
    let mut start = 0;
    (0..stages)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// The ids (in the whole model, ascending) of the tensors stage `index` of `ranges` holds: its
/// blocks', the embedding on the first stage (and the last when the model has MTP), the final
/// norm, the head and the MTP modules on the last.
pub fn stage_tensors(model: &DeepSeekV3, ranges: &[Range<usize>], index: usize) -> Vec<usize> {
    let count = ranges.len();
    let last = index + 1 == count;
    let full = &model.params;
    let has_mtp = !model.tail.mtp.is_empty();
    let mut prefixes: Vec<String> = ranges[index]
        .clone()
        .map(|l| format!("model.layers.{l}."))
        .collect();
    if last {
        prefixes.extend(
            (0..model.tail.mtp.len())
                .map(|k| format!("model.layers.{}.", model.cfg.num_hidden_layers + k)),
        );
    }
    let want_embed = index == 0 || (last && has_mtp);
    let embed_name = &full.names[model.embed.0];
    (0..full.len())
        .filter(|&i| {
            let name = &full.names[i];
            (want_embed && name == embed_name)
                || (last && (name == "model.norm.weight" || name == "lm_head.weight"))
                || prefixes.iter().any(|p| name.starts_with(p.as_str()))
        })
        .collect()
}

/// Every tensor of `model` given to one of `stages` owners: the stage that holds it (the first,
/// for a tensor two stages hold). Each list ascends; together they cover the model once.
pub fn owners(model: &DeepSeekV3, stages: usize) -> Vec<Vec<usize>> {
    let ranges = partition(model.cfg.num_hidden_layers, stages);
    let mut taken = vec![false; model.params.len()];
    (0..stages)
        .map(|s| {
            stage_tensors(model, &ranges, s)
                .into_iter()
                .filter(|&i| !std::mem::replace(&mut taken[i], true))
                .collect()
        })
        .collect()
}

/// One pipeline stage: its layers and a parameter store holding only the tensors they use
/// (Hugging Face names, as in the whole model).
#[derive(Clone, Debug)]
pub struct Stage {
    pub cfg: ModelConfig,
    /// Model stage index `0..count`.
    pub index: usize,
    pub count: usize,
    /// The decoder blocks it runs.
    pub layers: Range<usize>,
    pub params: ParamStore,
    /// `global[local.0]` is the id of the same tensor in the whole model.
    pub global: Vec<ParamId>,
    /// The embedding table (local id): stage 0, and the last stage when the model has MTP.
    pub embed: Option<ParamId>,
    pub blocks: Vec<Block>,
    pub tail: Option<Tail>,
    /// Per local tensor: another stage holds it too (the embedding, with MTP and `S > 1`); its W
    /// jobs go to the reduce instead of this stage's running sums.
    pub shared: Vec<bool>,
}

fn remap_linear(l: &mut Linear, f: &dyn Fn(ParamId) -> ParamId) {
    l.w = f(l.w);
}

fn remap_norm(n: &mut RmsNorm, f: &dyn Fn(ParamId) -> ParamId) {
    n.w = f(n.w);
}

fn remap_swiglu(m: &mut SwiGlu, f: &dyn Fn(ParamId) -> ParamId) {
    remap_linear(&mut m.gate, f);
    remap_linear(&mut m.up, f);
    remap_linear(&mut m.down, f);
}

fn remap_mla(a: &mut Mla, f: &dyn Fn(ParamId) -> ParamId) {
    for l in [&mut a.q_a, &mut a.q_b, &mut a.kv_a, &mut a.kv_b, &mut a.o] {
        remap_linear(l, f);
    }
    remap_norm(&mut a.q_a_norm, f);
    remap_norm(&mut a.kv_a_norm, f);
}

fn remap_moe(m: &mut Moe, f: &dyn Fn(ParamId) -> ParamId) {
    remap_linear(&mut m.gate, f);
    m.bias = f(m.bias);
    m.experts.iter_mut().for_each(|e| remap_swiglu(e, f));
    remap_swiglu(&mut m.shared, f);
}

fn remap_block(b: &mut Block, f: &dyn Fn(ParamId) -> ParamId) {
    remap_norm(&mut b.input_norm, f);
    remap_mla(&mut b.attn, f);
    remap_norm(&mut b.post_norm, f);
    match &mut b.ffn {
        Ffn::Dense(m) => remap_swiglu(m, f),
        Ffn::Moe(m) => remap_moe(m, f),
    }
}

fn remap_mtp(m: &mut Mtp, f: &dyn Fn(ParamId) -> ParamId) {
    remap_norm(&mut m.enorm, f);
    remap_norm(&mut m.hnorm, f);
    remap_linear(&mut m.eh_proj, f);
    remap_block(&mut m.block, f);
    remap_norm(&mut m.head_norm, f);
}

fn job_param(job: &WeightGrad) -> ParamId {
    job.param()
}

impl Stage {
    /// Stage `index` of `ranges.len()` cut out of `model` (values copied; layer structure remapped
    /// onto the stage's own store).
    pub fn from_model(model: &DeepSeekV3, ranges: &[Range<usize>], index: usize) -> Stage {
        let count = ranges.len();
        assert!(index < count, "stage {index} of {count}");
        let layers = ranges[index].clone();
        let last = index + 1 == count;
        let cfg = &model.cfg;
        let full = &model.params;
        let has_mtp = !model.tail.mtp.is_empty();
        let want_embed = index == 0 || (last && has_mtp);
        let mut map: BTreeMap<ParamId, ParamId> = BTreeMap::new();
        let mut params = ParamStore::default();
        let mut global = Vec::new();
        for i in stage_tensors(model, ranges, index) {
            let (name, t) = (&full.names[i], &full.tensors[i]);
            let id = params.add(name.clone(), &t.shape, Init::Zeros, full.trainable[i], 0);
            params.tensors[id.0].data.copy_from_slice(&t.data);
            map.insert(ParamId(i), id);
            global.push(ParamId(i));
        }
        let f = |id: ParamId| {
            *map.get(&id)
                .unwrap_or_else(|| panic!("stage {index} lacks tensor {}", full.names[id.0]))
        };
        let blocks = model.blocks[layers.clone()]
            .iter()
            .map(|b| {
                let mut b = b.clone();
                remap_block(&mut b, &f);
                b
            })
            .collect();
        let tail = last.then(|| {
            let mut t = model.tail.clone();
            remap_norm(&mut t.norm, &f);
            remap_linear(&mut t.head, &f);
            t.mtp.iter_mut().for_each(|m| remap_mtp(m, &f));
            t
        });
        let embed = want_embed.then(|| f(model.embed));
        let mut shared = vec![false; params.len()];
        // The embedding is shared by stage 0 and the last stage when the model has MTP.
        if count > 1 && has_mtp && (index == 0 || last) {
            shared[f(model.embed).0] = true;
        }
        Stage {
            cfg: cfg.clone(),
            index,
            count,
            layers,
            params,
            global,
            embed,
            blocks,
            tail,
            shared,
        }
    }

    /// Every stage of an `stages`-way partition of `model`.
    pub fn split(model: &DeepSeekV3, stages: usize) -> Vec<Stage> {
        let ranges = partition(model.cfg.num_hidden_layers, stages);
        (0..stages)
            .map(|s| Stage::from_model(model, &ranges, s))
            .collect()
    }

    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }

    /// Copies this stage's tensors (parameters and buffers) from a whole-model store.
    pub fn load_from(&mut self, full: &dyn TensorSource) {
        for (local, g) in self.params.tensors.iter_mut().zip(&self.global) {
            local.data.copy_from_slice(&full.tensor(g.0).data);
        }
    }

    fn embed_rows(&self, ids: &[u32]) -> Vec<f32> {
        let table = self.embed.expect("this stage holds the embedding");
        embed_rows(&self.params, table, ids, self.cfg.hidden_size)
    }

    /// Forward of one micro-batch. Stage 0 reads `batch.inputs`; every other stage reads
    /// `input` (the previous stage's output, [batch·seq, hidden]). Returns the output hidden
    /// states (None on the last stage, which computes the losses), the stash and the stats.
    pub fn forward(
        &self,
        batch: &Batch,
        input: Option<Vec<f32>>,
        mtp_weight: f32,
    ) -> (Option<Vec<f32>>, StageStash, StageStats) {
        self.forward_with(batch, input, mtp_weight, None, 0)
    }

    /// Forward with the routed experts of the decoder blocks and MTP modules in `experts` when
    /// given (`mb` names the micro-batch there).
    pub fn forward_with(
        &self,
        batch: &Batch,
        input: Option<Vec<f32>>,
        mtp_weight: f32,
        mut experts: Option<&mut dyn ExpertCompute>,
        mb: usize,
    ) -> (Option<Vec<f32>>, StageStash, StageStats) {
        let p = &self.params;
        let (bsz, t) = (batch.batch, batch.seq);
        let d = self.cfg.hidden_size;
        let n = bsz * t;
        let table = rope_table(&self.cfg, t);
        let rows = Rows { batch: bsz, seq: t };
        let mut stats = StageStats::default();
        let ids = Arc::new(batch.inputs.clone());
        let mut x = if self.is_first() {
            Arc::new(self.embed_rows(&ids))
        } else {
            let x = input.expect("a stage after the first needs its input activations");
            assert_eq!(
                x.len(),
                n * d,
                "stage {} input has {} values, want {n}×{d}",
                self.index,
                x.len()
            );
            Arc::new(x)
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let remote = experts_at(&mut experts, self.layers.start + i, mb);
            let (y, st, ms) = b.forward_with(p, x, rows, &table, remote);
            if let Some(ms) = ms {
                stats.balance.push(ms.balance_loss);
                stats.loads.push(ms.loads);
            }
            blocks.push(st);
            x = Arc::new(y);
        }
        let Some(tail) = &self.tail else {
            let out = Arc::try_unwrap(x).unwrap_or_else(|a| (*a).clone());
            return (
                Some(out),
                StageStash {
                    ids,
                    rows,
                    table,
                    blocks,
                    tail: None,
                },
                stats,
            );
        };
        let embed = self.embed.unwrap_or(ParamId(usize::MAX));
        let (st, ts) = tail.forward(
            p, embed, &self.cfg, batch, x, mtp_weight, &table, experts, mb,
        );
        stats.loss = ts.loss;
        stats.mtp_loss = ts.mtp_loss;
        stats.mtp_objective = ts.mtp_objective;
        stats.balance.extend(ts.balance);
        stats.loads.extend(ts.loads);
        (
            None,
            StageStash {
                ids,
                rows,
                table,
                blocks,
                tail: Some(st),
            },
            stats,
        )
    }

    /// Input-gradient backward of one micro-batch: `dy` is the gradient of this stage's output
    /// (None on the last stage, whose backward starts from its losses). Returns the gradient of
    /// its input (None on stage 0); every weight gradient is left in `q`.
    pub fn backward_input(
        &self,
        stash: StageStash,
        dy: Option<Vec<f32>>,
        q: &mut WeightGradQueue,
    ) -> Option<Vec<f32>> {
        self.backward_input_with(stash, dy, q, None, 0)
    }

    /// Backward with the same `experts` and `mb` as the forward that made `stash`.
    pub fn backward_input_with(
        &self,
        stash: StageStash,
        dy: Option<Vec<f32>>,
        q: &mut WeightGradQueue,
        mut experts: Option<&mut dyn ExpertCompute>,
        mb: usize,
    ) -> Option<Vec<f32>> {
        let p = &self.params;
        let StageStash {
            ids,
            rows,
            table,
            blocks,
            tail,
        } = stash;
        let mut dx = match (&self.tail, tail) {
            (Some(tl), Some(st)) => {
                let embed = self.embed.unwrap_or(ParamId(usize::MAX));
                tl.backward_input(
                    p,
                    embed,
                    &self.cfg,
                    st,
                    rows,
                    &table,
                    q,
                    experts.as_deref_mut().map(|e| e as &mut dyn ExpertCompute),
                    mb,
                )
            }
            (None, None) => dy.expect("a stage before the last needs the gradient of its output"),
            _ => unreachable!("the stash has a tail exactly on the last stage"),
        };
        for (i, (b, st)) in self.blocks.iter().zip(blocks).enumerate().rev() {
            let remote = experts_at(&mut experts, self.layers.start + i, mb);
            dx = b.backward_with(p, dx, st, rows, &table, q, remote);
        }
        if self.is_first() {
            let w = self.embed.expect("stage 0 holds the embedding");
            q.push(WeightGrad::Embedding { w, ids, dy: dx });
            None
        } else {
            Some(dx)
        }
    }

    /// Runs W jobs of one micro-batch into `sums` (this stage's running sums of its half of the
    /// micro-batches); jobs on shared tensors are handed back for the reduce, in queue order.
    pub fn backward_weight(&self, q: &mut WeightGradQueue, sums: &mut [Tensor]) -> Vec<WeightGrad> {
        let mut now = WeightGradQueue::default();
        let mut handed = Vec::new();
        for job in q.jobs.drain(..) {
            if self.shared[job_param(&job).0] {
                handed.push(job);
            } else {
                now.push(job);
            }
        }
        now.run(&self.params, sums);
        handed
    }
}

/// What one stage reports about one micro-batch's forward.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageStats {
    /// Mean main cross-entropy (last stage only, else 0).
    pub loss: f64,
    /// MTP loss as in [`StepStats::mtp_loss`] (last stage only).
    pub mtp_loss: f64,
    /// λ-weighted MTP part of the objective (last stage only).
    pub mtp_objective: f64,
    /// Balance loss per MoE layer it ran (main layers, then MTP layers).
    pub balance: Vec<f64>,
    /// Expert loads per MoE layer, same order.
    pub loads: Vec<Vec<u32>>,
}

impl StageStats {
    /// The whole-model stats of one micro-batch from its stages' stats in stage order, with the
    /// same summation order as `DeepSeekV3::forward_backward_input`.
    pub fn combine(stages: &[StageStats]) -> StepStats {
        let last = stages.last().expect("at least one stage");
        let mut s = StepStats {
            loss: last.loss,
            mtp_loss: last.mtp_loss,
            ..StepStats::default()
        };
        for st in stages {
            for (b, l) in st.balance.iter().zip(&st.loads) {
                s.balance_loss += b;
                s.loads.push(l.clone());
            }
        }
        s.objective = last.mtp_objective;
        s.objective += s.loss + s.balance_loss;
        s
    }
}

/// The activations one stage keeps between a micro-batch's forward and its backward.
pub struct StageStash {
    ids: Arc<Vec<u32>>,
    rows: Rows,
    table: RopeTable,
    blocks: Vec<BlockStash>,
    tail: Option<TailStash>,
}

impl std::fmt::Debug for StageStash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StageStash({} blocks, tail: {})",
            self.blocks.len(),
            self.tail.is_some()
        )
    }
}

/// A runner's expert groups reborrowed for one call (None: the experts run in the stage).
fn experts_of(e: &mut Option<Box<dyn ExpertCompute>>) -> Option<&mut dyn ExpertCompute> {
    e.as_deref_mut().map(|e| e as &mut dyn ExpertCompute)
}

/// A stage plus its per-micro-batch state: stashes between F and B, queued W jobs between B* and
/// W, and weight gradients until the reduce takes them.
#[derive(Debug)]
pub struct StageRunner {
    pub stage: Stage,
    pub mtp_weight: f32,
    stashes: BTreeMap<usize, StageStash>,
    queues: BTreeMap<usize, WeightGradQueue>,
    grads: GradSums,
    /// The routed experts of this stage's decoder blocks when they run elsewhere (`--ep`).
    experts: Option<Box<dyn ExpertCompute>>,
    /// The device F, B* and W run on when not on the CPU model (then the fields above but
    /// `stage`, `mtp_weight` and `experts` stay empty; the device's MoE layers hand their routed
    /// experts to `experts` when there are expert groups). In a mutex so that the runner is `Sync` (an actor
    /// holds it across awaits) though a device's handles are only `Send`; `&mut self` methods
    /// reach it without locking.
    device: Option<std::sync::Mutex<Box<dyn DeviceStage>>>,
}

impl StageRunner {
    /// A runner of `stage` for steps of `microbatches` micro-batches.
    pub fn new(stage: Stage, mtp_weight: f32, microbatches: usize) -> StageRunner {
        StageRunner {
            stage,
            mtp_weight,
            stashes: BTreeMap::new(),
            queues: BTreeMap::new(),
            grads: GradSums::new(microbatches),
            experts: None,
            device: None,
        }
    }

    /// Runs F, B* and W on `device` from now on, with this stage's current parameter values
    /// (the routed experts stay in their expert groups when `set_experts` gave some).
    pub fn set_device(&mut self, mut device: Box<dyn DeviceStage>) -> Result<(), String> {
        device.load(&self.stage)?;
        self.device = Some(std::sync::Mutex::new(device));
        Ok(())
    }

    /// Where F, B* and W run: the device's description, or None on the CPU model.
    pub fn device(&self) -> Option<String> {
        self.device.as_ref().map(|d| lock(d).describe())
    }

    /// `r` or a panic naming the stage and its device (a failure its supervisor heals).
    fn on_device<T>(&self, r: Result<T, String>) -> T {
        or_panic(r, &format!("stage {}", self.stage.index), self.device())
    }

    /// Runs the routed experts of the decoder blocks in `experts` from now on (also beside a
    /// device stage: its MoE layers hand them their dispatched rows).
    pub fn set_experts(&mut self, experts: Box<dyn ExpertCompute>) {
        self.experts = Some(experts);
    }

    /// F: runs micro-batch `mb` and keeps its stash. Returns the output activations (None on the
    /// last stage) and the stage's stats for it.
    pub fn forward(
        &mut self,
        mb: usize,
        batch: &Batch,
        input: Option<Vec<f32>>,
    ) -> (Option<Vec<f32>>, StageStats) {
        if let Some(d) = self.device.as_mut().map(unlocked) {
            let experts = experts_of(&mut self.experts);
            let r = d.forward(&self.stage, mb, batch, input, self.mtp_weight, experts);
            return self.on_device(r);
        }
        let (out, stash, stats) = self.stage.forward_with(
            batch,
            input,
            self.mtp_weight,
            experts_of(&mut self.experts),
            mb,
        );
        let old = self.stashes.insert(mb, stash);
        assert!(
            old.is_none(),
            "stage {}: forward of micro-batch {mb} ran twice",
            self.stage.index
        );
        (out, stats)
    }

    /// B*: input gradient of `mb` from the gradient of its output; queues its W jobs.
    pub fn backward_input(&mut self, mb: usize, dy: Option<Vec<f32>>) -> Option<Vec<f32>> {
        if let Some(d) = self.device.as_mut().map(unlocked) {
            let experts = experts_of(&mut self.experts);
            let r = d.backward_input(&self.stage, mb, dy, experts);
            return self.on_device(r);
        }
        let stash = self.stashes.remove(&mb).unwrap_or_else(|| {
            panic!(
                "stage {}: backward of micro-batch {mb} before its forward",
                self.stage.index
            )
        });
        let mut q = WeightGradQueue::default();
        let dx =
            self.stage
                .backward_input_with(stash, dy, &mut q, experts_of(&mut self.experts), mb);
        let old = self.queues.insert(mb, q);
        assert!(
            old.is_none(),
            "stage {}: backward of micro-batch {mb} ran twice",
            self.stage.index
        );
        dx
    }

    /// W: runs the queued weight-gradient jobs of `mb` into the running sum of its half (or
    /// keeps them until the micro-batches before it in that half have run theirs).
    pub fn backward_weight(&mut self, mb: usize) {
        if let Some(d) = self.device.as_mut().map(unlocked) {
            let r = d.backward_weight(&self.stage, mb);
            return self.on_device(r);
        }
        let q = self.queues.remove(&mb).unwrap_or_else(|| {
            panic!(
                "stage {}: W of micro-batch {mb} before its backward",
                self.stage.index
            )
        });
        self.grads.weight(&self.stage, mb, q);
    }

    /// B: B* then W at once.
    pub fn backward(&mut self, mb: usize, dy: Option<Vec<f32>>) -> Option<Vec<f32>> {
        let dx = self.backward_input(mb, dy);
        self.backward_weight(mb);
        dx
    }

    /// Micro-batches whose forward ran and whose backward has not.
    pub fn stashed(&self) -> usize {
        if let Some(d) = &self.device {
            return lock(d).stashed();
        }
        self.stashes.len()
    }

    /// Micro-batches whose W is still owed.
    pub fn pending_weight(&self) -> usize {
        if let Some(d) = &self.device {
            return lock(d).pending_weight();
        }
        self.queues.len()
    }

    /// Hands over the step's gradient sums.
    pub fn take_grads(&mut self) -> GradSums {
        if let Some(d) = self.device.as_mut().map(unlocked) {
            let r = d.take_grads(&self.stage);
            return self.on_device(r);
        }
        let m = self.grads.microbatches();
        std::mem::replace(&mut self.grads, GradSums::new(m))
    }

    /// Drops every stash, queued W and gradient (an aborted step).
    pub fn reset(&mut self) {
        self.stashes.clear();
        self.queues.clear();
        self.grads = GradSums::new(self.grads.microbatches());
        if let Some(d) = self.device.as_mut().map(unlocked) {
            d.reset();
        }
        if let Some(e) = experts_of(&mut self.experts) {
            e.reset();
        }
    }

    /// Installs parameter values from a whole-model store (after a commit or on restore).
    pub fn load_from(&mut self, full: &dyn TensorSource) {
        self.stage.load_from(full);
        if let Some(d) = self.device.as_mut().map(unlocked) {
            let r = d.load(&self.stage);
            self.on_device(r);
        }
        if let Some(e) = experts_of(&mut self.experts) {
            e.load_from(full);
        }
    }
}

#[cfg(test)]
mod tests;

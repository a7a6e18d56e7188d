//! The whole DeepSeek-V3: embedding, decoder blocks, final norm and head, and the MTP modules
//! (shared embedding and head); one training step's forward, split backward and losses.

use super::config::ModelConfig;
use super::layers::{
    Block, BlockStash, ExpertCompute, Ffn, Linear, NormStash, RmsNorm, Rows, experts_at,
};
use super::params::{Init, ParamId, ParamStore, WeightGrad, WeightGradQueue};
use crate::ops::rope::{RopeTable, Yarn};
use crate::ops::{cross_entropy, embedding};
use crate::tensor::Tensor;
use std::sync::Arc;

/// Numeric precision of the Linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32: the bitwise-deterministic reference.
    F32,
    /// BF16 mixed precision: every Linear GEMM on BF16-rounded operands with f32 accumulation,
    /// f32 master weights, gradients and moments. The GPU's (`--device cuda`); the CPU model
    /// itself stays f32 (`kernels::device::backend::Cpu` emulates it for checks).
    Bf16,
    /// DeepSeek-V3's FP8 recipe for Fprop, Dgrad and Wgrad (see `set_precision`).
    Fp8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "fp8" => Ok(Precision::Fp8),
            _ => Err(format!(
                "unknown precision {s:?} (expected f32, bf16 or fp8)"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        })
    }
}

/// One multi-token-prediction module (depth k), stored as layer `num_hidden_layers + k − 1`.
#[derive(Clone, Debug)]
pub struct Mtp {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    pub eh_proj: Linear,
    pub block: Block,
    pub head_norm: RmsNorm,
}

/// The model's output end: final norm, output head and the MTP modules (which share the head and
/// the embedding). The whole model and the last pipeline stage run it through the same code.
#[derive(Clone, Debug)]
pub struct Tail {
    pub norm: RmsNorm,
    pub head: Linear,
    pub mtp: Vec<Mtp>,
}

/// A DeepSeek-V3 model: its parameters and the layer structure that indexes them.
#[derive(Clone, Debug)]
pub struct DeepSeekV3 {
    pub cfg: ModelConfig,
    pub params: ParamStore,
    pub embed: ParamId,
    pub blocks: Vec<Block>,
    pub tail: Tail,
}

/// Token windows for one step: `inputs[b*seq + i]` predicts `targets[b*seq + i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Batch {
    /// Splits `batch` windows of `seq + 1` tokens each into inputs and next-token targets.
    pub fn from_windows(windows: &[u32], batch: usize, seq: usize) -> Batch {
        assert_eq!(windows.len(), batch * (seq + 1));
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for w in windows.chunks_exact(seq + 1) {
            inputs.extend_from_slice(&w[..seq]);
            targets.extend_from_slice(&w[1..]);
        }
        Batch {
            batch,
            seq,
            inputs,
            targets,
        }
    }
}

/// Losses and routing statistics of one forward pass.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    /// Mean main-head cross-entropy.
    pub loss: f64,
    /// Mean cross-entropy of the MTP heads (average over depths of their per-prediction mean).
    pub mtp_loss: f64,
    /// Sum over MoE layers of the sequence-wise balance loss (α included).
    pub balance_loss: f64,
    /// The optimised objective: loss + λ·L_MTP + balance.
    pub objective: f64,
    /// Expert loads per MoE layer, main layers first then MTP layers.
    pub loads: Vec<Vec<u32>>,
}

impl StepStats {
    /// max / mean expert load, averaged over MoE layers (1.0 is perfect balance).
    pub fn load_imbalance(&self) -> f64 {
        if self.loads.is_empty() {
            return 1.0;
        }
        let per: Vec<f64> = self
            .loads
            .iter()
            .map(|l| {
                let mean = l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64;
                l.iter().copied().max().unwrap_or(0) as f64 / mean.max(1e-9)
            })
            .collect();
        per.iter().sum::<f64>() / per.len() as f64
    }
}

impl DeepSeekV3 {
    /// A freshly initialised model: matrices ~ N(0, init_std), norms 1, routing biases 0.
    pub fn new(cfg: &ModelConfig, init_std: f32, seed: u64) -> DeepSeekV3 {
        let mut p = ParamStore::default();
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed = p.add(
            "model.embed_tokens.weight".into(),
            &[v, d],
            Init::Normal(init_std),
            true,
            seed,
        );
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| {
                Block::new(
                    &mut p,
                    &format!("model.layers.{l}"),
                    cfg,
                    cfg.is_moe_layer(l),
                    init_std,
                    seed,
                )
            })
            .collect();
        let norm = RmsNorm::new(
            &mut p,
            "model.norm.weight".into(),
            d,
            cfg.rms_norm_eps,
            seed,
        );
        let head = Linear::new(&mut p, "lm_head.weight".into(), d, v, init_std, seed);
        let mtp = (0..cfg.num_nextn_predict_layers)
            .map(|k| {
                let pre = format!("model.layers.{}", cfg.num_hidden_layers + k);
                let eps = cfg.rms_norm_eps;
                Mtp {
                    enorm: RmsNorm::new(&mut p, format!("{pre}.enorm.weight"), d, eps, seed),
                    hnorm: RmsNorm::new(&mut p, format!("{pre}.hnorm.weight"), d, eps, seed),
                    eh_proj: Linear::new(
                        &mut p,
                        format!("{pre}.eh_proj.weight"),
                        2 * d,
                        d,
                        init_std,
                        seed,
                    ),
                    block: Block::new(&mut p, &pre, cfg, true, init_std, seed),
                    head_norm: RmsNorm::new(
                        &mut p,
                        format!("{pre}.shared_head.norm.weight"),
                        d,
                        eps,
                        seed,
                    ),
                }
            })
            .collect();
        DeepSeekV3 {
            cfg: cfg.clone(),
            params: p,
            embed,
            blocks,
            tail: Tail { norm, head, mtp },
        }
    }

    /// The RoPE table for sequences of `seq` tokens (YaRN-corrected when the config asks).
    pub fn rope_table(&self, seq: usize) -> RopeTable {
        rope_table(&self.cfg, seq)
    }

    /// Main-model logits [batch·seq, vocab] (no MTP), for evaluation and parity tests.
    pub fn logits(&self, batch: &Batch) -> Vec<f32> {
        let table = self.rope_table(batch.seq);
        let rows = Rows {
            batch: batch.batch,
            seq: batch.seq,
        };
        let mut x = self.embed_rows(&batch.inputs);
        for b in &self.blocks {
            x = b.forward(&self.params, Arc::new(x), rows, &table).0;
        }
        let (hn, _) = self.tail.norm.forward(&self.params, Arc::new(x));
        self.tail.head.forward(&self.params, &hn)
    }

    /// Mean main-head cross-entropy of a batch, forward only.
    pub fn eval_loss(&self, batch: &Batch) -> f64 {
        let logits = self.logits(batch);
        cross_entropy::forward(&logits, &batch.targets, self.cfg.vocab_size)
            / batch.targets.len() as f64
    }

    fn embed_rows(&self, ids: &[u32]) -> Vec<f32> {
        embed_rows(&self.params, self.embed, ids, self.cfg.hidden_size)
    }

    /// Forward and backward of one step; gradients are added into `grads` (shaped like params).
    /// `mtp_weight` is λ; with λ = 0 the MTP modules are skipped entirely.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        mtp_weight: f32,
        grads: &mut [Tensor],
    ) -> StepStats {
        let mut q = WeightGradQueue::default();
        let stats = self.forward_backward_input(batch, mtp_weight, &mut q);
        q.run(&self.params, grads);
        stats
    }

    /// Forward and input-gradient backward; every weight gradient is left in `q` (the W half).
    pub fn forward_backward_input(
        &self,
        batch: &Batch,
        mtp_weight: f32,
        q: &mut WeightGradQueue,
    ) -> StepStats {
        let p = &self.params;
        let (bsz, t) = (batch.batch, batch.seq);
        let table = self.rope_table(t);
        let rows = Rows { batch: bsz, seq: t };
        let ids = Arc::new(batch.inputs.clone());
        let mut stats = StepStats::default();

        // main forward
        let mut x = Arc::new(self.embed_rows(&ids));
        let mut stashes = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (y, st, ms) = b.forward(p, x, rows, &table);
            if let Some(ms) = ms {
                stats.balance_loss += ms.balance_loss;
                stats.loads.push(ms.loads);
            }
            stashes.push(st);
            x = Arc::new(y);
        }
        let (tail_st, ts) = self.tail.forward(
            p, self.embed, &self.cfg, batch, x, mtp_weight, &table, None, 0,
        );
        stats.loss = ts.loss;
        stats.mtp_loss = ts.mtp_loss;
        for (b, l) in ts.balance.into_iter().zip(ts.loads) {
            stats.balance_loss += b;
            stats.loads.push(l);
        }
        stats.objective = ts.mtp_objective;
        stats.objective += stats.loss + stats.balance_loss;
        let mut dx = self
            .tail
            .backward_input(p, self.embed, &self.cfg, tail_st, rows, &table, q, None, 0);

        // blocks backward
        for (b, st) in self.blocks.iter().zip(stashes).rev() {
            dx = b.backward(p, dx, st, rows, &table, q);
        }
        q.push(WeightGrad::Embedding {
            w: self.embed,
            ids,
            dy: dx,
        });
        stats
    }

    /// Sets the precision of every Linear except the output head, the MoE gate and MTP's
    /// `eh_proj`, which DeepSeek-V3 keeps in high precision (the embedding is not a GEMM).
    pub fn set_precision(&mut self, precision: Precision) {
        let fp8 = precision == Precision::Fp8;
        let set_block = |b: &mut Block| {
            let a = &mut b.attn;
            for l in [&mut a.q_a, &mut a.q_b, &mut a.kv_a, &mut a.kv_b, &mut a.o] {
                l.fp8 = fp8;
            }
            let mlps: Vec<&mut super::layers::SwiGlu> = match &mut b.ffn {
                Ffn::Dense(m) => vec![m],
                Ffn::Moe(m) => m
                    .experts
                    .iter_mut()
                    .chain(std::iter::once(&mut m.shared))
                    .collect(),
            };
            for m in mlps {
                m.gate.fp8 = fp8;
                m.up.fp8 = fp8;
                m.down.fp8 = fp8;
            }
        };
        self.blocks.iter_mut().for_each(set_block);
        self.tail
            .mtp
            .iter_mut()
            .for_each(|m| set_block(&mut m.block));
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.params.numel_trainable()
    }

    /// All MoE layers in order (main then MTP), for the bias update.
    pub fn moe_biases(&self) -> Vec<ParamId> {
        let mut out = Vec::new();
        for b in self
            .blocks
            .iter()
            .chain(self.tail.mtp.iter().map(|m| &m.block))
        {
            if let Ffn::Moe(m) = &b.ffn {
                out.push(m.bias);
            }
        }
        out
    }
}

/// The RoPE table of `cfg` for sequences of `seq` tokens (YaRN-corrected when the config asks).
pub fn rope_table(cfg: &ModelConfig, seq: usize) -> RopeTable {
    let yarn = cfg.rope_scaling.as_ref().map(|r| Yarn {
        factor: r.factor,
        original_max_position: r.original_max_position_embeddings,
        beta_fast: r.beta_fast,
        beta_slow: r.beta_slow,
    });
    RopeTable::new(cfg.qk_rope_head_dim, cfg.rope_theta, seq.max(1), yarn)
}

/// Embedding rows [ids.len(), d] of table `embed` in `p`.
pub fn embed_rows(p: &ParamStore, embed: ParamId, ids: &[u32], d: usize) -> Vec<f32> {
    let mut x = vec![0.0; ids.len() * d];
    embedding::forward(&mut x, ids, p.get(embed), d);
    x
}

/// What the tail reports about one batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TailStats {
    /// Mean main cross-entropy.
    pub loss: f64,
    /// As [`StepStats::mtp_loss`].
    pub mtp_loss: f64,
    /// The λ-weighted MTP part of the objective.
    pub mtp_objective: f64,
    /// Balance loss per MTP MoE layer.
    pub balance: Vec<f64>,
    /// Expert loads per MTP MoE layer.
    pub loads: Vec<Vec<u32>>,
}

struct MtpStash {
    ids: Arc<Vec<u32>>,
    targets: Vec<u32>,
    en: NormStash,
    hn: NormStash,
    cat: Arc<Vec<f32>>,
    block: BlockStash,
    z_norm: NormStash,
    z: Arc<Vec<f32>>,
    logits: Vec<f32>,
    len: usize,
}

/// Activations the tail's backward needs.
pub struct TailStash {
    targets: Vec<u32>,
    norm: NormStash,
    hn: Arc<Vec<f32>>,
    logits: Vec<f32>,
    mtp: Vec<MtpStash>,
    mtp_weight: f32,
}

impl std::fmt::Debug for TailStash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TailStash({} MTP depths)", self.mtp.len())
    }
}

impl Tail {
    /// From the last block's output `h_final` [batch·seq, d]: the main loss and, with λ > 0, the
    /// MTP modules depth by depth (depth k reads the previous depth's hidden and Emb(t_{i+k})).
    /// With `experts`, the MTP MoE layers' routed experts run there (site layer
    /// `num_hidden_layers + k`, micro-batch `mb`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        p: &ParamStore,
        embed: ParamId,
        cfg: &ModelConfig,
        batch: &Batch,
        h_final: Arc<Vec<f32>>,
        mtp_weight: f32,
        table: &RopeTable,
        mut experts: Option<&mut dyn ExpertCompute>,
        mb: usize,
    ) -> (TailStash, TailStats) {
        let (bsz, t) = (batch.batch, batch.seq);
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let n = bsz * t;
        let mut stats = TailStats::default();
        let (hn, norm_st) = self.norm.forward(p, h_final.clone());
        let hn = Arc::new(hn);
        let logits = self.head.forward(p, &hn);
        stats.loss = cross_entropy::forward(&logits, &batch.targets, vocab) / n as f64;
        let depth = self.mtp.len() as f32;
        let mut mtp = Vec::new();
        if mtp_weight > 0.0 {
            let mut prev = h_final;
            let mut prev_len = t;
            for (k0, m) in self.mtp.iter().enumerate() {
                let k = k0 + 1;
                let len = t.saturating_sub(k);
                if len == 0 {
                    break;
                }
                let mut h_rows = Vec::with_capacity(bsz * len * d);
                let mut mids = Vec::with_capacity(bsz * len);
                let mut mtargets = Vec::with_capacity(bsz * len);
                for b in 0..bsz {
                    h_rows.extend_from_slice(&prev[b * prev_len * d..(b * prev_len + len) * d]);
                    mids.extend_from_slice(&batch.inputs[b * t + k..b * t + k + len]);
                    mtargets.extend_from_slice(&batch.targets[b * t + k..b * t + k + len]);
                }
                let mids = Arc::new(mids);
                let e = embed_rows(p, embed, &mids, d);
                let (en, en_st) = m.enorm.forward(p, Arc::new(e));
                let (hnn, hn_st) = m.hnorm.forward(p, Arc::new(h_rows));
                let mut cat = vec![0.0; bsz * len * 2 * d];
                for ((row, a), b) in cat
                    .chunks_exact_mut(2 * d)
                    .zip(en.chunks_exact(d))
                    .zip(hnn.chunks_exact(d))
                {
                    row[..d].copy_from_slice(a);
                    row[d..].copy_from_slice(b);
                }
                let cat = Arc::new(cat);
                let hp = m.eh_proj.forward(p, &cat);
                let mrows = Rows {
                    batch: bsz,
                    seq: len,
                };
                let remote = experts_at(&mut experts, cfg.num_hidden_layers + k0, mb);
                let (hout, bst, ms) = m.block.forward_with(p, Arc::new(hp), mrows, table, remote);
                if let Some(ms) = ms {
                    stats.balance.push(ms.balance_loss);
                    stats.loads.push(ms.loads);
                }
                let hout = Arc::new(hout);
                let (z, z_st) = m.head_norm.forward(p, hout.clone());
                let z = Arc::new(z);
                let mlogits = self.head.forward(p, &z);
                let sum = cross_entropy::forward(&mlogits, &mtargets, vocab);
                stats.mtp_loss += sum / (bsz * len) as f64 / depth as f64;
                stats.mtp_objective += mtp_weight as f64 / depth as f64 * sum / n as f64;
                mtp.push(MtpStash {
                    ids: mids,
                    targets: mtargets,
                    en: en_st,
                    hn: hn_st,
                    cat,
                    block: bst,
                    z_norm: z_st,
                    z,
                    logits: mlogits,
                    len,
                });
                prev = hout;
                prev_len = len;
            }
        }
        let st = TailStash {
            targets: batch.targets.clone(),
            norm: norm_st,
            hn,
            logits,
            mtp,
            mtp_weight,
        };
        (st, stats)
    }

    /// The gradient of `h_final` from the main and MTP losses; weight gradients (the shared
    /// head's and the embedding's MTP share included) go to `q`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_input(
        &self,
        p: &ParamStore,
        embed: ParamId,
        cfg: &ModelConfig,
        st: TailStash,
        rows: Rows,
        table: &RopeTable,
        q: &mut WeightGradQueue,
        mut experts: Option<&mut dyn ExpertCompute>,
        mb: usize,
    ) -> Vec<f32> {
        let (bsz, n) = (rows.batch, rows.n());
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let mut dlogits = vec![0.0; st.logits.len()];
        cross_entropy::backward_input(&mut dlogits, &st.logits, &st.targets, vocab, 1.0 / n as f32);
        drop(st.logits);
        let mut dhn = vec![0.0; n * d];
        self.head.backward(p, dlogits, st.hn, &mut dhn, false, q);
        let mut dx = vec![0.0; n * d];
        self.norm.backward(p, dhn, st.norm, &mut dx, false, q);
        // deepest depth first; each adds into the gradient of the hidden it read
        let depth = self.mtp.len() as f32;
        let mut dnext: Option<Vec<f32>> = None;
        for (k0, ms) in st.mtp.into_iter().enumerate().rev() {
            let m = &self.mtp[k0];
            let len = ms.len;
            let prev_len = len + 1;
            let mut dl = vec![0.0; ms.logits.len()];
            let scale = st.mtp_weight / depth / n as f32;
            cross_entropy::backward_input(&mut dl, &ms.logits, &ms.targets, vocab, scale);
            let mut dz = vec![0.0; bsz * len * d];
            self.head.backward(p, dl, ms.z, &mut dz, false, q);
            let mut dhout = dnext.take().unwrap_or_else(|| vec![0.0; bsz * len * d]);
            m.head_norm.backward(p, dz, ms.z_norm, &mut dhout, true, q);
            let mrows = Rows {
                batch: bsz,
                seq: len,
            };
            let remote = experts_at(&mut experts, cfg.num_hidden_layers + k0, mb);
            let dhp = m
                .block
                .backward_with(p, dhout, ms.block, mrows, table, q, remote);
            let mut dcat = vec![0.0; bsz * len * 2 * d];
            m.eh_proj.backward(p, dhp, ms.cat, &mut dcat, false, q);
            let mut den = Vec::with_capacity(bsz * len * d);
            let mut dhnn = Vec::with_capacity(bsz * len * d);
            for row in dcat.chunks_exact(2 * d) {
                den.extend_from_slice(&row[..d]);
                dhnn.extend_from_slice(&row[d..]);
            }
            let mut de = vec![0.0; den.len()];
            m.enorm.backward(p, den, ms.en, &mut de, false, q);
            q.push(WeightGrad::Embedding {
                w: embed,
                ids: ms.ids,
                dy: de,
            });
            let mut dh_rows = vec![0.0; dhnn.len()];
            m.hnorm.backward(p, dhnn, ms.hn, &mut dh_rows, false, q);
            // scatter into the previous hidden [bsz, prev_len, d]
            let target: &mut Vec<f32> = if k0 == 0 {
                &mut dx
            } else {
                dnext.get_or_insert_with(|| vec![0.0; bsz * prev_len * d])
            };
            for b in 0..bsz {
                let dst = &mut target[b * prev_len * d..(b * prev_len + len) * d];
                for (a, g) in dst.iter_mut().zip(&dh_rows[b * len * d..(b + 1) * len * d]) {
                    *a += g;
                }
            }
        }
        dx
    }
}

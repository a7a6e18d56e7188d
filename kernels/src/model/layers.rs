//! The DeepSeek-V3 layers: Linear, RMSNorm, MLA (naive form), SwiGLU FFN, DeepSeekMoE and the
//! decoder block. Each has `forward` (returns output and stash), `backward_input`, and defers W.

use super::config::ModelConfig;
use super::params::{Init, ParamId, ParamStore, WeightGrad, WeightGradQueue};
use crate::fp8;
use crate::fp8::quant::{quantize_1x128, quantize_128x128};
use crate::fp8::{Fp8Tensor, ScaleFormat};
use crate::ops::moe_dispatch::{self, DispatchPlan};
use crate::ops::moe_gate::{self, RouteRule, Routing};
use crate::ops::rope::RopeTable;
use crate::ops::{attention, balance, linear, rmsnorm, rope, swiglu};
use rayon::prelude::*;
use std::sync::Arc;

/// Batch geometry of the rows a layer sees: `batch` sequences of `seq` tokens, rows token-major.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub batch: usize,
    pub seq: usize,
}

impl Rows {
    pub fn n(&self) -> usize {
        self.batch * self.seq
    }
}

/// A Linear layer's input as kept for its weight gradient: f32, or under `--precision fp8` the
/// 1×128-tile E4M3 codes Fprop consumed (DeepSeek-V3 caches activations in FP8 for Wgrad).
#[derive(Clone, Debug)]
pub enum Saved {
    F32(Arc<Vec<f32>>),
    Fp8(Arc<Fp8Tensor>),
}

impl From<Arc<Vec<f32>>> for Saved {
    fn from(x: Arc<Vec<f32>>) -> Saved {
        Saved::F32(x)
    }
}

/// y = x·Wᵀ with W [out, in]. With `fp8` set, Fprop, Dgrad and Wgrad run as DeepSeek-V3's FP8
/// GEMMs (E4M3; x and dy in 1×128 tiles, W in 128×128 blocks, 128×1 tiles for Wgrad).
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: ParamId,
    pub d_in: usize,
    pub d_out: usize,
    pub fp8: bool,
}

impl Linear {
    pub fn new(
        p: &mut ParamStore,
        name: String,
        d_in: usize,
        d_out: usize,
        std: f32,
        seed: u64,
    ) -> Linear {
        let w = p.add(name, &[d_out, d_in], Init::Normal(std), true, seed);
        Linear {
            w,
            d_in,
            d_out,
            fp8: false,
        }
    }

    /// Keeps an input for backward: as is in f32, quantised to 1×128 E4M3 tiles in fp8.
    pub fn save(&self, x: Arc<Vec<f32>>) -> Saved {
        if self.fp8 {
            let n = x.len() / self.d_in;
            Saved::Fp8(Arc::new(quantize_1x128(&x, n, self.d_in, ScaleFormat::F32)))
        } else {
            Saved::F32(x)
        }
    }

    pub fn forward(&self, p: &ParamStore, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.d_in;
        if self.fp8 {
            return fp8::linear_fprop_fp8(x, p.get(self.w), n, self.d_in, self.d_out);
        }
        let mut y = vec![0.0; n * self.d_out];
        linear::forward(&mut y, x, p.get(self.w), n, self.d_in, self.d_out);
        y
    }

    /// Forward from an input already kept with `save` (FP8 inputs are not quantised twice).
    pub fn forward_saved(&self, p: &ParamStore, x: &Saved) -> Vec<f32> {
        match x {
            Saved::F32(x) => self.forward(p, x),
            Saved::Fp8(xq) => {
                let wq = quantize_128x128(p.get(self.w), self.d_out, self.d_in, ScaleFormat::F32);
                let mut y = vec![0.0; xq.rows * self.d_out];
                fp8::gemm::fp8_gemm_fprop(&mut y, xq, &wq);
                y
            }
        }
    }

    /// dx (+)= dy·W, then queues dW += dyᵀ·x.
    pub fn backward(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        x: impl Into<Saved>,
        dx: &mut [f32],
        acc: bool,
        q: &mut WeightGradQueue,
    ) {
        let n = dy.len() / self.d_out;
        if !self.fp8 {
            linear::backward_input(dx, &dy, p.get(self.w), n, self.d_in, self.d_out, acc);
            let x = match x.into() {
                Saved::F32(x) => x,
                Saved::Fp8(xq) => Arc::new(fp8::dequantize(&xq)),
            };
            q.push(WeightGrad::Linear { w: self.w, dy, x });
            return;
        }
        let g = fp8::linear_dgrad_fp8(&dy, p.get(self.w), n, self.d_in, self.d_out);
        if acc {
            dx.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        } else {
            dx.copy_from_slice(&g);
        }
        let x = match self.save_saved(x.into()) {
            Saved::Fp8(xq) => xq,
            Saved::F32(_) => unreachable!("save() quantises under fp8"),
        };
        q.push(WeightGrad::LinearFp8 { w: self.w, dy, x });
    }

    fn save_saved(&self, x: Saved) -> Saved {
        match x {
            Saved::F32(x) => self.save(x),
            fp8 => fp8,
        }
    }
}

/// RMSNorm with a learned scale.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub w: ParamId,
    pub d: usize,
    pub eps: f32,
}

/// What RMSNorm's backward needs: its input and 1/rms per row.
#[derive(Debug)]
pub struct NormStash {
    pub x: Arc<Vec<f32>>,
    pub rstd: Arc<Vec<f32>>,
}

impl RmsNorm {
    pub fn new(p: &mut ParamStore, name: String, d: usize, eps: f32, seed: u64) -> RmsNorm {
        let w = p.add(name, &[d], Init::Ones, true, seed);
        RmsNorm { w, d, eps }
    }

    pub fn forward(&self, p: &ParamStore, x: Arc<Vec<f32>>) -> (Vec<f32>, NormStash) {
        let n = x.len() / self.d;
        let mut y = vec![0.0; x.len()];
        let mut rstd = vec![0.0; n];
        rmsnorm::forward(&mut y, &mut rstd, &x, p.get(self.w), self.d, self.eps);
        (
            y,
            NormStash {
                x,
                rstd: Arc::new(rstd),
            },
        )
    }

    /// dx (+)= ∂/∂x, queues the scale's gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: NormStash,
        dx: &mut [f32],
        acc: bool,
        q: &mut WeightGradQueue,
    ) {
        rmsnorm::backward_input(dx, &dy, &st.x, &st.rstd, p.get(self.w), self.d, acc);
        q.push(WeightGrad::RmsNorm {
            w: self.w,
            dy,
            x: st.x,
            rstd: st.rstd,
        });
    }
}

/// Multi-head Latent Attention in its naive (training) form.
#[derive(Clone, Debug)]
pub struct Mla {
    pub q_a: Linear,
    pub q_a_norm: RmsNorm,
    pub q_b: Linear,
    pub kv_a: Linear,
    pub kv_a_norm: RmsNorm,
    pub kv_b: Linear,
    pub o: Linear,
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub kv_lora: usize,
    pub scale: f32,
}

/// Activations MLA's backward needs.
#[derive(Debug)]
pub struct MlaStash {
    h: Saved,
    q_norm: NormStash,
    cqn: Saved,
    kv_norm: NormStash,
    cn: Saved,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
    o: Saved,
}

fn positions(rows: usize, seq: usize) -> Vec<usize> {
    (0..rows).map(|i| i % seq).collect()
}

impl Mla {
    pub fn new(p: &mut ParamStore, prefix: &str, c: &ModelConfig, std: f32, seed: u64) -> Mla {
        let (d, h) = (c.hidden_size, c.num_attention_heads);
        let eps = c.rms_norm_eps;
        Mla {
            q_a: Linear::new(
                p,
                format!("{prefix}.q_a_proj.weight"),
                d,
                c.q_lora_rank,
                std,
                seed,
            ),
            q_a_norm: RmsNorm::new(
                p,
                format!("{prefix}.q_a_layernorm.weight"),
                c.q_lora_rank,
                eps,
                seed,
            ),
            q_b: Linear::new(
                p,
                format!("{prefix}.q_b_proj.weight"),
                c.q_lora_rank,
                h * c.qk_head_dim(),
                std,
                seed,
            ),
            kv_a: Linear::new(
                p,
                format!("{prefix}.kv_a_proj_with_mqa.weight"),
                d,
                c.kv_lora_rank + c.qk_rope_head_dim,
                std,
                seed,
            ),
            kv_a_norm: RmsNorm::new(
                p,
                format!("{prefix}.kv_a_layernorm.weight"),
                c.kv_lora_rank,
                eps,
                seed,
            ),
            kv_b: Linear::new(
                p,
                format!("{prefix}.kv_b_proj.weight"),
                c.kv_lora_rank,
                h * (c.qk_nope_head_dim + c.v_head_dim),
                std,
                seed,
            ),
            o: Linear::new(
                p,
                format!("{prefix}.o_proj.weight"),
                h * c.v_head_dim,
                d,
                std,
                seed,
            ),
            heads: h,
            nope: c.qk_nope_head_dim,
            rope: c.qk_rope_head_dim,
            v: c.v_head_dim,
            kv_lora: c.kv_lora_rank,
            scale: c.softmax_scale(),
        }
    }

    /// h [n, d] (already normalised) → attention output [n, d].
    pub fn forward(
        &self,
        p: &ParamStore,
        h: Arc<Vec<f32>>,
        rows: Rows,
        table: &RopeTable,
    ) -> (Vec<f32>, MlaStash) {
        let (b, t, nh) = (rows.batch, rows.seq, self.heads);
        let n = rows.n();
        let dq = self.nope + self.rope;
        let h = self.q_a.save(h);
        let cq = Arc::new(self.q_a.forward_saved(p, &h));
        let (cqn, q_norm) = self.q_a_norm.forward(p, cq);
        let cqn = self.q_b.save(Arc::new(cqn));
        let qf = self.q_b.forward_saved(p, &cqn);
        let kva = self.kv_a.forward_saved(p, &h);
        let kvw = self.kv_lora + self.rope;
        let c: Vec<f32> = kva
            .chunks_exact(kvw)
            .flat_map(|r| r[..self.kv_lora].iter().copied())
            .collect();
        let (cn, kv_norm) = self.kv_a_norm.forward(p, Arc::new(c));
        let cn = self.kv_b.save(Arc::new(cn));
        let kvf = self.kv_b.forward_saved(p, &cn);
        // k^R: one rotated key per token shared by all heads
        let mut kr: Vec<f32> = kva
            .chunks_exact(kvw)
            .flat_map(|r| r[self.kv_lora..].iter().copied())
            .collect();
        rope::forward(&mut kr, self.rope, 0, &positions(n, t), table);
        // gather per-(sequence, head) contiguous q, k, v
        let kvh = self.nope + self.v;
        let mut q = vec![0.0; b * nh * t * dq];
        let mut k = vec![0.0; b * nh * t * dq];
        let mut v = vec![0.0; b * nh * t * self.v];
        for bi in 0..b {
            for hi in 0..nh {
                for ti in 0..t {
                    let row = bi * t + ti;
                    let dst = ((bi * nh + hi) * t + ti) * dq;
                    q[dst..dst + dq].copy_from_slice(&qf[row * nh * dq + hi * dq..][..dq]);
                    let kv = &kvf[row * nh * kvh + hi * kvh..][..kvh];
                    k[dst..dst + self.nope].copy_from_slice(&kv[..self.nope]);
                    k[dst + self.nope..dst + dq]
                        .copy_from_slice(&kr[row * self.rope..(row + 1) * self.rope]);
                    let vd = ((bi * nh + hi) * t + ti) * self.v;
                    v[vd..vd + self.v].copy_from_slice(&kv[self.nope..]);
                }
            }
        }
        rope::forward(&mut q, dq, self.nope, &positions(b * nh * t, t), table);
        let mut attn = vec![0.0; b * nh * t * self.v];
        let mut probs = vec![0.0; b * nh * t * t];
        attention::forward(&mut attn, &mut probs, &q, &k, &v, t, dq, self.v, self.scale);
        let mut o = vec![0.0; n * nh * self.v];
        for bi in 0..b {
            for hi in 0..nh {
                for ti in 0..t {
                    let src = ((bi * nh + hi) * t + ti) * self.v;
                    let row = bi * t + ti;
                    o[row * nh * self.v + hi * self.v..][..self.v]
                        .copy_from_slice(&attn[src..src + self.v]);
                }
            }
        }
        let o = self.o.save(Arc::new(o));
        let y = self.o.forward_saved(p, &o);
        let st = MlaStash {
            h,
            q_norm,
            cqn,
            kv_norm,
            cn,
            q,
            k,
            v,
            p: probs,
            o,
        };
        (y, st)
    }

    /// dy [n, d] → dh [n, d]; weight gradients go to the queue.
    pub fn backward(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: MlaStash,
        rows: Rows,
        table: &RopeTable,
        q: &mut WeightGradQueue,
    ) -> Vec<f32> {
        let (b, t, nh) = (rows.batch, rows.seq, self.heads);
        let n = rows.n();
        let dq_w = self.nope + self.rope;
        let mut d_o = vec![0.0; n * nh * self.v];
        self.o.backward(p, dy, st.o, &mut d_o, false, q);
        let mut d_attn = vec![0.0; b * nh * t * self.v];
        for bi in 0..b {
            for hi in 0..nh {
                for ti in 0..t {
                    let dst = ((bi * nh + hi) * t + ti) * self.v;
                    let row = bi * t + ti;
                    d_attn[dst..dst + self.v]
                        .copy_from_slice(&d_o[row * nh * self.v + hi * self.v..][..self.v]);
                }
            }
        }
        let mut dqh = vec![0.0; st.q.len()];
        let mut dkh = vec![0.0; st.k.len()];
        let mut dvh = vec![0.0; st.v.len()];
        attention::backward_input(
            &mut dqh, &mut dkh, &mut dvh, &d_attn, &st.p, &st.q, &st.k, &st.v, t, dq_w, self.v,
            self.scale,
        );
        rope::backward_input(&mut dqh, dq_w, self.nope, &positions(b * nh * t, t), table);
        let kvh = self.nope + self.v;
        let mut dqf = vec![0.0; n * nh * dq_w];
        let mut dkvf = vec![0.0; n * nh * kvh];
        let mut dkr = vec![0.0; n * self.rope];
        for bi in 0..b {
            for hi in 0..nh {
                for ti in 0..t {
                    let row = bi * t + ti;
                    let src = ((bi * nh + hi) * t + ti) * dq_w;
                    dqf[row * nh * dq_w + hi * dq_w..][..dq_w]
                        .copy_from_slice(&dqh[src..src + dq_w]);
                    let kv = &mut dkvf[row * nh * kvh + hi * kvh..][..kvh];
                    kv[..self.nope].copy_from_slice(&dkh[src..src + self.nope]);
                    let vs = ((bi * nh + hi) * t + ti) * self.v;
                    kv[self.nope..].copy_from_slice(&dvh[vs..vs + self.v]);
                    for (a, g) in dkr[row * self.rope..(row + 1) * self.rope]
                        .iter_mut()
                        .zip(&dkh[src + self.nope..src + dq_w])
                    {
                        *a += g;
                    }
                }
            }
        }
        rope::backward_input(&mut dkr, self.rope, 0, &positions(n, t), table);
        let d = self.q_a.d_in;
        let mut dh = vec![0.0; n * d];
        // query path
        let mut dcqn = vec![0.0; n * self.q_a.d_out];
        self.q_b.backward(p, dqf, st.cqn, &mut dcqn, false, q);
        let mut dcq = vec![0.0; dcqn.len()];
        self.q_a_norm
            .backward(p, dcqn, st.q_norm, &mut dcq, false, q);
        self.q_a.backward(p, dcq, st.h.clone(), &mut dh, false, q);
        // key/value path
        let mut dcn = vec![0.0; n * self.kv_lora];
        self.kv_b.backward(p, dkvf, st.cn, &mut dcn, false, q);
        let mut dc = vec![0.0; dcn.len()];
        self.kv_a_norm
            .backward(p, dcn, st.kv_norm, &mut dc, false, q);
        let kvw = self.kv_lora + self.rope;
        let mut dkva = vec![0.0; n * kvw];
        for (row, (c, r)) in dkva.chunks_exact_mut(kvw).zip(
            dc.chunks_exact(self.kv_lora)
                .zip(dkr.chunks_exact(self.rope)),
        ) {
            row[..self.kv_lora].copy_from_slice(c);
            row[self.kv_lora..].copy_from_slice(r);
        }
        self.kv_a.backward(p, dkva, st.h, &mut dh, true, q);
        dh
    }
}

/// FFN(x) = down(SiLU(gate·x) ⊙ up·x): the dense FFN, every routed expert and the shared expert.
#[derive(Clone, Debug)]
pub struct SwiGlu {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Activations SwiGLU's backward needs.
#[derive(Debug)]
pub struct SwiGluStash {
    x: Saved,
    a: Vec<f32>,
    b: Vec<f32>,
    h: Saved,
}

impl SwiGlu {
    pub fn new(
        p: &mut ParamStore,
        prefix: &str,
        d: usize,
        inner: usize,
        std: f32,
        seed: u64,
    ) -> SwiGlu {
        SwiGlu {
            gate: Linear::new(p, format!("{prefix}.gate_proj.weight"), d, inner, std, seed),
            up: Linear::new(p, format!("{prefix}.up_proj.weight"), d, inner, std, seed),
            down: Linear::new(p, format!("{prefix}.down_proj.weight"), inner, d, std, seed),
        }
    }

    pub fn forward(&self, p: &ParamStore, x: Arc<Vec<f32>>) -> (Vec<f32>, SwiGluStash) {
        let x = self.gate.save(x);
        let a = self.gate.forward_saved(p, &x);
        let b = self.up.forward_saved(p, &x);
        let mut h = vec![0.0; a.len()];
        swiglu::forward(&mut h, &a, &b);
        let h = self.down.save(Arc::new(h));
        let y = self.down.forward_saved(p, &h);
        (y, SwiGluStash { x, a, b, h })
    }

    /// dx (+)= ∂/∂x; queues the three weight gradients.
    pub fn backward(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: SwiGluStash,
        dx: &mut [f32],
        acc: bool,
        q: &mut WeightGradQueue,
    ) {
        let mut dh = vec![0.0; st.a.len()];
        self.down.backward(p, dy, st.h, &mut dh, false, q);
        let mut da = vec![0.0; dh.len()];
        let mut db = vec![0.0; dh.len()];
        swiglu::backward_input(&mut da, &mut db, &dh, &st.a, &st.b);
        self.gate.backward(p, da, st.x.clone(), dx, acc, q);
        self.up.backward(p, db, st.x, dx, true, q);
    }
}

/// Where a routed-expert computation belongs: the decoder layer and the micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertSite {
    pub layer: usize,
    pub mb: usize,
}

/// What a remote expert returns from backward for one block of rows: the gradient of its input
/// rows and its three weight gradients of this micro-batch (each run from a zero buffer).
#[derive(Clone, Debug, Default)]
pub struct ExpertGrads {
    pub dx: Vec<f32>,
    pub dgate: Vec<f32>,
    pub dup: Vec<f32>,
    pub ddown: Vec<f32>,
}

/// The remote experts of MoE layer `layer` for micro-batch `mb`, reborrowed from an optional
/// `ExpertCompute` (None runs the experts in place).
pub fn experts_at<'a>(
    experts: &'a mut Option<&mut dyn ExpertCompute>,
    layer: usize,
    mb: usize,
) -> Option<(&'a mut dyn ExpertCompute, ExpertSite)> {
    let site = ExpertSite { layer, mb };
    experts
        .as_deref_mut()
        .map(|e| (e as &mut dyn ExpertCompute, site))
}

/// Routed experts computed outside the layer (expert parallelism). `blocks` are
/// `(expert, rows)` in ascending expert order, only experts that received rows; the answers come
/// back in the same order. The forward keeps whatever backward needs under `site`.
pub trait ExpertCompute: Send + Sync + std::fmt::Debug {
    fn forward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>>;
    fn backward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<ExpertGrads>;
    /// Drops every kept activation (an aborted step).
    fn reset(&mut self) {}
    /// Installs parameter values from a whole-model store.
    fn load_from(&mut self, _full: &ParamStore) {}
}

/// DeepSeekMoE: shared expert(s) plus routed experts chosen by the group-limited sigmoid router.
#[derive(Clone, Debug)]
pub struct Moe {
    pub gate: Linear,
    pub bias: ParamId,
    pub experts: Vec<SwiGlu>,
    pub shared: SwiGlu,
    pub rule: RouteRule,
    pub alpha: f32,
}

/// Activations DeepSeekMoE's backward needs.
#[derive(Debug)]
pub struct MoeStash {
    x: Arc<Vec<f32>>,
    s: Vec<f32>,
    routing: Routing,
    plan: DispatchPlan,
    experts: Vec<Option<SwiGluStash>>,
    /// The routed experts ran in an [`ExpertCompute`] (their stashes live there).
    remote: bool,
    ye: Vec<f32>,
    shared: SwiGluStash,
}

/// What a MoE layer reports besides its output: the balance loss and per-expert loads.
#[derive(Clone, Debug, Default)]
pub struct MoeStats {
    pub balance_loss: f64,
    pub loads: Vec<u32>,
}

impl Moe {
    pub fn new(p: &mut ParamStore, prefix: &str, c: &ModelConfig, std: f32, seed: u64) -> Moe {
        let d = c.hidden_size;
        let e = c.n_routed_experts;
        let gate = Linear::new(p, format!("{prefix}.gate.weight"), d, e, std, seed);
        let bias = p.add(
            format!("{prefix}.gate.e_score_correction_bias"),
            &[e],
            Init::Zeros,
            false,
            seed,
        );
        let experts = (0..e)
            .map(|i| {
                SwiGlu::new(
                    p,
                    &format!("{prefix}.experts.{i}"),
                    d,
                    c.moe_intermediate_size,
                    std,
                    seed,
                )
            })
            .collect();
        let shared = SwiGlu::new(
            p,
            &format!("{prefix}.shared_experts"),
            d,
            c.moe_intermediate_size * c.n_shared_experts,
            std,
            seed,
        );
        Moe {
            gate,
            bias,
            experts,
            shared,
            rule: RouteRule {
                n_group: c.n_group,
                topk_group: c.topk_group,
                k: c.num_experts_per_tok,
                scale: c.routed_scaling_factor,
                normalize: c.norm_topk_prob,
            },
            alpha: if c.seq_aux { c.aux_loss_alpha } else { 0.0 },
        }
    }

    pub fn forward(
        &self,
        p: &ParamStore,
        x: Arc<Vec<f32>>,
        rows: Rows,
    ) -> (Vec<f32>, MoeStash, MoeStats) {
        self.forward_with(p, x, rows, None)
    }

    /// Forward with the routed experts in `remote` when given (same dispatch plan and combine
    /// order as the in-place experts, so f32 results are identical).
    pub fn forward_with(
        &self,
        p: &ParamStore,
        x: Arc<Vec<f32>>,
        rows: Rows,
        remote: Option<(&mut dyn ExpertCompute, ExpertSite)>,
    ) -> (Vec<f32>, MoeStash, MoeStats) {
        let d = self.gate.d_in;
        let e = self.experts.len();
        let logits = self.gate.forward(p, &x);
        let mut s = vec![0.0; logits.len()];
        moe_gate::sigmoid_forward(&mut s, &logits);
        let routing = moe_gate::forward(&s, p.get(self.bias), &self.rule);
        let plan = DispatchPlan::new(&routing, e);
        let mut xe = vec![0.0; plan.rows() * d];
        moe_dispatch::dispatch_forward(&mut xe, &x, &plan, d);
        let is_remote = remote.is_some();
        let outs: Vec<Option<(Vec<f32>, Option<SwiGluStash>)>> = match remote {
            None => (0..e)
                .into_par_iter()
                .map(|i| {
                    let (lo, hi) = (plan.offsets[i], plan.offsets[i + 1]);
                    (hi > lo).then(|| {
                        let (y, st) =
                            self.experts[i].forward(p, Arc::new(xe[lo * d..hi * d].to_vec()));
                        (y, Some(st))
                    })
                })
                .collect(),
            Some((ec, site)) => {
                let blocks: Vec<(usize, Vec<f32>)> = (0..e)
                    .filter(|&i| plan.offsets[i + 1] > plan.offsets[i])
                    .map(|i| (i, xe[plan.offsets[i] * d..plan.offsets[i + 1] * d].to_vec()))
                    .collect();
                let ids: Vec<usize> = blocks.iter().map(|b| b.0).collect();
                let ys = ec.forward(site, blocks);
                assert_eq!(ys.len(), ids.len(), "one output per dispatched expert");
                let mut outs: Vec<Option<(Vec<f32>, Option<SwiGluStash>)>> =
                    (0..e).map(|_| None).collect();
                for (i, y) in ids.into_iter().zip(ys) {
                    outs[i] = Some((y, None));
                }
                outs
            }
        };
        let mut ye = vec![0.0; plan.rows() * d];
        let mut stashes = Vec::with_capacity(e);
        for (i, o) in outs.into_iter().enumerate() {
            match o {
                Some((y, st)) => {
                    ye[plan.offsets[i] * d..plan.offsets[i + 1] * d].copy_from_slice(&y);
                    stashes.push(st);
                }
                None => stashes.push(None),
            }
        }
        let (mut out, shared) = self.shared.forward(p, x.clone());
        moe_dispatch::combine_forward(&mut out, &ye, &routing.weights, routing.k, &plan, d);
        let mut balance_loss = 0.0;
        if self.alpha > 0.0 {
            let (t, k) = (rows.seq, routing.k);
            for (sq, ex) in s
                .chunks_exact(t * e)
                .zip(routing.experts.chunks_exact(t * k))
            {
                balance_loss +=
                    balance::sequence_loss_forward(sq, ex, k, e, self.alpha) / rows.batch as f64;
            }
        }
        let stats = MoeStats {
            balance_loss,
            loads: plan.loads(),
        };
        (
            out,
            MoeStash {
                x,
                s,
                routing,
                plan,
                experts: stashes,
                remote: is_remote,
                ye,
                shared,
            },
            stats,
        )
    }

    pub fn backward(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: MoeStash,
        rows: Rows,
        q: &mut WeightGradQueue,
    ) -> Vec<f32> {
        self.backward_with(p, dy, st, rows, q, None)
    }

    /// Backward; a stash from a remote forward needs the same `remote` (its weight gradients
    /// come back computed and are queued as [`WeightGrad::Dense`]).
    pub fn backward_with(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: MoeStash,
        rows: Rows,
        q: &mut WeightGradQueue,
        remote: Option<(&mut dyn ExpertCompute, ExpertSite)>,
    ) -> Vec<f32> {
        let d = self.gate.d_in;
        let e = self.experts.len();
        let k = st.routing.k;
        let n = st.x.len() / d;
        let mut dye = vec![0.0; st.ye.len()];
        let mut dweights = vec![0.0; n * k];
        moe_dispatch::combine_backward_input(
            &mut dye,
            &mut dweights,
            &dy,
            &st.ye,
            &st.routing.weights,
            k,
            &st.plan,
            d,
        );
        let mut dx = vec![0.0; n * d];
        self.shared.backward(p, dy, st.shared, &mut dx, false, q);
        let plan = &st.plan;
        let results: Vec<Option<(Vec<f32>, WeightGradQueue)>> = if st.remote {
            let (ec, site) = remote.expect("a remote MoE forward needs its experts for backward");
            let blocks: Vec<(usize, Vec<f32>)> = (0..e)
                .filter(|&i| plan.offsets[i + 1] > plan.offsets[i])
                .map(|i| {
                    (
                        i,
                        dye[plan.offsets[i] * d..plan.offsets[i + 1] * d].to_vec(),
                    )
                })
                .collect();
            let ids: Vec<usize> = blocks.iter().map(|b| b.0).collect();
            let gs = ec.backward(site, blocks);
            assert_eq!(gs.len(), ids.len(), "one gradient per dispatched expert");
            let mut results: Vec<Option<(Vec<f32>, WeightGradQueue)>> =
                (0..e).map(|_| None).collect();
            for (i, g) in ids.into_iter().zip(gs) {
                let x = &self.experts[i];
                let mut local = WeightGradQueue::default();
                local.push(WeightGrad::Dense {
                    w: x.down.w,
                    g: g.ddown,
                });
                local.push(WeightGrad::Dense {
                    w: x.gate.w,
                    g: g.dgate,
                });
                local.push(WeightGrad::Dense {
                    w: x.up.w,
                    g: g.dup,
                });
                results[i] = Some((g.dx, local));
            }
            results
        } else {
            st.experts
                .into_par_iter()
                .enumerate()
                .map(|(i, stash)| {
                    stash.map(|stash| {
                        let (lo, hi) = (plan.offsets[i], plan.offsets[i + 1]);
                        let mut dxe = vec![0.0; (hi - lo) * d];
                        let mut local = WeightGradQueue::default();
                        self.experts[i].backward(
                            p,
                            dye[lo * d..hi * d].to_vec(),
                            stash,
                            &mut dxe,
                            false,
                            &mut local,
                        );
                        (dxe, local)
                    })
                })
                .collect()
        };
        let mut dxe_all = vec![0.0; plan.rows() * d];
        for (i, r) in results.into_iter().enumerate() {
            if let Some((dxe, local)) = r {
                dxe_all[plan.offsets[i] * d..plan.offsets[i + 1] * d].copy_from_slice(&dxe);
                q.jobs.extend(local.jobs);
            }
        }
        moe_dispatch::dispatch_backward_input(&mut dx, &dxe_all, plan, d);
        let mut ds = vec![0.0; st.s.len()];
        moe_gate::backward_input(&mut ds, &dweights, &st.s, &st.routing, &self.rule);
        if self.alpha > 0.0 {
            let t = rows.seq;
            for ((dsq, sq), ex) in ds
                .chunks_exact_mut(t * e)
                .zip(st.s.chunks_exact(t * e))
                .zip(st.routing.experts.chunks_exact(t * k))
            {
                balance::sequence_loss_backward_input(
                    dsq,
                    sq,
                    ex,
                    k,
                    e,
                    self.alpha / rows.batch as f32,
                );
            }
        }
        let mut dlogits = vec![0.0; ds.len()];
        moe_gate::sigmoid_backward_input(&mut dlogits, &ds, &st.s);
        self.gate.backward(p, dlogits, st.x, &mut dx, true, q);
        dx
    }
}

/// The FFN half of a decoder block.
#[derive(Clone, Debug)]
pub enum Ffn {
    Dense(SwiGlu),
    Moe(Moe),
}

#[derive(Debug)]
pub enum FfnStash {
    Dense(SwiGluStash),
    Moe(Box<MoeStash>),
}

/// Pre-norm decoder block: x += MLA(norm(x)); x += FFN(norm(x)).
#[derive(Clone, Debug)]
pub struct Block {
    pub input_norm: RmsNorm,
    pub attn: Mla,
    pub post_norm: RmsNorm,
    pub ffn: Ffn,
}

/// Activations a block's backward needs.
#[derive(Debug)]
pub struct BlockStash {
    in_norm: NormStash,
    attn: MlaStash,
    post_norm: NormStash,
    ffn: FfnStash,
}

impl Block {
    /// Layer `prefix` (e.g. "model.layers.3"); `moe` picks DeepSeekMoE over the dense FFN.
    pub fn new(
        p: &mut ParamStore,
        prefix: &str,
        c: &ModelConfig,
        moe: bool,
        std: f32,
        seed: u64,
    ) -> Block {
        let d = c.hidden_size;
        let input_norm = RmsNorm::new(
            p,
            format!("{prefix}.input_layernorm.weight"),
            d,
            c.rms_norm_eps,
            seed,
        );
        let attn = Mla::new(p, &format!("{prefix}.self_attn"), c, std, seed);
        let post_norm = RmsNorm::new(
            p,
            format!("{prefix}.post_attention_layernorm.weight"),
            d,
            c.rms_norm_eps,
            seed,
        );
        let ffn = if moe {
            Ffn::Moe(Moe::new(p, &format!("{prefix}.mlp"), c, std, seed))
        } else {
            Ffn::Dense(SwiGlu::new(
                p,
                &format!("{prefix}.mlp"),
                d,
                c.intermediate_size,
                std,
                seed,
            ))
        };
        Block {
            input_norm,
            attn,
            post_norm,
            ffn,
        }
    }

    pub fn forward(
        &self,
        p: &ParamStore,
        x: Arc<Vec<f32>>,
        rows: Rows,
        table: &RopeTable,
    ) -> (Vec<f32>, BlockStash, Option<MoeStats>) {
        self.forward_with(p, x, rows, table, None)
    }

    /// Forward with the routed experts of a MoE FFN in `remote` when given.
    pub fn forward_with(
        &self,
        p: &ParamStore,
        x: Arc<Vec<f32>>,
        rows: Rows,
        table: &RopeTable,
        remote: Option<(&mut dyn ExpertCompute, ExpertSite)>,
    ) -> (Vec<f32>, BlockStash, Option<MoeStats>) {
        let (h, in_norm) = self.input_norm.forward(p, x.clone());
        let (a, attn) = self.attn.forward(p, Arc::new(h), rows, table);
        let x1: Vec<f32> = x.iter().zip(&a).map(|(u, v)| u + v).collect();
        let x1 = Arc::new(x1);
        let (h2, post_norm) = self.post_norm.forward(p, x1.clone());
        let h2 = Arc::new(h2);
        let (f, ffn, stats) = match &self.ffn {
            Ffn::Dense(m) => {
                let (f, s) = m.forward(p, h2);
                (f, FfnStash::Dense(s), None)
            }
            Ffn::Moe(m) => {
                let (f, s, stats) = m.forward_with(p, h2, rows, remote);
                (f, FfnStash::Moe(Box::new(s)), Some(stats))
            }
        };
        let x2: Vec<f32> = x1.iter().zip(&f).map(|(u, v)| u + v).collect();
        (
            x2,
            BlockStash {
                in_norm,
                attn,
                post_norm,
                ffn,
            },
            stats,
        )
    }

    /// d(out) → d(in); weight gradients queued.
    pub fn backward(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: BlockStash,
        rows: Rows,
        table: &RopeTable,
        q: &mut WeightGradQueue,
    ) -> Vec<f32> {
        self.backward_with(p, dy, st, rows, table, q, None)
    }

    /// Backward; the same `remote` as the forward that made `st`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: BlockStash,
        rows: Rows,
        table: &RopeTable,
        q: &mut WeightGradQueue,
        remote: Option<(&mut dyn ExpertCompute, ExpertSite)>,
    ) -> Vec<f32> {
        let dh2 = match (&self.ffn, st.ffn) {
            (Ffn::Dense(m), FfnStash::Dense(s)) => {
                let mut dh2 = vec![0.0; dy.len()];
                m.backward(p, dy.clone(), s, &mut dh2, false, q);
                dh2
            }
            (Ffn::Moe(m), FfnStash::Moe(s)) => m.backward_with(p, dy.clone(), *s, rows, q, remote),
            _ => unreachable!("stash kind always matches the layer kind"),
        };
        let mut dx1 = dy;
        self.post_norm
            .backward(p, dh2, st.post_norm, &mut dx1, true, q);
        let dh = self.attn.backward(p, dx1.clone(), st.attn, rows, table, q);
        let mut dx = dx1;
        self.input_norm
            .backward(p, dh, st.in_norm, &mut dx, true, q);
        dx
    }
}

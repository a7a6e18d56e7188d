//! The DeepSeek-V3 layers: Linear, RMSNorm, MLA (naive form), SwiGLU FFN, DeepSeekMoE and the
//! decoder block. Each has `forward` (returns output and stash), `backward_input`, and defers W.

use super::config::ModelConfig;
use super::params::{Init, ParamId, ParamStore, TensorSource, WeightGrad, WeightGradQueue};
use crate::fp8;
use crate::fp8::quant::{quantize_1x128, quantize_128x128};
use crate::fp8::{Fp8Tensor, ScaleFormat};
use crate::ops::moe_dispatch::{self, DispatchPlan};
use crate::ops::moe_gate::{self, RouteRule, Routing};
use crate::ops::rope::RopeTable;
use crate::ops::{attention, balance, linear, rmsnorm, rope, swiglu};
use rayon::prelude::*;
use std::sync::Arc;

mod mla;
mod moe;
pub use mla::*;
pub use moe::*;

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

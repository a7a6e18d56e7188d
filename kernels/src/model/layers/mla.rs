//! Multi-head latent attention in its naive training form: q and kv compressed through
//! low-rank projections with latent RMSNorms, a decoupled RoPE key shared across heads; forward,
//! backward-input, deferred W.

use super::*;

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

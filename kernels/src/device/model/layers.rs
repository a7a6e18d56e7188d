//! The decoder layers on a `Backend`: Linear, RMSNorm, SwiGLU, MLA, DeepSeekMoE and the block,
//! each a forward that returns its output and stash and a backward that returns or adds the input
//! gradient and adds its weight gradients at once. The layer structs (`model::layers`) give the
//! parameter ids and shapes; the order of every operation, and of every weight gradient added
//! into the same tensor, is the CPU model's, so the CPU backend reproduces it bit for bit.

use super::super::backend::{Backend, BackendError, BackendResult, ExpertGemm, GemmPrecision};
use super::super::profile::{self, StepProfile, span};
use super::remote::{self, Remote};
use super::weight::{OwedJob, WeightJob, defers, weight};
use crate::model::config::ModelConfig;
use crate::model::deepseek::{Batch, rope_table};
use crate::model::layers::{Block, Ffn, Linear, Mla, Moe, MoeStats, RmsNorm, Rows, SwiGlu};
use crate::model::params::{ParamId, WeightGrad};
use std::sync::Arc;

/// What a layer reads and writes: the backend, the parameters and the gradient buffers (by
/// `ParamId` index), and the geometry of the rows.
pub(crate) struct Ctx<'a, B: Backend> {
    pub b: &'a B,
    pub p: &'a [B::Buf],
    pub g: &'a mut [B::Buf],
    pub table: &'a B::Table,
    /// The precision of every Linear's GEMMs.
    pub gemm: GemmPrecision,
    /// Where the embedding's weight gradients go instead of `g` when another pipeline stage
    /// holds the table too (a pipeline stage's shared embedding, see `model::stage`).
    pub handed: Option<&'a mut Vec<WeightGrad>>,
    /// Where weight gradients wait for W when they are deferred (a pipeline stage's B*); None
    /// adds them into `g` at once.
    pub defer: Option<&'a mut Vec<OwedJob<B>>>,
    /// Where the MoE layers' routed experts run when not here (a stage's expert groups, `--ep`).
    pub remote: Option<&'a Remote<'a>>,
    /// Where the step's regions are timed, when it is profiled.
    pub prof: Option<&'a StepProfile>,
}

impl<'a, B: Backend> Ctx<'a, B> {
    /// A forward-only context (no gradient is written).
    pub fn forward_only(
        b: &'a B,
        p: &'a [B::Buf],
        table: &'a B::Table,
        gemm: GemmPrecision,
    ) -> Self {
        Ctx {
            b,
            p,
            g: &mut [],
            table,
            gemm,
            handed: None,
            defer: None,
            remote: None,
            prof: None,
        }
    }
}

/// Every tensor of `store` uploaded to `b` (by tensor id), the device's entered first.
pub(crate) fn upload_params<B: Backend>(
    b: &B,
    store: &crate::model::params::ParamStore,
) -> BackendResult<Vec<B::Buf>> {
    b.enter()?;
    store.tensors.iter().map(|t| b.upload(&t.data)).collect()
}

/// Ok when `batch` holds `batch × seq` tokens with seq ≥ 1.
pub(crate) fn check_batch(batch: &Batch) -> BackendResult<()> {
    if batch.inputs.len() != batch.batch * batch.seq || batch.seq == 0 {
        return Err(BackendError(format!(
            "batch of {} tokens is not {}×{} (seq ≥ 1)",
            batch.inputs.len(),
            batch.batch,
            batch.seq
        )));
    }
    Ok(())
}

/// The RoPE table of `seq` positions in `slot`, made (and uploaded) when the one there is for
/// another length.
pub(crate) fn ensure_table<'s, B: Backend>(
    b: &B,
    slot: &'s mut Option<(usize, B::Table)>,
    cfg: &ModelConfig,
    seq: usize,
) -> BackendResult<&'s B::Table> {
    if slot.as_ref().map(|(s, _)| *s) != Some(seq) {
        *slot = Some((seq, b.table(&rope_table(cfg, seq))?));
    }
    Ok(&slot.as_ref().expect("just made").1)
}

/// dtable[ids] += dy; or, when the table is shared with another stage (`Ctx::handed`), the job
/// handed to the reduce with `ids` and `dy` on the host.
pub(crate) fn embedding_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    table: ParamId,
    ids: &B::Ids,
    host_ids: &[u32],
    dy: &B::Buf,
    d: usize,
) -> BackendResult<()> {
    if let Some(h) = c.handed.as_deref_mut() {
        h.push(WeightGrad::Embedding {
            w: table,
            ids: Arc::new(host_ids.to_vec()),
            dy: c.b.download(dy)?,
        });
        return Ok(());
    }
    let w = table.0;
    weight(c, WeightJob::Embedding { w, ids, dy, d })
}

/// Positions of the rows a block sees, token rows and per-head rows (`i mod seq`).
pub(crate) struct Positions<B: Backend> {
    pub tokens: B::Ids,
    pub heads: B::Ids,
}

impl<B: Backend> Positions<B> {
    pub fn new(b: &B, rows: Rows, heads: usize) -> BackendResult<Self> {
        let t = rows.seq;
        let pos = |n: usize| (0..n).map(|i| (i % t) as u32).collect::<Vec<u32>>();
        Ok(Positions {
            tokens: b.ids(&pos(rows.n()), t)?,
            heads: b.ids(&pos(rows.n() * heads), t)?,
        })
    }
}

pub(crate) fn linear_forward<B: Backend>(
    c: &Ctx<'_, B>,
    l: &Linear,
    x: &B::Buf,
) -> BackendResult<B::Buf> {
    linear_forward_in(c, l, x, c.gemm)
}

/// A Linear forward in precision `p` (the MoE gate stays f32: routing is decided in full
/// precision, as DeepSeek-V3 keeps its gating in the original precision).
fn linear_forward_in<B: Backend>(
    c: &Ctx<'_, B>,
    l: &Linear,
    x: &B::Buf,
    p: GemmPrecision,
) -> BackendResult<B::Buf> {
    let n = c.b.len(x) / l.d_in;
    let w = &c.p[l.w.0];
    if l.fp8 {
        return c.b.fp8_linear_forward(x, w, n, l.d_in, l.d_out);
    }
    c.b.linear_forward(x, w, n, l.d_in, l.d_out, p)
}

/// dx (+)= dy·W, then dW += dyᵀ·x.
pub(crate) fn linear_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    l: &Linear,
    dy: &B::Buf,
    x: &B::Buf,
    dx: &mut B::Buf,
    acc: bool,
) -> BackendResult<()> {
    let p = c.gemm;
    linear_backward_in(c, l, dy, x, dx, acc, p)
}

fn linear_backward_in<B: Backend>(
    c: &mut Ctx<'_, B>,
    l: &Linear,
    dy: &B::Buf,
    x: &B::Buf,
    dx: &mut B::Buf,
    acc: bool,
    p: GemmPrecision,
) -> BackendResult<()> {
    let n = c.b.len(dy) / l.d_out;
    let w = &c.p[l.w.0];
    if l.fp8 {
        // the CPU Linear's FP8 backward: Dgrad, then the weight job on the requantised input
        let g = c.b.fp8_linear_backward_input(dy, w, n, l.d_in, l.d_out)?;
        if acc {
            c.b.add_into(dx, &g)?;
        } else {
            *dx = g;
        }
        let (w, shape) = (l.w.0, (n, l.d_in, l.d_out));
        return weight(c, WeightJob::Fp8Linear { w, dy, x, shape });
    }
    let shape = (n, l.d_in, l.d_out);
    if defers(c) {
        // the input half now, the weight half when W runs
        c.b.linear_backward_input(dx, dy, w, n, l.d_in, l.d_out, acc, p)?;
        let w = l.w.0;
        return weight(c, WeightJob::Linear { w, dy, x, shape, p });
    }
    c.b.linear_backward(dx, &mut c.g[l.w.0], dy, w, x, shape, acc, p)
}

/// RMSNorm's input and 1/rms per row.
pub(crate) struct NormSt<B: Backend> {
    pub x: B::Buf,
    rstd: B::Buf,
}

pub(crate) fn norm_forward<B: Backend>(
    c: &Ctx<'_, B>,
    l: &RmsNorm,
    x: B::Buf,
) -> BackendResult<(B::Buf, NormSt<B>)> {
    let (y, rstd) = c.b.rmsnorm_forward(&x, &c.p[l.w.0], l.d, l.eps)?;
    Ok((y, NormSt { x, rstd }))
}

pub(crate) fn norm_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    l: &RmsNorm,
    dy: &B::Buf,
    st: &NormSt<B>,
    dx: &mut B::Buf,
    acc: bool,
) -> BackendResult<()> {
    c.b.rmsnorm_backward_input(dx, dy, &st.x, &st.rstd, &c.p[l.w.0], l.d, acc)?;
    let (w, x, rstd, d) = (l.w.0, &st.x, &st.rstd, l.d);
    weight(c, WeightJob::Norm { w, dy, x, rstd, d })
}

/// SwiGLU's activations (its input is kept by the caller).
pub(crate) struct SwiSt<B: Backend> {
    a: B::Buf,
    bv: B::Buf,
    h: B::Buf,
}

pub(crate) fn swiglu_forward<B: Backend>(
    c: &Ctx<'_, B>,
    m: &SwiGlu,
    x: &B::Buf,
) -> BackendResult<(B::Buf, SwiSt<B>)> {
    let a = linear_forward(c, &m.gate, x)?;
    let bv = linear_forward(c, &m.up, x)?;
    let h = c.b.swiglu_forward(&a, &bv)?;
    let y = linear_forward(c, &m.down, &h)?;
    Ok((y, SwiSt { a, bv, h }))
}

pub(crate) fn swiglu_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    m: &SwiGlu,
    dy: &B::Buf,
    st: SwiSt<B>,
    x: &B::Buf,
    dx: &mut B::Buf,
    acc: bool,
) -> BackendResult<()> {
    let mut dh = c.b.zeros(c.b.len(&st.a))?;
    linear_backward(c, &m.down, dy, &st.h, &mut dh, false)?;
    let (da, db) = c.b.swiglu_backward_input(&dh, &st.a, &st.bv)?;
    linear_backward(c, &m.gate, &da, x, dx, acc)?;
    linear_backward(c, &m.up, &db, x, dx, true)
}

/// MLA's activations.
pub(crate) struct MlaSt<B: Backend> {
    h: B::Buf,
    q_norm: NormSt<B>,
    cqn: B::Buf,
    kv_norm: NormSt<B>,
    cn: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    aux: B::AttnAux,
    o: B::Buf,
}

pub(crate) fn mla_forward<B: Backend>(
    c: &Ctx<'_, B>,
    m: &Mla,
    h: B::Buf,
    rows: Rows,
    pos: &Positions<B>,
) -> BackendResult<(B::Buf, MlaSt<B>)> {
    let (bsz, t, nh) = (rows.batch, rows.seq, m.heads);
    let n = rows.n();
    let b = c.b;
    let dq = m.nope + m.rope;
    let kvw = m.kv_lora + m.rope;
    let kvh = m.nope + m.v;
    let cq = linear_forward(c, &m.q_a, &h)?;
    let (cqn, q_norm) = norm_forward(c, &m.q_a_norm, cq)?;
    let qf = linear_forward(c, &m.q_b, &cqn)?;
    let kva = linear_forward(c, &m.kv_a, &h)?;
    let mut lat = b.zeros(n * m.kv_lora)?;
    b.copy_cols(&mut lat, m.kv_lora, 0, &kva, kvw, 0, m.kv_lora, false)?;
    let (cn, kv_norm) = norm_forward(c, &m.kv_a_norm, lat)?;
    let kvf = linear_forward(c, &m.kv_b, &cn)?;
    // k^R: one rotated key per token shared by all heads
    let mut kr = b.zeros(n * m.rope)?;
    b.copy_cols(&mut kr, m.rope, 0, &kva, kvw, m.kv_lora, m.rope, false)?;
    b.rope(&mut kr, m.rope, 0, &pos.tokens, c.table, false)?;
    let mut q = b.heads(&qf, bsz, t, nh, dq, false)?;
    let kv = b.heads(&kvf, bsz, t, nh, kvh, false)?;
    let mut k = b.zeros(n * nh * dq)?;
    b.copy_cols(&mut k, dq, 0, &kv, kvh, 0, m.nope, false)?;
    let krh = b.broadcast_heads(&kr, bsz, t, nh, m.rope)?;
    b.copy_cols(&mut k, dq, m.nope, &krh, m.rope, 0, m.rope, false)?;
    let mut v = b.zeros(n * nh * m.v)?;
    b.copy_cols(&mut v, m.v, 0, &kv, kvh, m.nope, m.v, false)?;
    b.rope(&mut q, dq, m.nope, &pos.heads, c.table, false)?;
    let (attn, aux) = b.attention_forward(&q, &k, &v, bsz * nh, t, dq, m.v, m.scale, c.gemm)?;
    let o = b.heads(&attn, bsz, t, nh, m.v, true)?;
    let y = linear_forward(c, &m.o, &o)?;
    let st = MlaSt {
        h,
        q_norm,
        cqn,
        kv_norm,
        cn,
        q,
        k,
        v,
        attn,
        aux,
        o,
    };
    Ok((y, st))
}

pub(crate) fn mla_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    m: &Mla,
    dy: &B::Buf,
    st: MlaSt<B>,
    rows: Rows,
    pos: &Positions<B>,
) -> BackendResult<B::Buf> {
    let (bsz, t, nh) = (rows.batch, rows.seq, m.heads);
    let n = rows.n();
    let b = c.b;
    let dqw = m.nope + m.rope;
    let kvh = m.nope + m.v;
    let kvw = m.kv_lora + m.rope;
    let mut d_o = b.zeros(n * nh * m.v)?;
    linear_backward(c, &m.o, dy, &st.o, &mut d_o, false)?;
    let d_attn = b.heads(&d_o, bsz, t, nh, m.v, false)?;
    let (mut dqh, dkh, dvh) = b.attention_backward_input(
        &d_attn,
        &st.attn,
        &st.aux,
        &st.q,
        &st.k,
        &st.v,
        bsz * nh,
        t,
        dqw,
        m.v,
        m.scale,
        c.gemm,
    )?;
    b.rope(&mut dqh, dqw, m.nope, &pos.heads, c.table, true)?;
    let dqf = b.heads(&dqh, bsz, t, nh, dqw, true)?;
    let mut dkv = b.zeros(n * nh * kvh)?;
    b.copy_cols(&mut dkv, kvh, 0, &dkh, dqw, 0, m.nope, false)?;
    b.copy_cols(&mut dkv, kvh, m.nope, &dvh, m.v, 0, m.v, false)?;
    let dkvf = b.heads(&dkv, bsz, t, nh, kvh, true)?;
    let mut dkrh = b.zeros(n * nh * m.rope)?;
    b.copy_cols(&mut dkrh, m.rope, 0, &dkh, dqw, m.nope, m.rope, false)?;
    let mut dkr = b.sum_heads(&dkrh, bsz, t, nh, m.rope)?;
    b.rope(&mut dkr, m.rope, 0, &pos.tokens, c.table, true)?;
    let mut dh = b.zeros(n * m.q_a.d_in)?;
    // query path
    let mut dcqn = b.zeros(n * m.q_a.d_out)?;
    linear_backward(c, &m.q_b, &dqf, &st.cqn, &mut dcqn, false)?;
    let mut dcq = b.zeros(n * m.q_a.d_out)?;
    norm_backward(c, &m.q_a_norm, &dcqn, &st.q_norm, &mut dcq, false)?;
    linear_backward(c, &m.q_a, &dcq, &st.h, &mut dh, false)?;
    // key/value path
    let mut dcn = b.zeros(n * m.kv_lora)?;
    linear_backward(c, &m.kv_b, &dkvf, &st.cn, &mut dcn, false)?;
    let mut dc = b.zeros(n * m.kv_lora)?;
    norm_backward(c, &m.kv_a_norm, &dcn, &st.kv_norm, &mut dc, false)?;
    let mut dkva = b.zeros(n * kvw)?;
    b.copy_cols(&mut dkva, kvw, 0, &dc, m.kv_lora, 0, m.kv_lora, false)?;
    b.copy_cols(&mut dkva, kvw, m.kv_lora, &dkr, m.rope, 0, m.rope, false)?;
    linear_backward(c, &m.kv_a, &dkva, &st.h, &mut dh, true)?;
    Ok(dh)
}

/// DeepSeekMoE's activations (its input is kept by the block): the affinities and the routing,
/// the routed experts' (`Here`, or kept by their expert groups) and their output `ye`.
pub(crate) struct MoeSt<B: Backend> {
    s: B::Buf,
    route: B::Route,
    experts: ExpertsSt<B>,
    ye: B::Buf,
    shared: SwiSt<B>,
}

/// The routed experts' activations as one block of dispatched rows (`xe`, the gate and up
/// outputs, SwiGLU's output), or `Remote`: their expert groups keep them.
enum ExpertsSt<B: Backend> {
    Here {
        xe: B::Buf,
        a: B::Buf,
        bv: B::Buf,
        h: B::Buf,
    },
    Remote,
}

/// The routed experts' parameter ids (gate, up, down per expert) and how they multiply.
fn expert_ids<B: Backend>(c: &Ctx<'_, B>, m: &Moe) -> ([Vec<usize>; 3], ExpertGemm) {
    let ids = |f: fn(&SwiGlu) -> &Linear| m.experts.iter().map(|e| f(e).w.0).collect();
    let kind = match m.experts.first() {
        Some(e) if e.gate.fp8 => ExpertGemm::Fp8,
        _ => ExpertGemm::Plain(c.gemm),
    };
    ([ids(|e| &e.gate), ids(|e| &e.up), ids(|e| &e.down)], kind)
}

/// A MoE layer's forward statistics with its balance loss still where the backend computed it
/// (`read` brings it to the host: a device route's copy is read after the step's cross-entropy,
/// which waits for the device anyway, not at the layer).
pub(crate) struct MoeStatsOn<B: Backend> {
    /// None for a layer without a balance loss (α = 0): 0.
    pub balance_loss: Option<B::Loss>,
    pub loads: Vec<u32>,
}

impl<B: Backend> MoeStatsOn<B> {
    pub(crate) fn read(self, b: &B) -> BackendResult<MoeStats> {
        Ok(MoeStats {
            balance_loss: self.balance_loss.map_or(Ok(0.0), |l| b.read_loss(l))?,
            loads: self.loads,
        })
    }
}

/// MoE layer `layer` (its `ExpertSite` when the routed experts are remote). The shared experts
/// are queued between the routing and the routed experts: the host needs the routing's expert
/// offsets to size the grouped GEMMs, and on a device it waits for them while the device runs
/// the shared experts (the CPU model's bits: each product is the same, only queued earlier).
pub(crate) fn moe_forward<B: Backend>(
    c: &Ctx<'_, B>,
    m: &Moe,
    x: &B::Buf,
    rows: Rows,
    layer: usize,
) -> BackendResult<(B::Buf, MoeSt<B>, MoeStatsOn<B>)> {
    let b = c.b;
    let d = m.gate.d_in;
    let e = m.experts.len();
    let t = span(c.prof, b, "forward: moe gate, routing, dispatch")?;
    let logits = linear_forward_in(c, &m.gate, x, GemmPrecision::F32)?;
    let s = b.sigmoid_forward(&logits)?;
    let route = b.route(&s, &c.p[m.bias.0], &m.rule, e)?;
    let plan = b.route_plan(&route);
    let xe = b.dispatch_forward(x, plan, d)?;
    profile::end(t, b)?;
    let t = span(c.prof, b, "forward: moe shared experts")?;
    let (mut out, shared) = swiglu_forward(c, &m.shared, x)?;
    profile::end(t, b)?;
    let t = span(c.prof, b, "forward: moe routed experts")?;
    let offs = b.route_offsets(&route)?;
    let (ye, experts) = match c.remote {
        Some(r) => (
            remote::forward(c, r, layer, &xe, offs, d)?,
            ExpertsSt::Remote,
        ),
        None => {
            // every expert's SwiGLU at once: grouped GEMMs over the segments, SwiGLU over all rows
            let ([gate, up, down], kind) = expert_ids(c, m);
            let inter = m.experts.first().map_or(0, |e| e.gate.d_out);
            let a = b.grouped_linear_forward(&xe, c.p, &gate, offs, d, inter, kind)?;
            let bv = b.grouped_linear_forward(&xe, c.p, &up, offs, d, inter, kind)?;
            let h = b.swiglu_forward(&a, &bv)?;
            let ye = b.grouped_linear_forward(&h, c.p, &down, offs, inter, d, kind)?;
            (ye, ExpertsSt::Here { xe, a, bv, h })
        }
    };
    profile::end(t, b)?;
    let t = span(c.prof, b, "forward: moe combine, balance")?;
    b.combine_forward(&mut out, &ye, plan, d)?;
    let balance_loss = if m.alpha > 0.0 {
        Some(b.balance_loss(&s, &route, (rows.seq, rows.batch), m.alpha)?)
    } else {
        None
    };
    let loads = offs.windows(2).map(|w| (w[1] - w[0]) as u32).collect();
    profile::end(t, b)?;
    let stats = MoeStatsOn {
        balance_loss,
        loads,
    };
    let st = MoeSt {
        s,
        route,
        experts,
        ye,
        shared,
    };
    Ok((out, st, stats))
}

pub(crate) fn moe_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    m: &Moe,
    dy: &B::Buf,
    st: MoeSt<B>,
    x: &B::Buf,
    rows: Rows,
    layer: usize,
) -> BackendResult<B::Buf> {
    let b = c.b;
    let d = m.gate.d_in;
    let n = b.len(x) / d;
    let (plan, offs) = (b.route_plan(&st.route), b.route_offsets(&st.route)?);
    let t = span(c.prof, b, "backward: moe combine, shared experts")?;
    let (dye, dweights) = b.combine_backward_input(dy, &st.ye, plan, d)?;
    let mut dx = b.zeros(n * d)?;
    swiglu_backward(c, &m.shared, dy, st.shared, x, &mut dx, false)?;
    profile::end(t, b)?;
    let t = span(c.prof, b, "backward: moe routed experts")?;
    let dxe = match (st.experts, c.remote) {
        (ExpertsSt::Remote, Some(r)) => remote::backward(c, r, m, layer, &dye, offs, d)?,
        (ExpertsSt::Here { xe, a, bv, h }, None) => {
            // the experts' SwiGLU backward, each GEMM grouped: down, SwiGLU, gate, then up
            let ([gate, up, down], kind) = expert_ids(c, m);
            let inter = b.len(&a) / offs.last().copied().unwrap_or(0).max(1);
            let mut dh = b.zeros(b.len(&a))?;
            b.grouped_linear_backward_input(
                &mut dh, &dye, c.p, &down, offs, inter, d, false, kind,
            )?;
            let grouped = |ids, dy, x, din, dout| WeightJob::Grouped {
                ids,
                dy,
                x,
                offsets: offs.to_vec(),
                din,
                dout,
                kind,
            };
            weight(c, grouped(down, &dye, &h, inter, d))?;
            let (da, db) = b.swiglu_backward_input(&dh, &a, &bv)?;
            let mut dxe = b.zeros(b.len(&xe))?;
            b.grouped_linear_backward_input(
                &mut dxe, &da, c.p, &gate, offs, d, inter, false, kind,
            )?;
            weight(c, grouped(gate, &da, &xe, d, inter))?;
            b.grouped_linear_backward_input(&mut dxe, &db, c.p, &up, offs, d, inter, true, kind)?;
            weight(c, grouped(up, &db, &xe, d, inter))?;
            dxe
        }
        _ => {
            return Err(BackendError(format!(
                "MoE layer {layer}: backward with its routed experts elsewhere than its forward's"
            )));
        }
    };
    profile::end(t, b)?;
    let t = span(c.prof, b, "backward: moe dispatch, routing, gate")?;
    b.dispatch_backward_input(&mut dx, &dxe, plan, d)?;
    let seq_batch = (rows.seq, rows.batch);
    let ds = b.route_backward(&dweights, &st.s, &st.route, &m.rule, seq_batch, m.alpha)?;
    let dlogits = b.sigmoid_backward_input(&ds, &st.s)?;
    linear_backward_in(c, &m.gate, &dlogits, x, &mut dx, true, GemmPrecision::F32)?;
    profile::end(t, b)?;
    Ok(dx)
}

enum FfnSt<B: Backend> {
    Dense(SwiSt<B>),
    Moe(Box<MoeSt<B>>),
}

/// A block's activations.
pub(crate) struct BlockSt<B: Backend> {
    in_norm: NormSt<B>,
    attn: MlaSt<B>,
    post_norm: NormSt<B>,
    h2: B::Buf,
    ffn: FfnSt<B>,
}

/// A block's output, what its backward keeps, and its MoE layer's statistics if it has one.
pub(crate) type BlockOut<B> = (<B as Backend>::Buf, BlockSt<B>, Option<MoeStatsOn<B>>);

/// Decoder block `layer` (numbered as `ExpertSite`s are: decoder layers, then MTP's).
pub(crate) fn block_forward<B: Backend>(
    c: &Ctx<'_, B>,
    blk: &Block,
    x: B::Buf,
    rows: Rows,
    pos: &Positions<B>,
    layer: usize,
) -> BackendResult<BlockOut<B>> {
    let b = c.b;
    let t = span(c.prof, b, "forward: attention (norm, mla, residual)")?;
    let (h, in_norm) = norm_forward(c, &blk.input_norm, x)?;
    let (a, attn) = mla_forward(c, &blk.attn, h, rows, pos)?;
    let x1 = b.add(&in_norm.x, &a)?;
    profile::end(t, b)?;
    let t = span(c.prof, b, ffn_label(&blk.ffn, true))?;
    let (h2, post_norm) = norm_forward(c, &blk.post_norm, x1)?;
    let (f, ffn, stats) = match &blk.ffn {
        Ffn::Dense(m) => {
            let (f, s) = swiglu_forward(c, m, &h2)?;
            (f, FfnSt::Dense(s), None)
        }
        Ffn::Moe(m) => {
            let (f, s, stats) = moe_forward(c, m, &h2, rows, layer)?;
            (f, FfnSt::Moe(Box::new(s)), Some(stats))
        }
    };
    let x2 = b.add(&post_norm.x, &f)?;
    profile::end(t, b)?;
    let st = BlockSt {
        in_norm,
        attn,
        post_norm,
        h2,
        ffn,
    };
    Ok((x2, st, stats))
}

pub(crate) fn block_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    blk: &Block,
    dy: B::Buf,
    st: BlockSt<B>,
    rows: Rows,
    pos: &Positions<B>,
    layer: usize,
) -> BackendResult<B::Buf> {
    let (b, prof) = (c.b, c.prof);
    let t = span(prof, b, ffn_label(&blk.ffn, false))?;
    let dh2 = match (&blk.ffn, st.ffn) {
        (Ffn::Dense(m), FfnSt::Dense(s)) => {
            let mut dh2 = c.b.zeros(c.b.len(&dy))?;
            swiglu_backward(c, m, &dy, s, &st.h2, &mut dh2, false)?;
            dh2
        }
        (Ffn::Moe(m), FfnSt::Moe(s)) => moe_backward(c, m, &dy, *s, &st.h2, rows, layer)?,
        _ => unreachable!("stash kind always matches the layer kind"),
    };
    let mut dx1 = dy;
    norm_backward(c, &blk.post_norm, &dh2, &st.post_norm, &mut dx1, true)?;
    profile::end(t, b)?;
    let t = span(prof, b, "backward: attention (norm, mla, residual)")?;
    let dh = mla_backward(c, &blk.attn, &dx1, st.attn, rows, pos)?;
    let mut dx = dx1;
    norm_backward(c, &blk.input_norm, &dh, &st.in_norm, &mut dx, true)?;
    profile::end(t, b)?;
    Ok(dx)
}

/// The profile region of a block's feed-forward half (norm, FFN, residual; a MoE layer's own
/// regions nest inside it).
fn ffn_label(ffn: &Ffn, forward: bool) -> &'static str {
    match (ffn, forward) {
        (Ffn::Dense(_), true) => "forward: dense mlp (norm, swiglu, residual)",
        (Ffn::Dense(_), false) => "backward: dense mlp (norm, swiglu, residual)",
        (Ffn::Moe(_), true) => "forward: moe layer (norm, residual, stats)",
        (Ffn::Moe(_), false) => "backward: moe layer (norm, residual)",
    }
}

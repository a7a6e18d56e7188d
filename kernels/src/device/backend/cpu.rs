//! The CPU backend: every `Backend` primitive as the `kernels::ops` function it mirrors, on host
//! vectors. It is the reference the CUDA backend is compared with, and it lets the device step
//! (`device::model`) be checked against the CPU model without a GPU.

use super::weight_cache::{Form, Storage, WeightCache};
use super::{Backend, BackendError, BackendResult, GemmPrecision, HostPlan};
use crate::fp8::quant::{Fp8Tensor, quantize_1x128, quantize_128x1, quantize_128x128};
use crate::fp8::{ScaleFormat, ScaleLayout};
use crate::ops::adamw::{self, StepConsts};
use crate::ops::moe_dispatch::DispatchPlan;
use crate::ops::moe_gate::{RouteRule, Routing};
use crate::ops::rope::RopeTable;
use crate::ops::{attention, balance, cross_entropy, embedding, linear, moe_dispatch, moe_gate};
use crate::ops::{rmsnorm, rope, swiglu};
use half::bf16;
use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

/// The host as a device (rayon inside the ops), with the weights it rounded or quantised while
/// they are held (`weight_cache`).
#[derive(Debug, Default)]
pub struct Cpu {
    bf16: WeightCache<Vec<f32>>,
    fp8: WeightCache<Fp8Tensor>,
}

impl Cpu {
    /// The host, nothing kept.
    pub fn new() -> Cpu {
        Cpu::default()
    }

    /// W as the GEMM reads it in `p`: as is in f32; in BF16 its rounding, kept while held.
    fn weight<'a>(&self, w: &'a [f32], p: GemmPrecision) -> Operand<'a> {
        match p {
            GemmPrecision::F32 => Operand::Borrowed(w),
            GemmPrecision::Bf16 => {
                Operand::Kept(never(
                    self.bf16.get(Form::Bf16, storage(w), || Ok(round_bf16(w))),
                ))
            }
        }
    }

    /// W `[dout, din]` in 128×128 E4M3 blocks (f32 scales), kept while held.
    fn fp8_weight(&self, w: &[f32], dout: usize, din: usize) -> Arc<Fp8Tensor> {
        never(self.fp8.get(Form::Fp8Blocks { dout, din }, storage(w), || {
            Ok(quantize_128x128(w, dout, din, ScaleFormat::F32))
        }))
    }
}

/// A host slice as the weight cache knows it.
fn storage(w: &[f32]) -> Storage {
    Storage::one(w.as_ptr() as u64, w.len())
}

fn never<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => match e {},
    }
}

fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// A weight as the GEMM reads it: as is, or its rounding (kept while held).
enum Operand<'a> {
    Borrowed(&'a [f32]),
    Kept(Arc<Vec<f32>>),
}

impl std::ops::Deref for Operand<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Operand::Borrowed(x) => x,
            Operand::Kept(x) => x,
        }
    }
}

/// `x` as the GEMM reads it: as is in f32, each value rounded to BF16 (nearest even) in BF16.
fn operand(x: &[f32], p: GemmPrecision) -> Cow<'_, [f32]> {
    match p {
        GemmPrecision::F32 => Cow::Borrowed(x),
        GemmPrecision::Bf16 => Cow::Owned(round_bf16(x)),
    }
}

/// A MoE layer's routing on the host: the `Routing` and its plan.
pub struct CpuRoute {
    pub routing: Routing,
    pub plan: HostPlan,
}

fn check(what: &str, len: usize, want: usize) -> BackendResult<()> {
    super::check_len("cpu backend", what, len, want)
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Table = RopeTable;
    type Plan = HostPlan;
    type Route = CpuRoute;
    type Loss = f64;
    type AttnAux = Vec<f32>;
    type Half = Vec<bf16>;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }

    fn upload(&self, x: &[f32]) -> BackendResult<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn download(&self, x: &Vec<f32>) -> BackendResult<Vec<f32>> {
        Ok(x.clone())
    }

    fn zeros(&self, n: usize) -> BackendResult<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn copy(&self, x: &Vec<f32>) -> BackendResult<Vec<f32>> {
        Ok(x.clone())
    }

    fn copy_ids(&self, ids: &Vec<u32>) -> BackendResult<Vec<u32>> {
        Ok(ids.clone())
    }

    fn fill_zero(&self, x: &mut Vec<f32>) -> BackendResult<()> {
        x.iter_mut().for_each(|v| *v = 0.0);
        Ok(())
    }

    fn ids(&self, ids: &[u32], bound: usize) -> BackendResult<Vec<u32>> {
        if let Some(p) = ids.iter().position(|&i| i as usize >= bound) {
            return Err(BackendError(format!(
                "index[{p}] = {} is not below {bound}",
                ids[p]
            )));
        }
        Ok(ids.to_vec())
    }

    fn table(&self, t: &RopeTable) -> BackendResult<RopeTable> {
        Ok(t.clone())
    }

    fn plan(&self, p: &HostPlan) -> BackendResult<HostPlan> {
        Ok(p.clone())
    }

    fn synchronize(&self) -> BackendResult<()> {
        Ok(())
    }

    fn hold_weights(&self) {
        self.bf16.hold();
        self.fp8.hold();
    }

    fn release_weights(&self) {
        self.bf16.release();
        self.fp8.release();
    }

    fn weight_reuse(&self) -> (u64, u64) {
        let ((a, b), (c, d)) = (self.bf16.counts(), self.fp8.counts());
        (a + c, b + d)
    }

    fn linear_forward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<Vec<f32>> {
        check("linear x", x.len(), n * din)?;
        check("linear w", w.len(), dout * din)?;
        let mut y = vec![0.0; n * dout];
        linear::forward(&mut y, &operand(x, p), &self.weight(w, p), n, din, dout);
        Ok(y)
    }

    fn linear_backward_input(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        din: usize,
        dout: usize,
        acc: bool,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        check("linear dx", dx.len(), n * din)?;
        check("linear dy", dy.len(), n * dout)?;
        let (dy, w) = (operand(dy, p), self.weight(w, p));
        linear::backward_input(dx, &dy, &w, n, din, dout, acc);
        Ok(())
    }

    fn linear_backward_weight(
        &self,
        dw: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        n: usize,
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        check("linear dw", dw.len(), dout * din)?;
        check("linear x", x.len(), n * din)?;
        linear::backward_weight(dw, &operand(dy, p), &operand(x, p), n, din, dout);
        Ok(())
    }

    fn fp8_linear_forward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<Vec<f32>> {
        check("fp8 linear x", x.len(), n * din)?;
        check("fp8 linear w", w.len(), dout * din)?;
        let xq = quantize_1x128(x, n, din, ScaleFormat::F32);
        let mut y = vec![0f32; n * dout];
        crate::fp8::fp8_gemm_fprop(&mut y, &xq, &self.fp8_weight(w, dout, din));
        Ok(y)
    }

    fn fp8_linear_backward_input(
        &self,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<Vec<f32>> {
        check("fp8 linear dy", dy.len(), n * dout)?;
        check("fp8 linear w", w.len(), dout * din)?;
        let dyq = quantize_1x128(dy, n, dout, ScaleFormat::F32);
        let mut dx = vec![0f32; n * din];
        crate::fp8::fp8_gemm_dgrad(&mut dx, &dyq, &self.fp8_weight(w, dout, din));
        Ok(dx)
    }

    fn fp8_linear_backward_weight(
        &self,
        dw: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> BackendResult<()> {
        check("fp8 linear dw", dw.len(), dout * din)?;
        check("fp8 linear x", x.len(), n * din)?;
        let xt = quantize_1x128(x, n, din, ScaleFormat::F32)
            .requantize(ScaleLayout::Tile128x1, ScaleFormat::F32);
        let dyq = quantize_128x1(dy, n, dout, ScaleFormat::F32);
        let mut g = vec![0.0; dout * din];
        crate::fp8::fp8_gemm_wgrad(&mut g, &dyq, &xt);
        dw.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        d: usize,
        eps: f32,
    ) -> BackendResult<(Vec<f32>, Vec<f32>)> {
        let mut y = vec![0.0; x.len()];
        let mut rstd = vec![0.0; x.len() / d];
        rmsnorm::forward(&mut y, &mut rstd, x, w, d, eps);
        Ok((y, rstd))
    }

    fn rmsnorm_backward_input(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        rstd: &Vec<f32>,
        w: &Vec<f32>,
        d: usize,
        acc: bool,
    ) -> BackendResult<()> {
        rmsnorm::backward_input(dx, dy, x, rstd, w, d, acc);
        Ok(())
    }

    fn rmsnorm_backward_weight(
        &self,
        dw: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        rstd: &Vec<f32>,
        d: usize,
    ) -> BackendResult<()> {
        rmsnorm::backward_weight(dw, dy, x, rstd, d);
        Ok(())
    }

    fn swiglu_forward(&self, a: &Vec<f32>, b: &Vec<f32>) -> BackendResult<Vec<f32>> {
        let mut h = vec![0.0; a.len()];
        swiglu::forward(&mut h, a, b);
        Ok(h)
    }

    fn swiglu_backward_input(
        &self,
        dh: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
    ) -> BackendResult<(Vec<f32>, Vec<f32>)> {
        let mut da = vec![0.0; dh.len()];
        let mut db = vec![0.0; dh.len()];
        swiglu::backward_input(&mut da, &mut db, dh, a, b);
        Ok((da, db))
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        stride: usize,
        offset: usize,
        positions: &Vec<u32>,
        table: &RopeTable,
        backward: bool,
    ) -> BackendResult<()> {
        check("rope x", x.len(), positions.len() * stride)?;
        let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        if backward {
            rope::backward_input(x, stride, offset, &pos, table);
        } else {
            rope::forward(x, stride, offset, &pos, table);
        }
        Ok(())
    }

    fn attention_forward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        bh: usize,
        t: usize,
        dqk: usize,
        dv: usize,
        scale: f32,
        prec: GemmPrecision,
    ) -> BackendResult<(Vec<f32>, Vec<f32>)> {
        check("attention q", q.len(), bh * t * dqk)?;
        let mut o = vec![0.0; bh * t * dv];
        let mut p = vec![0.0; bh * t * t];
        let read: &attention::Read<'_> = &move |x| operand(x, prec);
        attention::forward_reading(&mut o, &mut p, q, k, v, t, dqk, dv, scale, read);
        Ok((o, p))
    }

    fn attention_backward_input(
        &self,
        d_o: &Vec<f32>,
        _o: &Vec<f32>,
        probs: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        bh: usize,
        t: usize,
        dqk: usize,
        dv: usize,
        scale: f32,
        prec: GemmPrecision,
    ) -> BackendResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let mut dq = vec![0.0; bh * t * dqk];
        let mut dk = vec![0.0; bh * t * dqk];
        let mut dvv = vec![0.0; bh * t * dv];
        let read: &attention::Read<'_> = &move |x| operand(x, prec);
        attention::backward_input_reading(
            &mut dq, &mut dk, &mut dvv, d_o, probs, q, k, v, t, dqk, dv, scale, read,
        );
        Ok((dq, dk, dvv))
    }

    fn cross_entropy_forward(
        &self,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        v: usize,
    ) -> BackendResult<f64> {
        check("cross-entropy logits", logits.len(), targets.len() * v)?;
        Ok(cross_entropy::forward(logits, targets, v))
    }

    fn cross_entropy_backward_input(
        &self,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        v: usize,
        scale: f32,
    ) -> BackendResult<Vec<f32>> {
        let mut d = vec![0.0; logits.len()];
        cross_entropy::backward_input(&mut d, logits, targets, v, scale);
        Ok(d)
    }

    fn embedding_forward(
        &self,
        ids: &Vec<u32>,
        table: &Vec<f32>,
        d: usize,
    ) -> BackendResult<Vec<f32>> {
        let mut x = vec![0.0; ids.len() * d];
        embedding::forward(&mut x, ids, table, d);
        Ok(x)
    }

    fn embedding_backward_weight(
        &self,
        dtable: &mut Vec<f32>,
        ids: &Vec<u32>,
        dy: &Vec<f32>,
        d: usize,
    ) -> BackendResult<()> {
        check("embedding dy", dy.len(), ids.len() * d)?;
        embedding::backward_weight(dtable, ids, dy, d);
        Ok(())
    }

    fn add(&self, a: &Vec<f32>, b: &Vec<f32>) -> BackendResult<Vec<f32>> {
        check("add b", b.len(), a.len())?;
        Ok(a.iter().zip(b).map(|(x, y)| x + y).collect())
    }

    fn add_into(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> BackendResult<()> {
        check("add_into src", src.len(), dst.len())?;
        dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, f: f32) -> BackendResult<()> {
        x.iter_mut().for_each(|v| *v *= f);
        Ok(())
    }

    fn copy_cols(
        &self,
        dst: &mut Vec<f32>,
        dst_w: usize,
        dst_off: usize,
        src: &Vec<f32>,
        src_w: usize,
        src_off: usize,
        width: usize,
        acc: bool,
    ) -> BackendResult<()> {
        let rows = dst.len() / dst_w;
        check("copy_cols src", src.len(), rows * src_w)?;
        if dst_off + width > dst_w || src_off + width > src_w {
            return Err(BackendError(format!(
                "copy_cols: columns {dst_off}+{width} of {dst_w} / {src_off}+{width} of {src_w}"
            )));
        }
        for (d, s) in dst.chunks_exact_mut(dst_w).zip(src.chunks_exact(src_w)) {
            let (d, s) = (
                &mut d[dst_off..dst_off + width],
                &s[src_off..src_off + width],
            );
            if acc {
                d.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            } else {
                d.copy_from_slice(s);
            }
        }
        Ok(())
    }

    fn heads(
        &self,
        x: &Vec<f32>,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
        inverse: bool,
    ) -> BackendResult<Vec<f32>> {
        check("heads x", x.len(), b * t * nh * w)?;
        let mut y = vec![0.0; x.len()];
        for bi in 0..b {
            for hi in 0..nh {
                for ti in 0..t {
                    let tok = ((bi * t + ti) * nh + hi) * w;
                    let head = ((bi * nh + hi) * t + ti) * w;
                    let (dst, src) = if inverse { (tok, head) } else { (head, tok) };
                    y[dst..dst + w].copy_from_slice(&x[src..src + w]);
                }
            }
        }
        Ok(y)
    }

    fn broadcast_heads(
        &self,
        x: &Vec<f32>,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
    ) -> BackendResult<Vec<f32>> {
        check("broadcast_heads x", x.len(), b * t * w)?;
        let mut y = vec![0.0; b * nh * t * w];
        for bi in 0..b {
            for hi in 0..nh {
                let dst = (bi * nh + hi) * t * w;
                y[dst..dst + t * w].copy_from_slice(&x[bi * t * w..(bi + 1) * t * w]);
            }
        }
        Ok(y)
    }

    fn sum_heads(
        &self,
        x: &Vec<f32>,
        b: usize,
        t: usize,
        nh: usize,
        w: usize,
    ) -> BackendResult<Vec<f32>> {
        check("sum_heads x", x.len(), b * nh * t * w)?;
        let mut y = vec![0.0; b * t * w];
        for bi in 0..b {
            for hi in 0..nh {
                let src = &x[(bi * nh + hi) * t * w..][..t * w];
                y[bi * t * w..(bi + 1) * t * w]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(a, g)| *a += g);
            }
        }
        Ok(y)
    }

    fn sigmoid_forward(&self, x: &Vec<f32>) -> BackendResult<Vec<f32>> {
        let mut s = vec![0.0; x.len()];
        moe_gate::sigmoid_forward(&mut s, x);
        Ok(s)
    }

    fn sigmoid_backward_input(&self, ds: &Vec<f32>, s: &Vec<f32>) -> BackendResult<Vec<f32>> {
        let mut d = vec![0.0; ds.len()];
        moe_gate::sigmoid_backward_input(&mut d, ds, s);
        Ok(d)
    }

    fn dispatch_forward(&self, x: &Vec<f32>, p: &HostPlan, d: usize) -> BackendResult<Vec<f32>> {
        let mut xe = vec![0.0; p.plan.rows() * d];
        moe_dispatch::dispatch_forward(&mut xe, x, &p.plan, d);
        Ok(xe)
    }

    fn dispatch_backward_input(
        &self,
        dx: &mut Vec<f32>,
        dxe: &Vec<f32>,
        p: &HostPlan,
        d: usize,
    ) -> BackendResult<()> {
        moe_dispatch::dispatch_backward_input(dx, dxe, &p.plan, d);
        Ok(())
    }

    fn combine_forward(
        &self,
        out: &mut Vec<f32>,
        ye: &Vec<f32>,
        p: &HostPlan,
        d: usize,
    ) -> BackendResult<()> {
        moe_dispatch::combine_forward(out, ye, &p.weights, p.k, &p.plan, d);
        Ok(())
    }

    fn combine_backward_input(
        &self,
        dout: &Vec<f32>,
        ye: &Vec<f32>,
        p: &HostPlan,
        d: usize,
    ) -> BackendResult<(Vec<f32>, Vec<f32>)> {
        let mut dye = vec![0.0; ye.len()];
        let mut dweights = vec![0.0; p.weights.len()];
        moe_dispatch::combine_backward_input(
            &mut dye,
            &mut dweights,
            dout,
            ye,
            &p.weights,
            p.k,
            &p.plan,
            d,
        );
        Ok((dye, dweights))
    }

    fn route(
        &self,
        s: &Vec<f32>,
        bias: &Vec<f32>,
        rule: &RouteRule,
        e: usize,
    ) -> BackendResult<CpuRoute> {
        check("bias", bias.len(), e)?;
        let routing = moe_gate::forward(s, bias, rule);
        let plan = HostPlan::new(
            DispatchPlan::new(&routing, e),
            routing.k,
            routing.weights.clone(),
        );
        Ok(CpuRoute { routing, plan })
    }

    fn route_plan<'r>(&self, r: &'r CpuRoute) -> &'r HostPlan {
        &r.plan
    }

    fn route_offsets<'r>(&self, r: &'r CpuRoute) -> BackendResult<&'r [usize]> {
        Ok(&r.plan.plan.offsets)
    }

    fn balance_loss(
        &self,
        s: &Vec<f32>,
        r: &CpuRoute,
        (seq, batch): (usize, usize),
        alpha: f32,
    ) -> BackendResult<f64> {
        let k = r.routing.k;
        let ex = &r.routing.experts;
        Ok(balance::batch_loss_forward(s, ex, seq, batch, k, alpha))
    }

    fn read_loss(&self, l: f64) -> BackendResult<f64> {
        Ok(l)
    }

    fn route_backward(
        &self,
        dweights: &Vec<f32>,
        s: &Vec<f32>,
        r: &CpuRoute,
        rule: &RouteRule,
        (seq, batch): (usize, usize),
        alpha: f32,
    ) -> BackendResult<Vec<f32>> {
        let mut ds = vec![0.0; s.len()];
        moe_gate::backward_input(&mut ds, dweights, s, &r.routing, rule);
        if alpha > 0.0 {
            let (ex, k) = (&r.routing.experts, r.routing.k);
            balance::batch_loss_backward_input(&mut ds, s, ex, seq, batch, k, alpha);
        }
        Ok(ds)
    }

    fn rows(&self, x: &Vec<f32>, lo: usize, hi: usize, d: usize) -> BackendResult<Vec<f32>> {
        if hi * d > x.len() || lo > hi {
            return Err(BackendError(format!(
                "rows {lo}..{hi} of {} rows",
                x.len() / d.max(1)
            )));
        }
        Ok(x[lo * d..hi * d].to_vec())
    }

    fn put_rows(
        &self,
        dst: &mut Vec<f32>,
        at: usize,
        src: &Vec<f32>,
        d: usize,
        acc: bool,
    ) -> BackendResult<()> {
        let end = at * d + src.len();
        if end > dst.len() {
            return Err(BackendError(format!(
                "put_rows: {} rows at {at} overrun {} rows",
                src.len() / d.max(1),
                dst.len() / d.max(1)
            )));
        }
        let dst = &mut dst[at * d..end];
        if acc {
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        } else {
            dst.copy_from_slice(src);
        }
        Ok(())
    }

    fn global_norm(&self, grads: &[&Vec<f32>]) -> BackendResult<f64> {
        Ok(adamw::global_norm(grads.iter().map(|g| g.as_slice())))
    }

    fn zeros_half(&self, n: usize) -> BackendResult<Vec<bf16>> {
        Ok(vec![bf16::ZERO; n])
    }

    fn upload_half(&self, bits: &[u16]) -> BackendResult<Vec<bf16>> {
        Ok(bits.iter().map(|&b| bf16::from_bits(b)).collect())
    }

    fn download_half(&self, x: &Vec<bf16>) -> BackendResult<Vec<u16>> {
        Ok(x.iter().map(|b| b.to_bits()).collect())
    }

    fn adamw_step_bf16(
        &self,
        p: &mut Vec<f32>,
        g: &mut Vec<f32>,
        m: &mut Vec<bf16>,
        v: &mut Vec<bf16>,
        grad_scale: f32,
        c: &StepConsts,
    ) -> BackendResult<()> {
        check("adamw g", g.len(), p.len())?;
        check("adamw m", m.len(), p.len())?;
        adamw::step_bf16(p, g, m, v, grad_scale, c);
        Ok(())
    }

    fn adamw_step(
        &self,
        p: &mut Vec<f32>,
        g: &mut Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        grad_scale: f32,
        c: &StepConsts,
    ) -> BackendResult<()> {
        check("adamw g", g.len(), p.len())?;
        adamw::step_f32(p, g, m, v, grad_scale, c);
        Ok(())
    }
}

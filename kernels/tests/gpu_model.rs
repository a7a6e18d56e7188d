//! The device step on a GPU (issue 12): the CUDA backend against the CPU backend, through the
//! same `Backend` trait. Three checks, each on fresh random inputs (seed printed;
//! `PHALANX_PARITY_SEED=N` repeats):
//! 1. every backend primitive the step uses that `gpu_parity.rs` does not already cover (the
//!    three cuBLAS GEMMs of a Linear, accumulation included, in f32 and in BF16 against the CPU's
//!    BF16 emulation; layouts, copies, add, sigmoid, MoE
//!    dispatch and combine, the global norm): bit for bit where the kernel claims the CPU's
//!    bits, GEMMs and dot products within 1e-5 normwise; BF16 attention (the tensor-core path)
//!    within 1e-3 of the CPU's BF16 emulation and 1e-2 of the f32 CPU;
//! 2. one forward-backward of micro (two MTP depths) and tiny: the losses within 1e-5, the same
//!    expert loads, every gradient tensor within 1e-5 normwise (issue 12's f32 bound); with BF16
//!    GEMMs, the same against the f32 CPU step within 2e-2 (issue 12's BF16 bound);
//! 3. determinism: two GPU runs of five AdamW steps from the same seed end with the same
//!    parameter bits; and each weight prepared once per step (its BF16 rounding or FP8
//!    quantisation reused) ends with the bits of preparing it at every use.
//!
//! Without a CUDA driver or device each test prints `SKIPPED: <reason>` and passes. **It has
//! never run on a GPU yet.**

#![cfg(feature = "cuda")]

mod common;
#[path = "common/parity.rs"]
mod parity;

use common::{configs_dir, random_batch as batch, separate_routing};
use kernels::device::backend::{Backend, Cpu, GemmPrecision, HostPlan};
use kernels::device::cuda::backend::CudaBackend;
use kernels::device::model::DeviceModel;
use kernels::model::{DeepSeekV3, RunConfig};
use kernels::ops::adamw::AdamW;
use kernels::ops::moe_dispatch::DispatchPlan;
use kernels::ops::moe_gate::Routing;
use kernels::rng::Rng;
use parity::{Report, indices, normals, shape};
use std::time::Instant;

/// The CUDA backend on `PHALANX_PARITY_DEVICE` (default 0), or None (and why) without one.
fn open() -> Option<CudaBackend> {
    let ordinal = parity::cuda_ordinal()?;
    let b = CudaBackend::open(ordinal).unwrap_or_else(|e| panic!("opening cuda:{ordinal}: {e}"));
    println!("device {}", b.describe());
    Some(b)
}

fn up(g: &CudaBackend, x: &[f32]) -> <CudaBackend as Backend>::Buf {
    g.upload(x).expect("upload")
}

fn down(g: &CudaBackend, x: &<CudaBackend as Backend>::Buf) -> Vec<f32> {
    g.download(x).expect("download")
}

fn gemm_rows(g: &CudaBackend, r: &mut Report, seed: u64) {
    let c = Cpu::new();
    for p in [GemmPrecision::F32, GemmPrecision::Bf16] {
        // BF16: the GPU against the CPU's emulation (the same rounded operands, f32 sums)
        let tag = if p == GemmPrecision::F32 {
            "cuBLAS"
        } else {
            "cuBLAS bf16"
        };
        for (n, din, dout) in [(7, 33, 65), (256, 512, 384), (1, 1, 1), (300, 129, 1000)] {
            let s = format!("n {n}, {din}→{dout}");
            let x = normals(seed, "gemm x", n * din);
            let w = normals(seed, "gemm w", dout * din);
            let dy = normals(seed, "gemm dy", n * dout);
            let prior_dx = normals(seed, "gemm dx prior", n * din);
            let prior_dw = normals(seed, "gemm dw prior", dout * din);
            let (xg, wg, dyg) = (up(g, &x), up(g, &w), up(g, &dy));
            let y = c.linear_forward(&x, &w, n, din, dout, p).unwrap();
            let yg = g.linear_forward(&xg, &wg, n, din, dout, p).unwrap();
            r.norm_rel(
                &format!("linear_forward ({tag})"),
                &s,
                "y",
                &down(g, &yg),
                &y,
            );
            for acc in [false, true] {
                let mut dx = prior_dx.clone();
                c.linear_backward_input(&mut dx, &dy, &w, n, din, dout, acc, p)
                    .unwrap();
                let mut dxg = up(g, &prior_dx);
                g.linear_backward_input(&mut dxg, &dyg, &wg, n, din, dout, acc, p)
                    .unwrap();
                let what = if acc { "dx (+=)" } else { "dx" };
                let k = format!("linear_backward_input ({tag})");
                r.norm_rel(&k, &s, what, &down(g, &dxg), &dx);
            }
            let mut dw = prior_dw.clone();
            c.linear_backward_weight(&mut dw, &dy, &x, n, din, dout, p)
                .unwrap();
            let mut dwg = up(g, &prior_dw);
            g.linear_backward_weight(&mut dwg, &dyg, &xg, n, din, dout, p)
                .unwrap();
            let k = format!("linear_backward_weight ({tag})");
            r.norm_rel(&k, &s, "dw (+=)", &down(g, &dwg), &dw);
        }
    }
}

/// The router through the trait, the device's (`router.cu`) and, past its limits (300 experts),
/// the host fallback, against the CPU backend bit for bit: the plan's offsets and the dispatched
/// rows, the balance loss (f64 bits) and the router's gradient with the balance term.
fn route_rows(g: &CudaBackend, r: &mut Report, seed: u64) {
    use kernels::ops::moe_gate::RouteRule;
    let c = Cpu::new();
    for (e, n_group, topk_group, k) in [(32, 8, 4, 4), (256, 8, 4, 8), (300, 1, 1, 2)] {
        let (seq, batch, d) = (64, 3, 16);
        let n = seq * batch;
        let s = format!("{n} tokens, {e} experts, {n_group} groups, top-{k}");
        let rule = RouteRule {
            n_group,
            topk_group,
            k,
            scale: 2.5,
            normalize: true,
        };
        let aff: Vec<f32> = normals(seed, "route s", n * e)
            .into_iter()
            .map(|v| ((1.0 / (1.0 + (-v).exp())) * 32.0).round() / 32.0)
            .collect();
        let bias: Vec<f32> = normals(seed, "route bias", e)
            .iter()
            .map(|v| v * 0.01)
            .collect();
        let dweights = normals(seed, "route dw", n * k);
        let x = normals(seed, "route x", n * d);
        let alpha = 1e-3;
        let want = c.route(&aff, &bias, &rule, e).unwrap();
        let (sg, bg) = (up(g, &aff), up(g, &bias));
        let got = g.route(&sg, &bg, &rule, e).unwrap();
        let offsets_ok = g.route_offsets(&got).unwrap() == c.route_offsets(&want).unwrap();
        r.check(
            "route (offsets)",
            &s,
            "equal",
            format!("{offsets_ok}"),
            offsets_ok,
        );
        let xe = c.dispatch_forward(&x, c.route_plan(&want), d).unwrap();
        let xeg = g
            .dispatch_forward(&up(g, &x), g.route_plan(&got), d)
            .unwrap();
        r.bits("route (plan)", &s, "dispatched rows", &down(g, &xeg), &xe);
        let lw = c.balance_loss(&aff, &want, (seq, batch), alpha).unwrap();
        let lw = c.read_loss(lw).unwrap();
        let lg = g.balance_loss(&sg, &got, (seq, batch), alpha).unwrap();
        let lg = g.read_loss(lg).unwrap();
        let v = format!("gpu {lg:e}, cpu {lw:e}");
        r.check(
            "balance_loss",
            &s,
            "f64 bits",
            v,
            lg.to_bits() == lw.to_bits(),
        );
        let ds = c
            .route_backward(&dweights, &aff, &want, &rule, (seq, batch), alpha)
            .unwrap();
        let dsg = g
            .route_backward(&up(g, &dweights), &sg, &got, &rule, (seq, batch), alpha)
            .unwrap();
        r.bits("route_backward (+ balance)", &s, "ds", &down(g, &dsg), &ds);
    }
}

/// The routed experts' three GEMMs through the trait on the GPU and on the CPU backend (its
/// expert-by-expert reference), over `offsets` with the experts' weights in reverse order: the
/// forward, the input gradient written and added to a prior, and every expert's weight gradient
/// added to a prior, as (what, gpu, cpu).
fn expert_gemms(
    g: &CudaBackend,
    seed: u64,
    kind: kernels::device::backend::ExpertGemm,
    (din, dout): (usize, usize),
    offsets: &[usize],
) -> Vec<(&'static str, Vec<f32>, Vec<f32>)> {
    let c = Cpu::new();
    let (rows, experts) = (offsets[offsets.len() - 1], offsets.len() - 1);
    let ws: Vec<Vec<f32>> = (0..experts)
        .map(|e| normals(seed + e as u64, "experts w", dout * din))
        .collect();
    let wsg: Vec<_> = ws.iter().map(|w| up(g, w)).collect();
    let ids: Vec<usize> = (0..experts).rev().collect();
    let x = normals(seed, "experts x", rows * din);
    let dy = normals(seed, "experts dy", rows * dout);
    let prior = normals(seed, "experts dx prior", rows * din);
    let (xg, dyg) = (up(g, &x), up(g, &dy));
    let mut out = Vec::new();
    let y = c
        .grouped_linear_forward(&x, &ws, &ids, offsets, din, dout, kind)
        .unwrap();
    let yg = g
        .grouped_linear_forward(&xg, &wsg, &ids, offsets, din, dout, kind)
        .unwrap();
    out.push(("y", down(g, &yg), y));
    for (acc, what) in [(false, "dx"), (true, "dx (+=)")] {
        let mut dx = prior.clone();
        c.grouped_linear_backward_input(&mut dx, &dy, &ws, &ids, offsets, din, dout, acc, kind)
            .unwrap();
        let mut dxg = up(g, &prior);
        g.grouped_linear_backward_input(&mut dxg, &dyg, &wsg, &ids, offsets, din, dout, acc, kind)
            .unwrap();
        out.push((what, down(g, &dxg), dx));
    }
    let priors: Vec<Vec<f32>> = (0..experts)
        .map(|e| normals(seed + e as u64, "experts dw prior", dout * din))
        .collect();
    let mut dws = priors.clone();
    c.grouped_linear_backward_weight(&mut dws, &ids, &dy, &x, offsets, din, dout, kind)
        .unwrap();
    let mut dwsg: Vec<_> = priors.iter().map(|w| up(g, w)).collect();
    g.grouped_linear_backward_weight(&mut dwsg, &ids, &dyg, &xg, offsets, din, dout, kind)
        .unwrap();
    let got: Vec<f32> = dwsg.iter().flat_map(|b| down(g, b)).collect();
    out.push(("dW (+=), every expert", got, dws.concat()));
    out
}

/// "n refused (first: …)" since `before`, and whether none was.
fn refused_since(g: &CudaBackend, before: u64) -> (String, bool) {
    let (after, first) = g.grouped_refused.get();
    let value = format!(
        "{} refused{}",
        after - before,
        first.map(|f| format!(" (first: {f})")).unwrap_or_default()
    );
    (value, after == before)
}

/// The routed experts' grouped GEMMs (one `cublasGemmGroupedBatchedEx` call per projection)
/// against the CPU backend's expert-by-expert reference, f32 and BF16, over segments with an
/// empty expert and a one-row expert; `grouped_refused` says whether cuBLAS took the calls (it
/// must for f32; for BF16 operands with an f32 output it is reported, and whether the calls go
/// one per expert since cuBLAS refused the grouped call at open).
fn grouped_rows(g: &CudaBackend, r: &mut Report, seed: u64) {
    use kernels::device::backend::ExpertGemm;
    let on = g.grouped_off.clone().unwrap_or_else(|| "on".into());
    let ok = g.grouped_off.is_none();
    r.check("grouped gemm (cuBLAS)", "open", "passed its check", on, ok);
    let offsets = [0usize, 40, 40, 41, 200, 256];
    for p in [GemmPrecision::F32, GemmPrecision::Bf16] {
        let before = g.grouped_refused.get().0;
        for (din, dout) in [(64, 96), (33, 7)] {
            let s = format!("5 experts, 256 rows, {din}→{dout}, {p:?}");
            let kind = ExpertGemm::Plain(p);
            for (what, got, want) in expert_gemms(g, seed, kind, (din, dout), &offsets) {
                r.norm_rel("grouped_linear_*", &s, what, &got, &want);
            }
        }
        let (value, none) = refused_since(g, before);
        let (label, metric) = ("grouped gemm (cuBLAS)", "one call per projection");
        if p == GemmPrecision::F32 {
            r.check(label, "f32", metric, value, none);
        } else {
            // a refusal is met at open (`grouped_check`); the calls then go one per expert
            let how = if g.grouped_bf16_refused.get() {
                format!("one cublasGemmEx per expert (refused at open); {value}")
            } else {
                value
            };
            r.push(label, "bf16 → f32", metric, how, parity::Verdict::Info);
        }
    }
}

/// The FP8 Linear of the recipe (quantisation on the device, then each GEMM engine) against the
/// CPU's `fp8::linear_*_fp8` and weight job: codes and scales are bit-identical, the block sums
/// are reordered. The CUDA-core kernel is judged at 1e-5 normwise; cuBLASLt's tensor cores at
/// `fp8_linear::AGREE` (1e-3: their accumulation inside a 128-wide block is not f32's; an estimate
/// until measured, printed for the first GPU run to tighten). (7, 200, 130) is a shape cuBLASLt
/// does not take (K = 200), so it runs the CUDA cores under either engine.
fn fp8_rows(g: &mut CudaBackend, r: &mut Report, seed: u64) {
    use kernels::device::cuda::fp8_linear::{AGREE, Fp8Engine, Fp8Linear};
    let info = parity::Verdict::Info;
    r.push("fp8 engine", "open", &g.fp8.describe(), String::new(), info);
    let own = Fp8Linear::new(Fp8Engine::CudaCores(
        "the parity test's CUDA-core pass".into(),
    ));
    let opened = std::mem::replace(&mut g.fp8, own);
    fp8_linear_rows(g, r, seed, "cuda cores", 1e-5);
    g.fp8 = opened;
    if matches!(g.fp8.engine, Fp8Engine::TensorCores(_)) {
        fp8_linear_rows(g, r, seed, "tensor cores", AGREE);
        let (n, first) = g.fp8.refused.get();
        let value = format!(
            "{n} refused{}",
            first.map(|f| format!(" (first: {f})")).unwrap_or_default()
        );
        r.check(
            "fp8 tensor cores",
            "the rows above",
            "no GEMM refused",
            value,
            n == 0,
        );
    }
    // the packing of cuBLASLt's operands on the device, bit for bit with fp8::pack's gathers
    for (label, p) in [
        ("fprop", kernels::fp8::pack::fprop(37, 640, 144)),
        ("dgrad", kernels::fp8::pack::dgrad(37, 640, 144)),
        ("wgrad", kernels::fp8::pack::wgrad(37, 640, 144)),
    ] {
        for (side, op) in [("A", p.a), ("B", p.b)] {
            for (what, gather) in [("codes", op.codes), ("scales", op.scales)] {
                let s = format!("{label} {side} {what} {}", shape(&[gather.rows, gather.ld]));
                let src = normals(seed, "pack src", gather.src_extent());
                let codes: Vec<u8> = src.iter().map(|v| v.to_bits() as u8).collect();
                let got_codes = g
                    .gpu
                    .fp8_pack_codes(&gather, &g.gpu.upload(&codes).unwrap())
                    .unwrap();
                let got_codes = g.gpu.download(&got_codes).unwrap();
                let want = gather.apply(&codes);
                let bad = got_codes.len().abs_diff(want.len())
                    + got_codes.iter().zip(&want).filter(|(a, b)| a != b).count();
                r.check(
                    "fp8_pack_codes",
                    &s,
                    "bits",
                    format!("{bad}/{} differ", want.len()),
                    bad == 0,
                );
                let got = g
                    .gpu
                    .fp8_pack_scales(&gather, &g.gpu.upload(&src).unwrap())
                    .unwrap();
                r.bits(
                    "fp8_pack_scales",
                    &s,
                    "copy",
                    &g.gpu.download(&got).unwrap(),
                    &gather.apply(&src),
                );
            }
        }
    }
}

/// The three FP8 Linear ops on `g`'s engine against the CPU's, normwise within `tol`.
/// FP8 experts with one launch per GEMM (`fp8_grouped.cu` on the tensor cores, when its check at
/// open passed) against the CPU backend's expert-by-expert FP8 recipe, over segments with an
/// empty and a one-row expert and one past 128 rows; within `fp8_linear::AGREE`, as the tensor
/// cores' FP8 Linear; no call refused.
fn fp8_grouped_rows(g: &CudaBackend, r: &mut Report, seed: u64) {
    use kernels::device::backend::ExpertGemm;
    use kernels::device::cuda::fp8_linear::AGREE;
    let verdict = match &g.fp8_grouped {
        Ok(a) => format!("on ({a:.1e} from the expert loop)"),
        Err(why) => why.clone(),
    };
    let on = g.fp8_grouped.is_ok();
    let label = "fp8 experts, one launch";
    r.check(label, "open", "passed its check", verdict, on);
    if !on {
        return;
    }
    let before = g.grouped_refused.get().0;
    let offsets = [0usize, 40, 40, 41, 200, 256];
    for (din, dout) in [(256, 192), (200, 130)] {
        let s = format!("5 experts, 256 rows, {din}→{dout}");
        let metric = format!("norm rel ≤ {AGREE:.0e}");
        for (what, got, want) in expert_gemms(g, seed, ExpertGemm::Fp8, (din, dout), &offsets) {
            let e = parity::norm_rel_error(&got, &want);
            let kernel = format!("fp8 experts {what}");
            r.check(&kernel, &s, &metric, format!("{e:.2e}"), e <= AGREE);
        }
    }
    let (value, none) = refused_since(g, before);
    r.check(label, "calls", "none refused", value, none);
}

/// The FP8 experts' Fprop at medium's shape (64 experts of 768 rows, 2048 → 512): one launch
/// against the expert loop (`Fp8Linear` per expert: its quantise, pack and GEMM launches), each
/// the best of three calls, host launches included. Information for the next kernel, not judged.
fn fp8_grouped_speed(g: &CudaBackend, r: &mut Report) {
    use kernels::device::backend::{ExpertGemm, grouped};
    if g.fp8_grouped.is_err() {
        return;
    }
    let (experts, per, din, dout) = (64usize, 768usize, 2048usize, 512usize);
    let rows = experts * per;
    let offsets: Vec<usize> = (0..=experts).map(|e| e * per).collect();
    // values of a few magnitudes (no RNG over 100M values on the host)
    let pattern = |n: usize, k: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * k) % 29) as f32 * 0.07 - 1.0).collect()
    };
    let x = up(g, &pattern(rows * din, 7));
    let ws: Vec<_> = (0..experts)
        .map(|e| up(g, &pattern(dout * din, 11 + e)))
        .collect();
    let ids: Vec<usize> = (0..experts).collect();
    let best = |f: &dyn Fn()| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..3 {
            g.synchronize().unwrap();
            let t = std::time::Instant::now();
            f();
            g.synchronize().unwrap();
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        best
    };
    let kind = ExpertGemm::Fp8;
    let one = best(&|| {
        g.grouped_linear_forward(&x, &ws, &ids, &offsets, din, dout, kind)
            .unwrap();
    });
    let looped = best(&|| {
        grouped::forward_per_segment(g, &x, &ws, &ids, &offsets, din, dout, kind).unwrap();
    });
    let tflops = |ms: f64| 2.0 * (rows * din * dout) as f64 / (ms * 1e-3) / 1e12;
    let value = format!(
        "one launch {one:.2} ms ({:.0} TFLOP/s), expert loop {looped:.2} ms ({:.0} TFLOP/s)",
        tflops(one),
        tflops(looped)
    );
    let s = format!("{experts}×{per} rows, {din}→{dout}");
    r.push(
        "fp8 experts speed",
        &s,
        "fprop, best of 3",
        value,
        parity::Verdict::Info,
    );
}

fn fp8_linear_rows(g: &CudaBackend, r: &mut Report, seed: u64, label: &str, tol: f64) {
    let c = Cpu::new();
    for (n, din, dout) in [(7, 200, 130), (256, 512, 384)] {
        let s = format!("n {n}, {din}→{dout}, {label}");
        let x = normals(seed, "fp8 x", n * din);
        let w = normals(seed, "fp8 w", dout * din);
        let dy = normals(seed, "fp8 dy", n * dout);
        let prior = normals(seed, "fp8 dw prior", dout * din);
        let (xg, wg, dyg) = (up(g, &x), up(g, &w), up(g, &dy));
        let metric = format!("norm rel ≤ {tol:.0e}");
        let mut judge = |kernel: &str, got: &[f32], want: &[f32]| {
            let e = parity::norm_rel_error(got, want);
            r.check(kernel, &s, &metric, format!("{e:.2e}"), e <= tol);
        };
        let y = c.fp8_linear_forward(&x, &w, n, din, dout).unwrap();
        let yg = g.fp8_linear_forward(&xg, &wg, n, din, dout).unwrap();
        judge("fp8 Fprop (quantise + GEMM)", &down(g, &yg), &y);
        let dx = c.fp8_linear_backward_input(&dy, &w, n, din, dout).unwrap();
        let dxg = g
            .fp8_linear_backward_input(&dyg, &wg, n, din, dout)
            .unwrap();
        judge("fp8 Dgrad", &down(g, &dxg), &dx);
        let mut dw = prior.clone();
        c.fp8_linear_backward_weight(&mut dw, &dy, &x, n, din, dout)
            .unwrap();
        let mut dwg = up(g, &prior);
        g.fp8_linear_backward_weight(&mut dwg, &dyg, &xg, n, din, dout)
            .unwrap();
        judge("fp8 Wgrad (requantised x) +=", &down(g, &dwg), &dw);
    }
}

fn layout_rows(g: &CudaBackend, r: &mut Report, seed: u64) {
    let c = Cpu::new();
    let (b, t, nh, w) = (2, 37, 4, 24);
    let s = shape(&[b, t, nh, w]);
    let x = normals(seed, "layout x", b * t * nh * w);
    let xt = normals(seed, "layout xt", b * t * w);
    let (xg, xtg) = (up(g, &x), up(g, &xt));
    for inverse in [false, true] {
        let want = c.heads(&x, b, t, nh, w, inverse).unwrap();
        let got = g.heads(&xg, b, t, nh, w, inverse).unwrap();
        let what = if inverse {
            "inverse"
        } else {
            "[b,t,h,w]→[b,h,t,w]"
        };
        r.bits("tensor_heads", &s, what, &down(g, &got), &want);
    }
    let want = c.broadcast_heads(&xt, b, t, nh, w).unwrap();
    let got = g.broadcast_heads(&xtg, b, t, nh, w).unwrap();
    r.bits("tensor_broadcast_heads", &s, "y", &down(g, &got), &want);
    let want = c.sum_heads(&x, b, t, nh, w).unwrap();
    let got = g.sum_heads(&xg, b, t, nh, w).unwrap();
    r.bits("tensor_sum_heads", &s, "y", &down(g, &got), &want);
    let rows = b * t * nh;
    for acc in [false, true] {
        let mut want = normals(seed, "cols dst", rows * 40);
        let mut got = up(g, &want);
        c.copy_cols(&mut want, 40, 16, &x, w, 4, 20, acc).unwrap();
        g.copy_cols(&mut got, 40, 16, &xg, w, 4, 20, acc).unwrap();
        let s = format!("{} ← {}, acc {acc}", shape(&[rows, 40]), shape(&[rows, w]));
        r.bits("tensor_copy_cols", &s, "dst", &down(g, &got), &want);
        let mut want = normals(seed, "rows dst", 50 * w);
        let mut got = up(g, &want);
        let blk = c.rows(&x, 3, 20, w).unwrap();
        let blkg = g.rows(&xg, 3, 20, w).unwrap();
        c.put_rows(&mut want, 30, &blk, w, acc).unwrap();
        g.put_rows(&mut got, 30, &blkg, w, acc).unwrap();
        let s = format!("rows 3..20 → 30.., acc {acc}");
        r.bits(
            "tensor_copy (rows, put_rows)",
            &s,
            "dst",
            &down(g, &got),
            &want,
        );
    }
    let y = normals(seed, "add y", x.len());
    let yg = up(g, &y);
    let want = c.add(&x, &y).unwrap();
    r.bits(
        "tensor_add",
        &s,
        "x + y",
        &down(g, &g.add(&xg, &yg).unwrap()),
        &want,
    );
    let mut want = x.clone();
    c.add_into(&mut want, &y).unwrap();
    let mut got = up(g, &x);
    g.add_into(&mut got, &yg).unwrap();
    r.bits(
        "tensor_copy (add_into)",
        &s,
        "x += y",
        &down(g, &got),
        &want,
    );
    let logits: Vec<f32> = x.iter().map(|v| v * 6.0).collect();
    let sw = c.sigmoid_forward(&logits).unwrap();
    let sg = g.sigmoid_forward(&up(g, &logits)).unwrap();
    r.rel("sigmoid_forward", &s, "s", &down(g, &sg), &sw);
    let want = c.sigmoid_backward_input(&y, &sw).unwrap();
    let got = g.sigmoid_backward_input(&yg, &up(g, &sw)).unwrap();
    r.bits("sigmoid_backward_input", &s, "d", &down(g, &got), &want);
}

fn moe_rows(g: &CudaBackend, r: &mut Report, seed: u64) {
    let c = Cpu::new();
    let (tokens, e, k, d) = (300, 64, 6, 256);
    let s = format!("{tokens} tokens, {e} experts, top-{k}, d {d}");
    let picks = indices(seed, "moe picks", tokens * e, e);
    let mut experts = Vec::new();
    for t in 0..tokens {
        let mut chosen: Vec<u32> = Vec::new();
        for &p in &picks[t * e..(t + 1) * e] {
            if !chosen.contains(&p) && chosen.len() < k {
                chosen.push(p);
            }
        }
        let mut next = 0;
        while chosen.len() < k {
            if !chosen.contains(&next) {
                chosen.push(next);
            }
            next += 1;
        }
        experts.extend(chosen);
    }
    let weights: Vec<f32> = normals(seed, "moe w", tokens * k)
        .iter()
        .map(|v| v.abs())
        .collect();
    let routing = Routing {
        k,
        experts,
        weights: weights.clone(),
    };
    let hp = HostPlan::new(DispatchPlan::new(&routing, e), k, weights);
    let pg = g.plan(&hp).unwrap();
    let rows = hp.plan.rows();
    let x = normals(seed, "moe x", tokens * d);
    let ye = normals(seed, "moe ye", rows * d);
    let dout = normals(seed, "moe dout", tokens * d);
    let xe = c.dispatch_forward(&x, &hp, d).unwrap();
    let xeg = g.dispatch_forward(&up(g, &x), &pg, d).unwrap();
    r.bits("moe_dispatch_forward", &s, "xe", &down(g, &xeg), &xe);
    let mut dx = dout.clone();
    c.dispatch_backward_input(&mut dx, &ye, &hp, d).unwrap();
    let mut dxg = up(g, &dout);
    g.dispatch_backward_input(&mut dxg, &up(g, &ye), &pg, d)
        .unwrap();
    r.bits("moe_dispatch_backward_input", &s, "dx", &down(g, &dxg), &dx);
    let mut out = x.clone();
    c.combine_forward(&mut out, &ye, &hp, d).unwrap();
    let mut outg = up(g, &x);
    g.combine_forward(&mut outg, &up(g, &ye), &pg, d).unwrap();
    r.bits("moe_combine_forward", &s, "out", &down(g, &outg), &out);
    let (dye, dw) = c.combine_backward_input(&dout, &ye, &hp, d).unwrap();
    let (dyeg, dwg) = g
        .combine_backward_input(&up(g, &dout), &up(g, &ye), &pg, d)
        .unwrap();
    r.bits(
        "moe_combine_backward_input",
        &s,
        "dye",
        &down(g, &dyeg),
        &dye,
    );
    r.norm_rel(
        "moe_combine_backward_input",
        &s,
        "dweights",
        &down(g, &dwg),
        &dw,
    );
    let tensors: Vec<Vec<f32>> = [1usize, 16_383, 16_384, 40_000]
        .iter()
        .map(|&n| normals(seed, "norm g", n))
        .collect();
    let want = c.global_norm(&tensors.iter().collect::<Vec<_>>()).unwrap();
    let dev: Vec<_> = tensors.iter().map(|t| up(g, t)).collect();
    let got = g.global_norm(&dev.iter().collect::<Vec<_>>()).unwrap();
    r.check(
        "grad_norm (global_norm)",
        "4 tensors",
        "f64 bits",
        format!("gpu {got:e}, cpu {want:e}"),
        got.to_bits() == want.to_bits(),
    );
}

#[test]
fn backend_primitives_match_the_cpu_backend() {
    let Some(mut g) = open() else { return };
    let seed = parity::seed();
    println!("seed {seed} (repeat with PHALANX_PARITY_SEED={seed})");
    let mut r = Report::default();
    gemm_rows(&g, &mut r, seed);
    grouped_rows(&g, &mut r, seed);
    route_rows(&g, &mut r, seed);
    fp8_rows(&mut g, &mut r, seed);
    fp8_grouped_rows(&g, &mut r, seed);
    fp8_grouped_speed(&g, &mut r);
    layout_rows(&g, &mut r, seed);
    moe_rows(&g, &mut r, seed);
    attention_rows(&g, &mut r, seed);
    r.print();
    assert_eq!(r.failures(), 0, "backend primitives differ (table above)");
}

/// Attention through the trait in BF16 (the tensor cores when the check at open passed, which
/// the description says): o, dq, dk, dv against the CPU's BF16 emulation (the same rounded
/// operands; a probability near a rounding boundary may round the other way, 1e-3) and against
/// the f32 CPU (BF16's rounding, 1e-2).
fn attention_rows(g: &CudaBackend, r: &mut Report, seed: u64) {
    let (c, p16) = (Cpu::new(), GemmPrecision::Bf16);
    for (bh, t, dqk, dv) in [(4, 128, 96, 64), (1, 300, 192, 128)] {
        let s = format!("bh {bh} t {t} d {dqk}/{dv}");
        let scale = (dqk as f32).powf(-0.5);
        let (nqk, nv) = (bh * t * dqk, bh * t * dv);
        let (q, k) = (normals(seed, "att q", nqk), normals(seed, "att k", nqk));
        let (v, d_o) = (normals(seed, "att v", nv), normals(seed, "att do", nv));
        let (qg, kg, vg, dog) = (up(g, &q), up(g, &k), up(g, &v), up(g, &d_o));
        let (og, aux) = g
            .attention_forward(&qg, &kg, &vg, bh, t, dqk, dv, scale, p16)
            .unwrap();
        let gg = g
            .attention_backward_input(&dog, &og, &aux, &qg, &kg, &vg, bh, t, dqk, dv, scale, p16)
            .unwrap();
        let got = [down(g, &og), down(g, &gg.0), down(g, &gg.1), down(g, &gg.2)];
        for (prec, tol, tag) in [
            (p16, 1e-3, "cpu bf16"),
            (GemmPrecision::F32, 1e-2, "cpu f32"),
        ] {
            let (o, pr) = c
                .attention_forward(&q, &k, &v, bh, t, dqk, dv, scale, prec)
                .unwrap();
            let (dq, dk, dvv) = c
                .attention_backward_input(&d_o, &o, &pr, &q, &k, &v, bh, t, dqk, dv, scale, prec)
                .unwrap();
            let e = [&o, &dq, &dk, &dvv]
                .iter()
                .zip(&got)
                .map(|(w, x)| parity::norm_rel_error(x, w))
                .fold(0f64, f64::max);
            r.check(
                "attention bf16 (o, dq, dk, dv)",
                &s,
                &format!("norm rel ≤ {tol:e} vs {tag}"),
                format!("{e:.2e}"),
                e <= tol,
            );
        }
    }
}

#[path = "gpu_model/steps.rs"]
mod steps;

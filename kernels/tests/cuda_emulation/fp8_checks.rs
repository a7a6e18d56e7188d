//! The FP8 kernels emulated against `kernels::fp8`: the three E4M3 quantisers and the
//! dequantiser (`fp8_quant.cu`, with the stand-in `include/cuda_fp8.h` for the conversion) on
//! adversarial inputs, codes and scales bit for bit (a NaN matches any NaN); the promoted FP8 GEMM
//! (`fp8_gemm.cu`) in the three orientations; and the packing of cuBLASLt's operands
//! (`fp8_pack.cu`).

use super::parity::{
    Report, adversarial, code_mismatches, f32_mismatches, indices, normals, quantize_each_128x128,
    quantize_segments, shape,
};
use super::{Emu, failed};
use kernels::fp8::{ScaleFormat, ScaleLayout};

/// The quantisers in every layout and scale format, then the dequantiser on the CPU's codes, on
/// shapes off the 128 boundaries (one element; fewer rows than a tile; a ragged last tile).
pub fn fp8_quant_rows(emu: &Emu, r: &mut Report, seed: u64) {
    let layouts = [
        (ScaleLayout::Tile1x128, "1x128", 0),
        (ScaleLayout::Tile128x1, "128x1", 1),
        (ScaleLayout::Block128x128, "128x128", 2),
    ];
    for (rows, cols) in [(1, 1), (3, 385), (129, 127), (130, 300)] {
        let x = adversarial(seed ^ (rows * cols) as u64, rows, cols);
        for (layout, name, code) in layouts {
            for (fmt, fname, ue8m0) in [
                (ScaleFormat::F32, "f32", 0),
                (ScaleFormat::Ue8m0, "ue8m0", 1),
            ] {
                let s = format!("{}, {fname} scales", shape(&[rows, cols]));
                let kernel = format!("fp8_quantize_{name}");
                let run = emu.prepare();
                run.put("x", &x);
                let args = [rows, cols, code, ue8m0].map(|v| v.to_string());
                if let Err(e) = emu.exec(&run, "fp8_quant", &args) {
                    failed(r, &kernel, &s, e);
                    continue;
                }
                let want = kernels::fp8::quantize(&x, rows, cols, layout, fmt);
                let (codes, scales): (Vec<u8>, Vec<f32>) = (run.get("codes"), run.get("scales"));
                let (bad, first) = code_mismatches(&codes, &want.codes);
                let value = match first {
                    Some(i) => format!(
                        "{bad}/{} differ (first [{i}]: x {:e}, {:#04x} vs {:#04x})",
                        want.codes.len(),
                        x[i],
                        codes[i],
                        want.codes[i]
                    ),
                    None => format!("0/{} differ", want.codes.len()),
                };
                r.check(
                    &kernel,
                    &s,
                    "codes",
                    value,
                    bad == 0 && codes.len() == want.codes.len(),
                );
                let (bad, _) = f32_mismatches(&scales, &want.scales);
                let value = format!("{bad}/{} differ", want.scales.len());
                let ok = bad == 0 && scales.len() == want.scales.len();
                r.check(&kernel, &s, "scales", value, ok);
                // the dequantiser on the kernel's codes and scales (equal to the CPU's when the
                // rows above pass)
                let deq = kernels::fp8::dequantize(&kernels::fp8::Fp8Tensor {
                    codes,
                    scales,
                    ..want
                });
                r.bits(
                    &format!("fp8_dequantize ({name})"),
                    &s,
                    "y",
                    &run.get("y"),
                    &deq,
                );
            }
        }
    }
}

/// The segmented 128×1 quantiser (`fp8_quantize_128x1_segmented`, Wgrad's operands of every
/// expert in one launch) against `fp8::quantize` of each segment's rows on their own: codes in
/// place and scales band by band, bit for bit, on adversarial inputs (segments empty, shorter
/// than a band, and past two bands), both scale formats.
pub fn fp8_quant_segmented_rows(emu: &Emu, r: &mut Report, seed: u64) {
    let (offsets, cols) = ([0usize, 130, 130, 131, 400], 300);
    let x = adversarial(seed ^ 0x5e9, offsets[offsets.len() - 1], cols);
    let (bands, _) = kernels::fp8::grouped::row_bands(&offsets);
    let kernel = "fp8_quantize_128x1_segmented";
    let s = format!("segments {offsets:?} × {cols}");
    for (fmt, fname, ue8m0) in [
        (ScaleFormat::F32, "f32", 0),
        (ScaleFormat::Ue8m0, "ue8m0", 1),
    ] {
        let run = emu.prepare();
        run.put("x", &x);
        run.put("bands", &bands);
        let args = [cols, ue8m0].map(|v| v.to_string());
        if let Err(e) = emu.exec(&run, "fp8_quant_segmented", &args) {
            failed(r, kernel, &s, e);
            continue;
        }
        let (codes, scales): (Vec<u8>, Vec<f32>) = (run.get("codes"), run.get("scales"));
        let (wc, ws) = quantize_segments(&x, &offsets, cols, fmt);
        let note = format!("{fname} scales");
        r.codes_and_scales(kernel, &s, &note, (&codes, &scales), (&wc, &ws));
    }
}

/// The batched 128×128 quantiser (`fp8_quantize_128x128_batched`, the routed experts' weights in
/// one launch) against `fp8::quantize` of each matrix: codes and scales bit for bit, on
/// adversarial inputs of a ragged shape, both scale formats.
pub fn fp8_quant_batched_rows(emu: &Emu, r: &mut Report, seed: u64) {
    let (rows, cols, mats) = (130, 300, 3);
    let xs: Vec<Vec<f32>> = (0..mats)
        .map(|z| adversarial(seed ^ (z as u64 + 17), rows, cols))
        .collect();
    let kernel = "fp8_quantize_128x128_batched";
    let s = format!("{mats} × {}", shape(&[rows, cols]));
    for (fmt, fname, ue8m0) in [
        (ScaleFormat::F32, "f32", 0),
        (ScaleFormat::Ue8m0, "ue8m0", 1),
    ] {
        let run = emu.prepare();
        run.put("x", &xs.concat());
        let args = [rows, cols, mats, ue8m0].map(|v| v.to_string());
        if let Err(e) = emu.exec(&run, "fp8_quant_batched", &args) {
            failed(r, kernel, &s, e);
            continue;
        }
        let (codes, scales): (Vec<u8>, Vec<f32>) = (run.get("codes"), run.get("scales"));
        let (wc, ws) = quantize_each_128x128(&xs, rows, cols, fmt);
        let note = format!("{fname} scales");
        r.codes_and_scales(kernel, &s, &note, (&codes, &scales), (&wc, &ws));
    }
}

/// The promoted FP8 GEMM (`fp8_gemm.cu`) in the three orientations of a Linear, with the
/// operands' strides the CUDA backend passes, against `fp8::fp8_gemm_fprop`, `_dgrad` and
/// `_wgrad` on the same quantised tensors (exact products; sums in another order: normwise
/// within 1e-7).
pub fn fp8_gemm_rows(emu: &Emu, r: &mut Report, seed: u64) {
    use kernels::fp8::quant::{quantize_1x128, quantize_128x1, quantize_128x128};
    use kernels::fp8::{fp8_gemm_dgrad, fp8_gemm_fprop, fp8_gemm_wgrad};
    let f = ScaleFormat::F32;
    for (n, din, dout) in [(5, 200, 130), (130, 64, 3)] {
        let s = format!("n {n}, {din}→{dout}");
        let x = normals(seed, "fp8 x", n * din);
        let w = normals(seed, "fp8 w", dout * din);
        let dy = normals(seed, "fp8 dy", n * dout);
        let (kin, kout) = (din.div_ceil(128), dout.div_ceil(128));
        // (kernel label, m, n, k, A, a strides, B, b strides, CPU result)
        let xq = quantize_1x128(&x, n, din, f);
        let wq = quantize_128x128(&w, dout, din, f);
        let mut y = vec![0f32; n * dout];
        fp8_gemm_fprop(&mut y, &xq, &wq);
        let gq = quantize_1x128(&dy, n, dout, f);
        let mut dx = vec![0f32; n * din];
        fp8_gemm_dgrad(&mut dx, &gq, &wq);
        let gt = quantize_128x1(&dy, n, dout, f);
        let xt = quantize_128x1(&x, n, din, f);
        let mut dw = vec![0f32; dout * din];
        fp8_gemm_wgrad(&mut dw, &gt, &xt);
        type Op<'a> = (&'a kernels::fp8::Fp8Tensor, [usize; 5]);
        type Case<'a> = (&'a str, [usize; 3], Op<'a>, Op<'a>, &'a Vec<f32>);
        let cases: [Case; 3] = [
            (
                "fprop",
                [n, dout, din],
                (&xq, [din, 1, 1, kin, 1]),
                (&wq, [din, 1, 1, kin, 128]),
                &y,
            ),
            (
                "dgrad",
                [n, din, dout],
                (&gq, [dout, 1, 1, kout, 1]),
                (&wq, [1, din, kin, 1, 128]),
                &dx,
            ),
            (
                "wgrad",
                [dout, din, n],
                (&gt, [1, dout, dout, 1, 1]),
                (&xt, [1, din, din, 1, 1]),
                &dw,
            ),
        ];
        for (label, [m, nn, k], (a, sa), (b, sb), want) in cases {
            let run = emu.prepare();
            run.put("a", &a.codes);
            run.put("b", &b.codes);
            run.put("sa", &a.scales);
            run.put("sb", &b.scales);
            let args: Vec<String> = [m, nn, k]
                .into_iter()
                .chain(sa)
                .chain(sb)
                .map(|v| v.to_string())
                .collect();
            let kname = format!("fp8_gemm_promoted ({label})");
            if let Err(e) = emu.exec(&run, "fp8_gemm", &args) {
                failed(r, "fp8_gemm_promoted", &s, e);
                continue;
            }
            // exact products, reordered f32 sums: measured ≤ 4e-9 normwise, judged at 1e-7
            let e = super::parity::norm_rel_error(&run.get("out"), want);
            r.check(
                &kname,
                &s,
                "out norm rel ≤ 1e-7",
                format!("{e:.2e}"),
                e <= 1e-7,
            );
        }
    }
}

/// The packing of every operand of the three FP8 GEMMs for cuBLASLt (`fp8_pack.cu`) against
/// `fp8::pack::Gather::apply`, bit for bit: codes transposed and K-padded, scales K-block-major or
/// in padded block rows. Shapes off the 16/128 boundaries.
pub fn fp8_pack_rows(emu: &Emu, r: &mut Report, seed: u64) {
    use kernels::fp8::pack::{self, Gather};
    for (n, din, dout) in [(37, 640, 144), (130, 256, 528)] {
        let plans = [
            ("fprop", pack::fprop(n, din, dout)),
            ("dgrad", pack::dgrad(n, din, dout)),
            ("wgrad", pack::wgrad(n, din, dout)),
        ];
        for (label, p) in plans {
            for (side, op) in [("A", p.a), ("B", p.b)] {
                // codes and scales are packed by one gather each; run both gathers' shapes
                for (what, g) in [("codes", op.codes), ("scales", op.scales)] {
                    let s = format!("{label} {side} {what} {}", shape(&[g.rows, g.ld]));
                    let len = g.src_extent();
                    let codes: Vec<u8> = indices(seed, "pack codes", len, 256)
                        .into_iter()
                        .map(|c| c as u8)
                        .collect();
                    let scales = normals(seed, "pack scales", len);
                    let run = emu.prepare();
                    run.put("codes", &codes);
                    run.put("scales", &scales);
                    let Gather {
                        rows,
                        cols,
                        rs,
                        cs,
                        ld,
                    } = g;
                    let args = [rows, cols, rs, cs, ld].map(|v| v.to_string());
                    if let Err(e) = emu.exec(&run, "fp8_pack", &args) {
                        failed(r, "fp8_pack", &s, e);
                        continue;
                    }
                    let got: Vec<u8> = run.get("packed_codes");
                    let want = g.apply(&codes);
                    let bad = got.len().abs_diff(want.len())
                        + got.iter().zip(&want).filter(|(a, b)| a != b).count();
                    let value = format!("{bad}/{} differ", g.len());
                    r.check("fp8_pack_codes", &s, "bits", value, bad == 0);
                    r.bits(
                        "fp8_pack_scales",
                        &s,
                        "",
                        &run.get("packed_scales"),
                        &g.apply(&scales),
                    );
                }
            }
        }
    }
}

/// The routed experts' FP8 GEMMs in one launch on the (emulated) tensor cores
/// (`fp8_grouped.cu`, its problems laid out by `fp8::grouped`): every expert's Fprop, Dgrad (added
/// to a prior dx) and Wgrad (added to a prior dW) against `fp8_gemm_fprop`, `_dgrad` and `_wgrad`
/// on that expert's rows; experts with no rows, a segment past 128 rows, K and N off the 64/128
/// boundaries. The mma's 32 products are summed in another order than the CPU's: normwise within
/// 1e-7 per expert (measured ≈ 1e-8), and an empty expert's gradient untouched. Two widths: off
/// 16 (staged code by code) and multiples of 16 (16 codes per access, along K or along rows).
pub fn fp8_grouped_rows(emu: &Emu, r: &mut Report, seed: u64) {
    // widths off 16 (every operand staged code by code) and multiples of 16 (16 codes an access)
    // (384: three K blocks of Fprop, so each shared buffer is staged twice)
    for (din, dout) in [(200, 130), (384, 144)] {
        fp8_grouped_case(emu, r, seed, din, dout);
    }
}

fn fp8_grouped_case(emu: &Emu, r: &mut Report, seed: u64, din: usize, dout: usize) {
    use kernels::fp8::grouped::{self, Bases, Problem};
    use kernels::fp8::quant::{quantize_1x128, quantize_128x1, quantize_128x128};
    use kernels::fp8::{Fp8Tensor, fp8_gemm_dgrad, fp8_gemm_fprop, fp8_gemm_wgrad};
    let f = ScaleFormat::F32;
    let offsets = [0usize, 70, 70, 201, 209];
    let experts = offsets.len() - 1;
    let rows = offsets[experts];
    let s = format!("{experts} experts, {rows} rows, {din}→{dout}");
    let x = normals(seed, "grouped x", rows * din);
    let dy = normals(seed, "grouped dy", rows * dout);
    let ws: Vec<Vec<f32>> = (0..experts)
        .map(|e| normals(seed ^ e as u64, "grouped w", dout * din))
        .collect();
    let wq: Vec<Fp8Tensor> = ws
        .iter()
        .map(|w| quantize_128x128(w, dout, din, f))
        .collect();
    let segs: Vec<(usize, usize, usize)> = (0..experts)
        .map(|e| (e, offsets[e], offsets[e + 1]))
        .collect();
    let cat = |ts: &[&Fp8Tensor]| -> (Vec<u8>, Vec<f32>, Vec<(usize, usize)>) {
        let (mut c, mut sc, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for t in ts {
            at.push((c.len(), sc.len()));
            c.extend(&t.codes);
            sc.extend(&t.scales);
        }
        (c, sc, at)
    };
    // the experts with rows' weights one after another in B, as the backend's batched quantiser
    // writes them (`grouped::in_weight_batch`)
    let live: Vec<usize> = (0..experts)
        .filter(|&e| offsets[e + 1] > offsets[e])
        .collect();
    let (wc, wsc, _) = cat(&live.iter().map(|&e| &wq[e]).collect::<Vec<_>>());
    let xq = quantize_1x128(&x, rows, din, f);
    let gq = quantize_1x128(&dy, rows, dout, f);
    let rows_of = |v: &[f32], lo: usize, hi: usize, w: usize| v[lo * w..hi * w].to_vec();
    let with_b = |p: Problem, e: usize| {
        let i = live
            .iter()
            .position(|&l| l == e)
            .expect("an expert with rows");
        grouped::in_weight_batch(p, i, din, dout)
    };
    // (label, problems, A, B, prior out, the CPU's result per expert at its place)
    type Case = (
        &'static str,
        Vec<Problem>,
        (Vec<u8>, Vec<f32>),
        (Vec<u8>, Vec<f32>),
        Vec<f32>,
        Vec<f32>,
    );
    let mut cases: Vec<Case> = Vec::new();
    {
        let mut want = normals(seed, "grouped y prior", rows * dout);
        let prior = want.clone();
        let mut ps = Vec::new();
        for &(e, lo, hi) in segs.iter().filter(|s| s.2 > s.1) {
            ps.push(with_b(grouped::fprop(lo, hi, din, dout), e));
            let mut y = vec![0f32; (hi - lo) * dout];
            fp8_gemm_fprop(
                &mut y,
                &quantize_1x128(&rows_of(&x, lo, hi, din), hi - lo, din, f),
                &wq[e],
            );
            want[lo * dout..hi * dout].copy_from_slice(&y);
        }
        let a = (xq.codes.clone(), xq.scales.clone());
        cases.push(("fprop", ps, a, (wc.clone(), wsc.clone()), prior, want));
    }
    {
        let prior = normals(seed, "grouped dx prior", rows * din);
        let mut want = prior.clone();
        let mut ps = Vec::new();
        for &(e, lo, hi) in segs.iter().filter(|s| s.2 > s.1) {
            ps.push(with_b(grouped::dgrad(lo, hi, din, dout, true), e));
            let mut dx = vec![0f32; (hi - lo) * din];
            let g = quantize_1x128(&rows_of(&dy, lo, hi, dout), hi - lo, dout, f);
            fp8_gemm_dgrad(&mut dx, &g, &wq[e]);
            for (w, v) in want[lo * din..hi * din].iter_mut().zip(&dx) {
                *w += v;
            }
        }
        cases.push((
            "dgrad",
            ps,
            (gq.codes.clone(), gq.scales.clone()),
            (wc.clone(), wsc.clone()),
            prior,
            want,
        ));
    }
    {
        // Wgrad's operands as the backend makes them: dy and x quantised 128×1 segment by
        // segment in place (`row_bands`: each segment's bands from its first row; the segmented
        // quantiser's layout, checked bit for bit on its own); dW of expert e at e·dout·din
        let (bands, first) = grouped::row_bands(&offsets);
        let nb = bands.len() / 2;
        let in_place = |v: &[f32], w: usize| -> (Vec<u8>, Vec<f32>, Vec<Fp8Tensor>) {
            let (mut c, mut sc) = (vec![0u8; rows * w], vec![0f32; nb * w]);
            let mut per = Vec::new();
            for &(e, lo, hi) in &segs {
                let q = quantize_128x1(&rows_of(v, lo, hi, w), hi - lo, w, f);
                c[lo * w..hi * w].copy_from_slice(&q.codes);
                sc[first[e] * w..first[e] * w + q.scales.len()].copy_from_slice(&q.scales);
                per.push(q);
            }
            (c, sc, per)
        };
        let (ac, asc, gt) = in_place(&dy, dout);
        let (bc, bsc, xt) = in_place(&x, din);
        let prior = normals(seed, "grouped dw prior", experts * dout * din);
        let mut want = prior.clone();
        let mut ps = Vec::new();
        for &(e, lo, hi) in segs.iter().filter(|s| s.2 > s.1) {
            let mut p = grouped::wgrad_in_place(lo, hi, first[e], din, dout);
            p.out_at = e * dout * din;
            ps.push(p);
            let mut dw = vec![0f32; dout * din];
            fp8_gemm_wgrad(&mut dw, &gt[e], &xt[e]);
            for (w, v) in want[e * dout * din..(e + 1) * dout * din]
                .iter_mut()
                .zip(&dw)
            {
                *w += v;
            }
        }
        cases.push(("wgrad", ps, (ac, asc), (bc, bsc), prior, want));
    }
    for (label, ps, (ac, asc), (bc, bsc), prior, want) in cases {
        let run = emu.prepare();
        let fields: Vec<i64> = ps.iter().flat_map(|p| p.fields(Bases::default())).collect();
        run.put("problems", &fields);
        run.put("tiles", &grouped::tiles(&ps));
        run.put("a", &ac);
        run.put("sa", &asc);
        run.put("b", &bc);
        run.put("sb", &bsc);
        run.put("out", &prior);
        let kname = format!("fp8_grouped_gemm ({label})");
        if let Err(e) = emu.exec(&run, "fp8_grouped", &[]) {
            failed(r, &kname, &s, e);
            continue;
        }
        let got: Vec<f32> = run.get("out");
        // each expert's output region on its own (and an empty expert's left as it was)
        let width = if label == "wgrad" { dout * din } else { 0 };
        let regions: Vec<(usize, usize)> = (0..experts)
            .map(|e| match label {
                "fprop" => (offsets[e] * dout, offsets[e + 1] * dout),
                "dgrad" => (offsets[e] * din, offsets[e + 1] * din),
                _ => (e * width, (e + 1) * width),
            })
            .collect();
        let mut worst = 0f64;
        for (lo, hi) in regions {
            if hi > lo {
                worst = worst.max(super::parity::norm_rel_error(&got[lo..hi], &want[lo..hi]));
            }
        }
        r.check(
            &kname,
            &s,
            "per expert norm rel ≤ 1e-7",
            format!("{worst:.2e}"),
            worst <= 1e-7,
        );
        if label == "wgrad" {
            let untouched = got[dout * din..2 * dout * din] == prior[dout * din..2 * dout * din];
            r.check(
                &kname,
                &s,
                "empty expert's dW",
                format!("untouched: {untouched}"),
                untouched,
            );
        }
    }
}

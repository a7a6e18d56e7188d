//! The FP8 kernels emulated against `kernels::fp8`: the three E4M3 quantisers and the
//! dequantiser (`fp8_quant.cu`, with the stand-in `include/cuda_fp8.h` for the conversion) on
//! adversarial inputs, codes and scales bit for bit (a NaN matches any NaN); the promoted FP8 GEMM
//! (`fp8_gemm.cu`) in the three orientations; and the packing of cuBLASLt's operands
//! (`fp8_pack.cu`).

use super::parity::{
    Report, adversarial, code_mismatches, f32_mismatches, indices, normals, shape,
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

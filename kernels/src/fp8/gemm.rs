//! FP8 GEMMs on CPU in the three orientations of a Linear (Fprop, Dgrad, Wgrad), with FP32
//! accumulation promoted per 128-wide K block as DeepSeek-V3 does on CUDA cores.
//!
//! For each K block: partial = A_blk·B_blk computed by `crate::matmul` in f32 on the decoded
//! codes (exact FP8 values, unscaled), then acc += partial · a_scale · b_scale, with the scales of
//! that K block (per row / column of the activation side, per block or column of the other).
//! Shapes follow a Linear y = x·Wᵀ with x `[n, d_in]`, W `[d_out, d_in]`. The second operand is
//! decoded once (an f32 copy of its codes); the output is computed 128 rows at a time in parallel.

use rayon::prelude::*;

use super::format::decode_e4m3_arith;
use super::quant::{
    Fp8Tensor, ScaleFormat, ScaleLayout, TILE, quantize_1x128, quantize_128x1, quantize_128x128,
};
use crate::matmul;

/// Output rows computed together: a chunk's partial product and accumulator stay in cache across
/// the K blocks, and chunks run in parallel. Every output element's arithmetic is the same
/// whatever the thread count.
const ROWS: usize = 128;

simd_fn!(fn decode_sub(codes: &[u8], cols: usize, r0: usize, r1: usize, c0: usize, c1: usize, dst: &mut [f32]) => decode_sub_body);

/// dst `[r1−r0, c1−c0]` = the decoded (unscaled) sub-matrix rows r0..r1, columns c0..c1 of a
/// row-major code matrix with `cols` columns.
#[inline(always)]
fn decode_sub_body(
    codes: &[u8],
    cols: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
    dst: &mut [f32],
) {
    let w = c1 - c0;
    for (r, d) in (r0..r1).zip(dst.chunks_exact_mut(w)) {
        for (v, &c) in d.iter_mut().zip(&codes[r * cols + c0..r * cols + c1]) {
            *v = decode_e4m3_arith(c);
        }
    }
}

simd_fn!(fn promote(out: &mut [f32], part: &[f32], sa: &[f32], sb: &[f32]) => promote_body);

/// The promotion step: out[i, j] += part[i, j] · sa[i] · sb[j] for out, part `[sa.len(), sb.len()]`.
#[inline(always)]
fn promote_body(out: &mut [f32], part: &[f32], sa: &[f32], sb: &[f32]) {
    let n = sb.len();
    for ((or, pr), &a) in out.chunks_exact_mut(n).zip(part.chunks_exact(n)).zip(sa) {
        for ((v, &p), &b) in or.iter_mut().zip(pr).zip(sb) {
            *v += p * a * b;
        }
    }
}

/// The loop shared by the three orientations:
/// out `[m, n]` = Σ_kb (A_kb · B_kb)[i, j] · sa[kb·m + i] · sb[kb·n + j].
/// A's codes are `[m, k]` row-major, or `[k, m]` when `a_trans`; B_kb = `b_dec[kb]` is decoded
/// already, `[n, kw]` when `b_trans` else `[kw, n]`.
#[allow(clippy::too_many_arguments)]
fn promoted_gemm(
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    a_codes: &[u8],
    a_trans: bool,
    b_dec: &[Vec<f32>],
    b_trans: bool,
    sa: &[f32],
    sb: &[f32],
) {
    out.fill(0.0);
    if m == 0 || n == 0 {
        return;
    }
    // blocks of rows that start where `matmul`'s split would: the whole product's bits
    let rows = matmul::row_block(ROWS);
    out.par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(chunk, out_c)| {
            let (i0, mc) = (chunk * rows, out_c.len() / n);
            let mut a = vec![0f32; mc * TILE.min(k)];
            let mut part = vec![0f32; mc * n];
            for (kb, b) in b_dec.iter().enumerate() {
                let (k0, k1) = (kb * TILE, ((kb + 1) * TILE).min(k));
                let kw = k1 - k0;
                let a = &mut a[..mc * kw];
                if a_trans {
                    decode_sub(a_codes, m, k0, k1, i0, i0 + mc, a);
                } else {
                    decode_sub(a_codes, k, i0, i0 + mc, k0, k1, a);
                }
                matmul(&mut part, a, b, mc, kw, n, a_trans, b_trans, false);
                promote(
                    out_c,
                    &part,
                    &sa[kb * m + i0..kb * m + i0 + mc],
                    &sb[kb * n..(kb + 1) * n],
                );
            }
        });
}

/// The K blocks of a code matrix decoded (unscaled): `[n, kw]` slices of columns of a `[n, k]`
/// matrix when `by_cols`, else `[kw, n]` slices of rows of a `[k, n]` matrix.
fn decode_k_blocks(codes: &[u8], k: usize, n: usize, by_cols: bool) -> Vec<Vec<f32>> {
    (0..k.div_ceil(TILE))
        .into_par_iter()
        .map(|kb| {
            let (k0, k1) = (kb * TILE, ((kb + 1) * TILE).min(k));
            let mut dst = vec![0f32; (k1 - k0) * n];
            if by_cols {
                decode_sub(codes, k, 0, n, k0, k1, &mut dst);
            } else {
                decode_sub(codes, n, k0, k1, 0, n, &mut dst);
            }
            dst
        })
        .collect()
}

/// A `[rows, kbs]` scale grid (1×128 tiles along K) turned K-block-major: `[kbs, rows]`.
fn scales_by_k_block(scales: &[f32], rows: usize, kbs: usize) -> Vec<f32> {
    (0..kbs)
        .flat_map(|kb| (0..rows).map(move |i| scales[i * kbs + kb]))
        .collect()
}

fn check(t: &Fp8Tensor, layout: ScaleLayout, what: &str) {
    assert_eq!(
        t.layout, layout,
        "{what} must be quantised in {layout:?}, got {:?}",
        t.layout
    );
    let (r, c) = (t.rows, t.cols);
    assert_eq!(
        t.codes.len(),
        r * c,
        "{what}: {} codes for {r}x{c}",
        t.codes.len()
    );
    let ns = layout.num_scales(r, c);
    assert_eq!(
        t.scales.len(),
        ns,
        "{what}: {} scales, want {ns}",
        t.scales.len()
    );
}

/// Fprop: y `[n, d_out]` = x `[n, d_in]` · Wᵀ with x in 1×128 tiles and W `[d_out, d_in]` in
/// 128×128 blocks; K = d_in.
pub fn fp8_gemm_fprop(y: &mut [f32], x: &Fp8Tensor, w: &Fp8Tensor) {
    check(x, ScaleLayout::Tile1x128, "fprop x");
    check(w, ScaleLayout::Block128x128, "fprop W");
    assert_eq!(
        x.cols, w.cols,
        "fprop: x has {} columns, W has {}",
        x.cols, w.cols
    );
    let (m, k, n) = (x.rows, x.cols, w.rows);
    assert_eq!(
        y.len(),
        m * n,
        "fprop: y has {} values, want {m}x{n}",
        y.len()
    );
    let kbs = k.div_ceil(TILE);
    let sa = scales_by_k_block(&x.scales, m, kbs);
    // W's [⌈n/128⌉, kbs] block scales, spread to one per output column per K block.
    let sb: Vec<f32> = (0..kbs * n)
        .map(|q| w.scales[(q % n / TILE) * kbs + q / n])
        .collect();
    let b = decode_k_blocks(&w.codes, k, n, true);
    promoted_gemm(y, m, k, n, &x.codes, false, &b, true, &sa, &sb);
}

/// Dgrad: dx `[n, d_in]` = dy `[n, d_out]` · W with dy in 1×128 tiles and W `[d_out, d_in]` in
/// 128×128 blocks; K = d_out.
pub fn fp8_gemm_dgrad(dx: &mut [f32], dy: &Fp8Tensor, w: &Fp8Tensor) {
    check(dy, ScaleLayout::Tile1x128, "dgrad dy");
    check(w, ScaleLayout::Block128x128, "dgrad W");
    assert_eq!(
        dy.cols, w.rows,
        "dgrad: dy has {} columns, W has {} rows",
        dy.cols, w.rows
    );
    let (m, k, n) = (dy.rows, dy.cols, w.cols);
    assert_eq!(
        dx.len(),
        m * n,
        "dgrad: dx has {} values, want {m}x{n}",
        dx.len()
    );
    let (kbs, nbs) = (k.div_ceil(TILE), n.div_ceil(TILE));
    let sa = scales_by_k_block(&dy.scales, m, kbs);
    // W's [kbs, ⌈n/128⌉] block scales, spread to one per output column per K block.
    let sb: Vec<f32> = (0..kbs * n)
        .map(|q| w.scales[q / n * nbs + q % n / TILE])
        .collect();
    let b = decode_k_blocks(&w.codes, k, n, false);
    promoted_gemm(dx, m, k, n, &dy.codes, false, &b, false, &sa, &sb);
}

/// Wgrad: dW `[d_out, d_in]` = dyᵀ · x with dy `[n, d_out]` and x `[n, d_in]` both in 128×1 tiles
/// (per channel per 128 tokens); K = n (tokens).
pub fn fp8_gemm_wgrad(dw: &mut [f32], dy: &Fp8Tensor, x: &Fp8Tensor) {
    check(dy, ScaleLayout::Tile128x1, "wgrad dy");
    check(x, ScaleLayout::Tile128x1, "wgrad x");
    assert_eq!(
        dy.rows, x.rows,
        "wgrad: dy has {} rows (tokens), x has {}",
        dy.rows, x.rows
    );
    let (m, k, n) = (dy.cols, dy.rows, x.cols);
    assert_eq!(
        dw.len(),
        m * n,
        "wgrad: dW has {} values, want {m}x{n}",
        dw.len()
    );
    // 128×1 scale grids are K-block-major already: [⌈k/128⌉, m] and [⌈k/128⌉, n].
    let b = decode_k_blocks(&x.codes, k, n, false);
    promoted_gemm(
        dw, m, k, n, &dy.codes, true, &b, false, &dy.scales, &x.scales,
    );
}

/// y `[n, d_out]` = x `[n, d_in]` · Wᵀ through FP8: x in 1×128 tiles, W in 128×128 blocks.
pub fn linear_fprop_fp8(x: &[f32], w: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let xq = quantize_1x128(x, n, d_in, ScaleFormat::F32);
    let wq = quantize_128x128(w, d_out, d_in, ScaleFormat::F32);
    let mut y = vec![0f32; n * d_out];
    fp8_gemm_fprop(&mut y, &xq, &wq);
    y
}

/// dx `[n, d_in]` = dy `[n, d_out]` · W through FP8: dy in 1×128 tiles, W in 128×128 blocks.
pub fn linear_dgrad_fp8(dy: &[f32], w: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let dyq = quantize_1x128(dy, n, d_out, ScaleFormat::F32);
    let wq = quantize_128x128(w, d_out, d_in, ScaleFormat::F32);
    let mut dx = vec![0f32; n * d_in];
    fp8_gemm_dgrad(&mut dx, &dyq, &wq);
    dx
}

/// dW `[d_out, d_in]` = dyᵀ · x through FP8: dy `[n, d_out]` and x `[n, d_in]` in 128×1 tiles.
pub fn linear_wgrad_fp8(dy: &[f32], x: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let dyq = quantize_128x1(dy, n, d_out, ScaleFormat::F32);
    let xq = quantize_128x1(x, n, d_in, ScaleFormat::F32);
    let mut dw = vec![0f32; d_out * d_in];
    fp8_gemm_wgrad(&mut dw, &dyq, &xq);
    dw
}

/// BF16 output: the FP32 accumulator rounded once (nearest-even), as a GPU epilogue does.
pub fn to_bf16(y: &[f32]) -> Vec<half::bf16> {
    y.iter().map(|&v| half::bf16::from_f32(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::quant::{dequantize, quantize};
    use crate::rng::Rng;

    fn randn(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..len).map(|_| rng.normal()).collect()
    }

    /// DeepGEMM's similarity measure: 1 − 2·Σxy / Σ(x² + y²), in f64.
    fn calc_diff(x: &[f32], y: &[f32]) -> f64 {
        let (mut xy, mut sq) = (0f64, 0f64);
        for (&a, &b) in x.iter().zip(y) {
            let (a, b) = (a as f64, b as f64);
            xy += a * b;
            sq += a * a + b * b;
        }
        1.0 - 2.0 * xy / sq
    }

    const N: usize = 256;
    const D_IN: usize = 512;
    const D_OUT: usize = 384;

    #[test]
    fn fprop_close_to_f32() {
        let (x, w) = (randn(N * D_IN, 1), randn(D_OUT * D_IN, 2));
        let y = linear_fprop_fp8(&x, &w, N, D_IN, D_OUT);
        let mut want = vec![0f32; N * D_OUT];
        matmul(&mut want, &x, &w, N, D_IN, D_OUT, false, true, false);
        let d = calc_diff(&y, &want);
        assert!(d < 1e-3, "fprop calc_diff {d}");
    }

    #[test]
    fn dgrad_close_to_f32() {
        let (dy, w) = (randn(N * D_OUT, 3), randn(D_OUT * D_IN, 4));
        let dx = linear_dgrad_fp8(&dy, &w, N, D_IN, D_OUT);
        let mut want = vec![0f32; N * D_IN];
        matmul(&mut want, &dy, &w, N, D_OUT, D_IN, false, false, false);
        let d = calc_diff(&dx, &want);
        assert!(d < 1e-3, "dgrad calc_diff {d}");
    }

    #[test]
    fn wgrad_close_to_f32() {
        let (dy, x) = (randn(N * D_OUT, 5), randn(N * D_IN, 6));
        let dw = linear_wgrad_fp8(&dy, &x, N, D_IN, D_OUT);
        let mut want = vec![0f32; D_OUT * D_IN];
        matmul(&mut want, &dy, &x, D_OUT, N, D_IN, true, false, false);
        let d = calc_diff(&dw, &want);
        assert!(d < 1e-3, "wgrad calc_diff {d}");
    }

    /// The independent reference: dequantise each K block of both operands (codes · scale),
    /// f32 GEMM per K block, accumulate the blocks in order. `a` is `[m, k]` (or `[k, m]` when
    /// `ta`), `b` is `[n, k]` when `tb` else `[k, n]`; all dequantised already.
    #[allow(clippy::too_many_arguments)]
    fn blockwise_reference(
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Vec<f32> {
        let mut acc = vec![0f32; m * n];
        let mut part = vec![0f32; m * n];
        for k0 in (0..k).step_by(TILE) {
            let kw = TILE.min(k - k0);
            let ab: Vec<f32> = if ta {
                a[k0 * m..(k0 + kw) * m].to_vec()
            } else {
                (0..m)
                    .flat_map(|i| a[i * k + k0..i * k + k0 + kw].to_vec())
                    .collect()
            };
            let bb: Vec<f32> = if tb {
                (0..n)
                    .flat_map(|j| b[j * k + k0..j * k + k0 + kw].to_vec())
                    .collect()
            } else {
                b[k0 * n..(k0 + kw) * n].to_vec()
            };
            matmul(&mut part, &ab, &bb, m, kw, n, ta, tb, false);
            for (v, &p) in acc.iter_mut().zip(&part) {
                *v += p;
            }
        }
        acc
    }

    /// With power-of-two (UE8M0) scales, scaling commutes with every f32 rounding, so promoting
    /// per K block with scales applied after the block GEMM equals dequantise-then-GEMM per block
    /// bit for bit. Ragged shapes exercise the padded edges.
    #[test]
    fn equals_blockwise_dequantised_reference_bit_for_bit() {
        let (n, d_in, d_out) = (200, 300, 260);
        let x = randn(n * d_in, 7);
        let w = randn(d_out * d_in, 8);
        let dy = randn(n * d_out, 9);
        let pow2 = ScaleFormat::Ue8m0;

        let xq = quantize(&x, n, d_in, ScaleLayout::Tile1x128, pow2);
        let wq = quantize(&w, d_out, d_in, ScaleLayout::Block128x128, pow2);
        let mut y = vec![0f32; n * d_out];
        fp8_gemm_fprop(&mut y, &xq, &wq);
        let want = blockwise_reference(
            &dequantize(&xq),
            &dequantize(&wq),
            n,
            d_in,
            d_out,
            false,
            true,
        );
        assert!(
            y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "fprop"
        );

        let dyq = quantize(&dy, n, d_out, ScaleLayout::Tile1x128, pow2);
        let mut dx = vec![0f32; n * d_in];
        fp8_gemm_dgrad(&mut dx, &dyq, &wq);
        let want = blockwise_reference(
            &dequantize(&dyq),
            &dequantize(&wq),
            n,
            d_out,
            d_in,
            false,
            false,
        );
        assert!(
            dx.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "dgrad"
        );

        let dyq = quantize(&dy, n, d_out, ScaleLayout::Tile128x1, pow2);
        let xq = quantize(&x, n, d_in, ScaleLayout::Tile128x1, pow2);
        let mut dw = vec![0f32; d_out * d_in];
        fp8_gemm_wgrad(&mut dw, &dyq, &xq);
        let want = blockwise_reference(
            &dequantize(&dyq),
            &dequantize(&xq),
            d_out,
            n,
            d_in,
            true,
            false,
        );
        assert!(
            dw.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "wgrad"
        );
    }

    /// With FP32 scales the two orders differ only by f32 rounding.
    #[test]
    fn f32_scales_agree_with_reference_to_rounding() {
        let (n, d_in, d_out) = (130, 260, 140);
        let (x, w) = (randn(n * d_in, 10), randn(d_out * d_in, 11));
        let xq = quantize(&x, n, d_in, ScaleLayout::Tile1x128, ScaleFormat::F32);
        let wq = quantize(&w, d_out, d_in, ScaleLayout::Block128x128, ScaleFormat::F32);
        let mut y = vec![0f32; n * d_out];
        fp8_gemm_fprop(&mut y, &xq, &wq);
        let want = blockwise_reference(
            &dequantize(&xq),
            &dequantize(&wq),
            n,
            d_in,
            d_out,
            false,
            true,
        );
        let d = calc_diff(&y, &want);
        assert!(d < 1e-12, "calc_diff {d}");
    }

    #[test]
    fn bf16_output_rounds_the_accumulator_once() {
        let y = [
            1.0f32,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -3.0e-3,
        ];
        let b = to_bf16(&y);
        assert_eq!(b[0].to_f32(), 1.0);
        assert_eq!(b[1].to_f32(), 1.0); // tie → even
        assert_eq!(b[2].to_f32(), 1.015625); // tie → even (up)
        assert_eq!(b[3], half::bf16::from_f32(-3.0e-3));
    }
}

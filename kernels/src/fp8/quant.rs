//! Fine-grained E4M3 quantisation: 1×128 tiles (activations), 128×1 tiles (Wgrad operands) and
//! 128×128 blocks (weights), one FP32 or power-of-two (UE8M0) scale each; dequantise multiplies.
//!
//! Recipe (DeepSeek-V3 §3.3.2, DS `act_quant`, DG `per_token_cast_to_fp8`): amax = max|x| over
//! the group, clamped to ≥ 1e-4; scale = amax/448 (or 2^⌈log₂(amax/448)⌉); code =
//! E4M3(x · (1/scale)), saturating; value = decode(code) · scale. Edge groups of shapes that are
//! not multiples of 128 behave as if zero-padded: the padding never raises amax and is not stored.
//! A NaN in a group gives that group's amax NaN bits, hence NaN codes for the whole group.

use super::format::{E4M3_MAX, decode_e4m3_arith, encode_e4m3, encode_e4m3_scaled};

/// Width of a tile and side of a block.
pub const TILE: usize = 128;

/// amax is clamped to at least this before the scale is taken (so all-zero groups are fine).
pub const AMAX_MIN: f32 = 1e-4;

/// Which elements share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleLayout {
    /// 1 row × 128 columns: per token per 128 channels. Scales `[rows, ⌈cols/128⌉]`.
    Tile1x128,
    /// 128 rows × 1 column: per channel per 128 tokens. Scales `[⌈rows/128⌉, cols]`.
    Tile128x1,
    /// 128 × 128 block. Scales `[⌈rows/128⌉, ⌈cols/128⌉]`.
    Block128x128,
}

impl ScaleLayout {
    /// Rows and columns of one scale group.
    pub fn group_shape(self) -> (usize, usize) {
        match self {
            ScaleLayout::Tile1x128 => (1, TILE),
            ScaleLayout::Tile128x1 => (TILE, 1),
            ScaleLayout::Block128x128 => (TILE, TILE),
        }
    }

    /// Shape `[rows, cols]` of the row-major scale grid of a `rows × cols` tensor.
    pub fn scale_shape(self, rows: usize, cols: usize) -> (usize, usize) {
        let (gr, gc) = self.group_shape();
        (rows.div_ceil(gr), cols.div_ceil(gc))
    }

    /// Number of scales of a `rows × cols` tensor.
    pub fn num_scales(self, rows: usize, cols: usize) -> usize {
        let (sr, sc) = self.scale_shape(rows, cols);
        sr * sc
    }
}

/// How a scale is chosen from its group's amax.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleFormat {
    /// scale = amax/448 in FP32: the largest element maps exactly onto ±448.
    #[default]
    F32,
    /// scale = 2^⌈log₂(amax/448)⌉ (UE8M0, `scale_fmt="ue8m0"`): scaling is exact in binary.
    Ue8m0,
}

/// A row-major `rows × cols` matrix of E4M3 codes with its scale grid (see `ScaleLayout`).
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Tensor {
    pub rows: usize,
    pub cols: usize,
    /// E4M3 codes, `rows · cols`, row-major.
    pub codes: Vec<u8>,
    /// Dequantisation multipliers, row-major over `layout.scale_shape(rows, cols)`.
    pub scales: Vec<f32>,
    pub layout: ScaleLayout,
}

impl Fp8Tensor {
    /// The scale that multiplies element (r, c).
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        let (gr, gc) = self.layout.group_shape();
        let (_, sc) = self.layout.scale_shape(self.rows, self.cols);
        self.scales[(r / gr) * sc + c / gc]
    }

    /// Dequantise and quantise again with another layout, as DeepSeek-V3 turns stored 1×128
    /// activations into the 128×1 tiles Wgrad needs (§3.5.2).
    pub fn requantize(&self, layout: ScaleLayout, fmt: ScaleFormat) -> Fp8Tensor {
        quantize(&dequantize(self), self.rows, self.cols, layout, fmt)
    }
}

/// The scale of a group whose largest magnitude is `amax`.
pub fn scale_from_amax(amax: f32, fmt: ScaleFormat) -> f32 {
    // a NaN amax stays NaN (as torch's clamp keeps it): `f32::max` would drop it and saturate
    // the whole group instead
    let a = if amax.is_nan() {
        amax
    } else {
        amax.max(AMAX_MIN)
    };
    let s = a / E4M3_MAX;
    match fmt {
        ScaleFormat::F32 => s,
        ScaleFormat::Ue8m0 => pow2_ceil(s),
    }
}

/// Smallest power of two ≥ x, for positive normal x (exact: reads the bits, no log).
fn pow2_ceil(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x007F_FFFF == 0 || !x.is_finite() {
        x
    } else {
        f32::from_bits((bits & 0x7F80_0000) + 0x0080_0000)
    }
}

/// max |x| by comparing the magnitude bits as integers (same order as the floats, vectorises).
#[inline(always)]
fn amax(x: &[f32]) -> f32 {
    let mut m = 0u32;
    for &v in x {
        m = m.max(v.to_bits() & 0x7FFF_FFFF);
    }
    f32::from_bits(m)
}

/// Quantise `x [rows, cols]` with the given layout.
pub fn quantize(
    x: &[f32],
    rows: usize,
    cols: usize,
    layout: ScaleLayout,
    fmt: ScaleFormat,
) -> Fp8Tensor {
    match layout {
        ScaleLayout::Tile1x128 => quantize_1x128(x, rows, cols, fmt),
        ScaleLayout::Tile128x1 => quantize_128x1(x, rows, cols, fmt),
        ScaleLayout::Block128x128 => quantize_128x128(x, rows, cols, fmt),
    }
}

fn check_shape(x: &[f32], rows: usize, cols: usize, op: &str) {
    assert_eq!(
        x.len(),
        rows * cols,
        "{op}: x has {} values, want {rows}x{cols}",
        x.len()
    );
}

fn empty(rows: usize, cols: usize, layout: ScaleLayout) -> Fp8Tensor {
    Fp8Tensor {
        rows,
        cols,
        codes: vec![0; rows * cols],
        scales: vec![0.0; layout.num_scales(rows, cols)],
        layout,
    }
}

/// Activations: one scale per row per 128 columns.
pub fn quantize_1x128(x: &[f32], rows: usize, cols: usize, fmt: ScaleFormat) -> Fp8Tensor {
    let mut t = empty(rows, cols, ScaleLayout::Tile1x128);
    quantize_1x128_into(x, rows, cols, fmt, &mut t.codes, &mut t.scales);
    t
}

/// `quantize_1x128` into caller-owned buffers: codes `[rows, cols]`, scales `[rows, ⌈cols/128⌉]`.
pub fn quantize_1x128_into(
    x: &[f32],
    rows: usize,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) {
    check_shape(x, rows, cols, "quantize_1x128");
    assert_eq!(
        codes.len(),
        rows * cols,
        "quantize_1x128: {} codes for {rows}x{cols}",
        codes.len()
    );
    let ns = ScaleLayout::Tile1x128.num_scales(rows, cols);
    assert_eq!(
        scales.len(),
        ns,
        "quantize_1x128: {} scales, want {ns}",
        scales.len()
    );
    quantize_1x128_kernel(x, rows, cols, fmt, codes, scales);
}

simd_fn!(fn quantize_1x128_kernel(x: &[f32], rows: usize, cols: usize, fmt: ScaleFormat, codes: &mut [u8], scales: &mut [f32]) => quantize_1x128_body);

#[inline(always)]
fn quantize_1x128_body(
    x: &[f32],
    rows: usize,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) {
    let tiles = cols.div_ceil(TILE);
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let cr = &mut codes[r * cols..(r + 1) * cols];
        let sr = &mut scales[r * tiles..(r + 1) * tiles];
        for ((xt, ct), s) in xr.chunks(TILE).zip(cr.chunks_mut(TILE)).zip(sr.iter_mut()) {
            *s = scale_from_amax(amax(xt), fmt);
            encode_e4m3_scaled(xt, 1.0 / *s, ct);
        }
    }
}

/// Wgrad operands: one scale per column per 128 rows (tokens).
pub fn quantize_128x1(x: &[f32], rows: usize, cols: usize, fmt: ScaleFormat) -> Fp8Tensor {
    check_shape(x, rows, cols, "quantize_128x1");
    let mut t = empty(rows, cols, ScaleLayout::Tile128x1);
    quantize_128x1_kernel(x, rows, cols, fmt, &mut t.codes, &mut t.scales);
    t
}

simd_fn!(fn quantize_128x1_kernel(x: &[f32], rows: usize, cols: usize, fmt: ScaleFormat, codes: &mut [u8], scales: &mut [f32]) => quantize_128x1_body);

/// Column amax over each 128-row band, then each row encoded with its columns' inverses.
#[inline(always)]
fn quantize_128x1_body(
    x: &[f32],
    rows: usize,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) {
    let mut col_amax = vec![0u32; cols];
    let mut col_inv = vec![0f32; cols];
    for rb in 0..rows.div_ceil(TILE) {
        let (r0, r1) = (rb * TILE, ((rb + 1) * TILE).min(rows));
        col_amax.fill(0);
        for r in r0..r1 {
            for (m, &v) in col_amax.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                *m = (*m).max(v.to_bits() & 0x7FFF_FFFF);
            }
        }
        let srow = &mut scales[rb * cols..(rb + 1) * cols];
        for ((s, inv), &m) in srow.iter_mut().zip(col_inv.iter_mut()).zip(&col_amax) {
            *s = scale_from_amax(f32::from_bits(m), fmt);
            *inv = 1.0 / *s;
        }
        for r in r0..r1 {
            let (xr, cr) = (
                &x[r * cols..(r + 1) * cols],
                &mut codes[r * cols..(r + 1) * cols],
            );
            for ((c, &v), &inv) in cr.iter_mut().zip(xr).zip(&col_inv) {
                *c = encode_e4m3(v * inv, true);
            }
        }
    }
}

/// Weights: one scale per 128×128 block.
pub fn quantize_128x128(x: &[f32], rows: usize, cols: usize, fmt: ScaleFormat) -> Fp8Tensor {
    check_shape(x, rows, cols, "quantize_128x128");
    let mut t = empty(rows, cols, ScaleLayout::Block128x128);
    quantize_128x128_kernel(x, rows, cols, fmt, &mut t.codes, &mut t.scales);
    t
}

simd_fn!(fn quantize_128x128_kernel(x: &[f32], rows: usize, cols: usize, fmt: ScaleFormat, codes: &mut [u8], scales: &mut [f32]) => quantize_128x128_body);

/// Block amax over each 128-row band's column blocks, then rows encoded tile by tile.
#[inline(always)]
fn quantize_128x128_body(
    x: &[f32],
    rows: usize,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) {
    let nb = cols.div_ceil(TILE);
    let mut blk_amax = vec![0f32; nb];
    let mut blk_inv = vec![0f32; nb];
    for rb in 0..rows.div_ceil(TILE) {
        let (r0, r1) = (rb * TILE, ((rb + 1) * TILE).min(rows));
        blk_amax.fill(0.0);
        for r in r0..r1 {
            for (m, xt) in blk_amax
                .iter_mut()
                .zip(x[r * cols..(r + 1) * cols].chunks(TILE))
            {
                let a = amax(xt);
                if a.to_bits() > m.to_bits() {
                    *m = a;
                }
            }
        }
        let srow = &mut scales[rb * nb..(rb + 1) * nb];
        for ((s, inv), &m) in srow.iter_mut().zip(blk_inv.iter_mut()).zip(&blk_amax) {
            *s = scale_from_amax(m, fmt);
            *inv = 1.0 / *s;
        }
        for r in r0..r1 {
            let (xr, cr) = (
                &x[r * cols..(r + 1) * cols],
                &mut codes[r * cols..(r + 1) * cols],
            );
            for ((xt, ct), &inv) in xr.chunks(TILE).zip(cr.chunks_mut(TILE)).zip(&blk_inv) {
                encode_e4m3_scaled(xt, inv, ct);
            }
        }
    }
}

/// The f32 values a tensor stands for: decode(code) · scale, row-major `[rows, cols]`.
pub fn dequantize(t: &Fp8Tensor) -> Vec<f32> {
    let mut y = vec![0f32; t.rows * t.cols];
    dequantize_kernel(t, &mut y);
    y
}

simd_fn!(fn dequantize_kernel(t: &Fp8Tensor, y: &mut [f32]) => dequantize_body);

#[inline(always)]
fn dequantize_body(t: &Fp8Tensor, y: &mut [f32]) {
    let (rows, cols) = (t.rows, t.cols);
    let (_, sc) = t.layout.scale_shape(rows, cols);
    for r in 0..rows {
        let yr = &mut y[r * cols..(r + 1) * cols];
        let cr = &t.codes[r * cols..(r + 1) * cols];
        match t.layout {
            ScaleLayout::Tile1x128 | ScaleLayout::Block128x128 => {
                let srow = if t.layout == ScaleLayout::Tile1x128 {
                    r
                } else {
                    r / TILE
                };
                let scales = &t.scales[srow * sc..(srow + 1) * sc];
                for ((yt, ct), &s) in yr.chunks_mut(TILE).zip(cr.chunks(TILE)).zip(scales) {
                    for (v, &c) in yt.iter_mut().zip(ct) {
                        *v = decode_e4m3_arith(c) * s;
                    }
                }
            }
            ScaleLayout::Tile128x1 => {
                let scales = &t.scales[(r / TILE) * cols..(r / TILE + 1) * cols];
                for ((v, &c), &s) in yr.iter_mut().zip(cr).zip(scales) {
                    *v = decode_e4m3_arith(c) * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::format::{decode_e4m3, encode_e4m3};
    use crate::rng::Rng;

    /// Reference §9.5: a tile holding {896, 300, −1, 0.1, 0, −450} has scale 2.0.
    #[test]
    fn reference_tile_example() {
        let mut x = vec![0f32; 128];
        x[..6].copy_from_slice(&[896.0, 300.0, -1.0, 0.1, 0.0, -450.0]);
        let t = quantize_1x128(&x, 1, 128, ScaleFormat::F32);
        assert_eq!(t.scales, vec![2.0]);
        let fp8: Vec<f32> = t.codes[..6].iter().map(|&c| decode_e4m3(c)).collect();
        assert_eq!(fp8, vec![448.0, 144.0, -0.5, 0.05078125, 0.0, -224.0]);
        let y = dequantize(&t);
        assert_eq!(&y[..6], &[896.0, 288.0, -1.0, 0.1015625, 0.0, -448.0]);
        assert!(y[6..].iter().all(|&v| v == 0.0));
    }

    /// A NaN poisons its own group only: that group's scale and codes are NaN (so the loss
    /// turns NaN and the monitor rejects the step), the next tile is untouched. Before, the NaN
    /// amax was dropped by the clamp and the group's finite values saturated to ±1e-4.
    #[test]
    fn a_nan_gives_its_group_nan_codes_and_leaves_the_others() {
        let mut x = vec![1.0f32; 256];
        x[5] = f32::NAN;
        for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let t = quantize_1x128(&x, 1, 256, fmt);
            assert!(t.scales[0].is_nan(), "{fmt:?}: {}", t.scales[0]);
            assert!(t.codes[..128].iter().all(|&c| c & 0x7F == 0x7F), "{fmt:?}");
            assert!(dequantize(&t)[..128].iter().all(|v| v.is_nan()));
            assert_eq!(dequantize(&t)[128..], vec![1.0f32; 128][..], "{fmt:?}");
            let b = quantize_128x128(&x, 1, 256, fmt);
            assert!(b.scales[0].is_nan() && !b.scales[1].is_nan(), "{fmt:?}");
        }
    }

    /// Reference §9.5: UE8M0 scales 2^⌈log₂(amax/448)⌉.
    #[test]
    fn ue8m0_scale_examples() {
        assert_eq!(scale_from_amax(500.0, ScaleFormat::Ue8m0), 2.0);
        assert_eq!(scale_from_amax(448.0, ScaleFormat::Ue8m0), 1.0);
        assert_eq!(scale_from_amax(1.0, ScaleFormat::Ue8m0), 2f32.powi(-8));
        assert_eq!(scale_from_amax(896.0, ScaleFormat::Ue8m0), 2.0);
        assert_eq!(scale_from_amax(0.0, ScaleFormat::Ue8m0), 2f32.powi(-22)); // 1e-4/448 ≈ 2.2e-7
        assert_eq!(scale_from_amax(0.0, ScaleFormat::F32), 1e-4 / 448.0);
        let mut x = vec![0f32; 300];
        x[5] = 500.0;
        x[290] = -1.0;
        let t = quantize_1x128(&x, 1, 300, ScaleFormat::Ue8m0);
        assert_eq!(t.scales, vec![2.0, 2f32.powi(-22), 2f32.powi(-8)]); // middle tile all zero
        assert_eq!(dequantize(&t)[290], -1.0);
        assert_eq!(decode_e4m3(t.codes[5]), 256.0); // 250 rounds to 256
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        // Rows of very different magnitudes, so per-group scales matter.
        (0..rows * cols)
            .map(|i| rng.normal() * 10f32.powi((i / cols % 7) as i32 - 3))
            .collect()
    }

    /// Each layout against a plain per-element formula using `scale_at` and the scalar encoder,
    /// on shapes with ragged edges.
    #[test]
    fn layouts_match_per_element_formula() {
        for &(rows, cols) in &[(1, 1), (3, 130), (129, 257), (256, 128), (200, 77)] {
            let x = random(rows, cols, 7);
            for layout in [
                ScaleLayout::Tile1x128,
                ScaleLayout::Tile128x1,
                ScaleLayout::Block128x128,
            ] {
                for fmt in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
                    let t = quantize(&x, rows, cols, layout, fmt);
                    assert_eq!(t.scales.len(), layout.num_scales(rows, cols));
                    let (gr, gc) = layout.group_shape();
                    let y = dequantize(&t);
                    for r in 0..rows {
                        for c in 0..cols {
                            // amax over the group, computed independently.
                            let (r0, c0) = (r / gr * gr, c / gc * gc);
                            let mut m = 0f32;
                            for rr in r0..(r0 + gr).min(rows) {
                                for cc in c0..(c0 + gc).min(cols) {
                                    m = m.max(x[rr * cols + cc].abs());
                                }
                            }
                            let s = scale_from_amax(m, fmt);
                            assert_eq!(t.scale_at(r, c), s, "{layout:?} {fmt:?} ({r},{c})");
                            let code = encode_e4m3(x[r * cols + c] * (1.0 / s), true);
                            assert_eq!(t.codes[r * cols + c], code, "{layout:?} ({r},{c})");
                            assert_eq!(y[r * cols + c], decode_e4m3(code) * s);
                        }
                    }
                }
            }
        }
    }

    /// E4M3 keeps 3 mantissa bits: relative error of every element ≤ 2^-4 unless it is tiny
    /// against its group's amax (subnormal range).
    #[test]
    fn round_trip_error_is_bounded() {
        let (rows, cols) = (130, 300);
        let x = random(rows, cols, 11);
        for layout in [
            ScaleLayout::Tile1x128,
            ScaleLayout::Tile128x1,
            ScaleLayout::Block128x128,
        ] {
            let t = quantize(&x, rows, cols, layout, ScaleFormat::F32);
            let y = dequantize(&t);
            for r in 0..rows {
                for c in 0..cols {
                    let (v, q, s) = (x[r * cols + c], y[r * cols + c], t.scale_at(r, c));
                    let tol = (v.abs() / 16.0).max(s * 2f32.powi(-10));
                    assert!(
                        (v - q).abs() <= tol * 1.0001,
                        "{layout:?} ({r},{c}) {v} → {q}"
                    );
                }
            }
        }
    }

    #[test]
    fn requantize_1x128_to_128x1() {
        let (rows, cols) = (200, 260);
        let x = random(rows, cols, 5);
        let a = quantize_1x128(&x, rows, cols, ScaleFormat::Ue8m0);
        let b = a.requantize(ScaleLayout::Tile128x1, ScaleFormat::Ue8m0);
        assert_eq!(
            b,
            quantize_128x1(&dequantize(&a), rows, cols, ScaleFormat::Ue8m0)
        );
        assert_eq!(b.scales.len(), 2 * cols);
    }

    #[test]
    fn all_zero_and_empty_inputs() {
        let t = quantize_128x128(&[0.0; 6], 2, 3, ScaleFormat::F32);
        assert!(t.codes.iter().all(|&c| c == 0));
        assert_eq!(t.scales, vec![1e-4 / 448.0]);
        let e = quantize_1x128(&[], 0, 5, ScaleFormat::F32);
        assert!(e.codes.is_empty() && e.scales.is_empty());
        assert!(dequantize(&e).is_empty());
    }
}

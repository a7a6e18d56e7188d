//! The operands of the FP8 GEMMs as a block-scaled GEMM library takes them (cuBLASLt's "TN" FP8
//! matmul with `VEC128_32F` and `BLK128x128_32F` scales; issue 12): every operand's E4M3 codes
//! K-major (`[rows, ld]`, `ld ≥ K` a multiple of 16, zero-padded), its scales either one per row
//! per 128 of K stored K-block-major (`Vec128`: `[⌈K/128⌉, rows]`) or one per 128×128 block stored
//! block-row-major with rows padded to 16 bytes (`Blk128`: `[⌈rows/128⌉, ld_s]`,
//! `ld_s = ⌈⌈K/128⌉/4⌉·4`).
//!
//! The product is `out[m, n] = Σ_kb (Σ_{k ∈ kb} A[i, k]·B[j, k]) · sa(kb, i) · sb(kb, j)`,
//! row-major, the same sum as `fp8::gemm`'s three orientations. [`fprop`], [`dgrad`] and
//! [`wgrad`] say how to gather each operand from the tensors those GEMMs take (x, dy in 1×128
//! tiles; W in 128×128 blocks; dy, x in 128×1 tiles for Wgrad); [`Gather`] is the one copy that
//! does it, run by the CPU here and by `device/cuda/fp8_pack.cu` on the GPU; [`packed_gemm`] is
//! the reference of the library's product on packed operands. Padding never changes the sum:
//! padded codes are zero.

use super::format::decode_e4m3_arith;
use super::quant::TILE;

/// Codes' leading dimension is a multiple of this (16 bytes).
pub const CODES_ALIGN: usize = 16;
/// A block-scale row is a multiple of this many f32 (16 bytes).
pub const SCALES_ALIGN: usize = 4;

/// `dst[r·ld + c] = src[r·rs + c·cs]` for `r < rows`, `c < cols`, and zero for
/// `cols ≤ c < ld`: a strided copy that transposes (`rs = 1`) and pads rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gather {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
    pub ld: usize,
}

impl Gather {
    /// Elements of the destination.
    pub fn len(&self) -> usize {
        self.rows * self.ld
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements of the source the copy reads up to (its last index + 1).
    pub fn src_extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }

    /// The copy on the CPU.
    pub fn apply<T: Copy + Default>(&self, src: &[T]) -> Vec<T> {
        assert!(
            src.len() >= self.src_extent(),
            "gather reads {} elements of {}",
            self.src_extent(),
            src.len()
        );
        let mut dst = vec![T::default(); self.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                dst[r * self.ld + c] = src[r * self.rs + c * self.cs];
            }
        }
        dst
    }
}

/// How an operand's scales are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedScales {
    /// One per row per 128 of K, `[⌈K/128⌉, rows]` (`VEC128_32F`).
    Vec128,
    /// One per 128 rows per 128 of K, `[⌈rows/128⌉, ld]` (`BLK128x128_32F`).
    Blk128 { ld: usize },
}

/// One operand: `rows` rows of K codes, and how to gather its codes and scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub rows: usize,
    pub codes: Gather,
    pub scales: Gather,
    pub mode: PackedScales,
}

impl Operand {
    /// The codes' leading dimension (≥ K).
    pub fn ld(&self) -> usize {
        self.codes.ld
    }

    /// The scale of K block `kb` for row `i` in the packed scales.
    pub fn scale_index(&self, kb: usize, i: usize) -> usize {
        match self.mode {
            PackedScales::Vec128 => kb * self.rows + i,
            PackedScales::Blk128 { ld } => (i / TILE) * ld + kb,
        }
    }
}

/// `out[m, n] = A[m, k] · B[n, k]ᵀ` on packed operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
}

impl Plan {
    /// Why a GEMM library would refuse these shapes, if it would: FP8 operands need K-major
    /// rows of a multiple of 16 bytes and an output row of 16 bytes (N a multiple of 4; 16 asked,
    /// as PyTorch does for its scaled GEMM).
    pub fn unsupported(&self) -> Option<String> {
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return Some(format!("an empty GEMM ({}×{}×{})", self.m, self.n, self.k));
        }
        if !self.k.is_multiple_of(CODES_ALIGN) {
            return Some(format!("K = {} is not a multiple of {CODES_ALIGN}", self.k));
        }
        if !self.n.is_multiple_of(CODES_ALIGN) {
            return Some(format!("N = {} is not a multiple of {CODES_ALIGN}", self.n));
        }
        None
    }
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

/// Codes `[rows, k]` row-major, as they are.
fn codes_row_major(rows: usize, k: usize) -> Gather {
    Gather {
        rows,
        cols: k,
        rs: k,
        cs: 1,
        ld: k,
    }
}

/// Codes `[k, rows]` row-major, transposed to `[rows, ld]` with K padded to 16.
fn codes_transposed(rows: usize, k: usize) -> Gather {
    Gather {
        rows,
        cols: k,
        rs: 1,
        cs: rows,
        ld: round_up(k, CODES_ALIGN),
    }
}

/// 1×128 scales `[rows, ⌈k/128⌉]` to `Vec128` `[⌈k/128⌉, rows]`.
fn vec128_from_1x128(rows: usize, k: usize) -> Operand {
    let kbs = k.div_ceil(TILE);
    Operand {
        rows,
        codes: codes_row_major(rows, k),
        scales: Gather {
            rows: kbs,
            cols: rows,
            rs: 1,
            cs: kbs,
            ld: rows,
        },
        mode: PackedScales::Vec128,
    }
}

/// 128×1 scales of a `[k, rows]` tensor, `[⌈k/128⌉, rows]`: `Vec128` already; the codes
/// transposed.
fn vec128_from_128x1(rows: usize, k: usize) -> Operand {
    let kbs = k.div_ceil(TILE);
    Operand {
        rows,
        codes: codes_transposed(rows, k),
        scales: Gather {
            rows: kbs,
            cols: rows,
            rs: rows,
            cs: 1,
            ld: rows,
        },
        mode: PackedScales::Vec128,
    }
}

/// Fprop: y `[n, d_out]` = x · Wᵀ; A = x (1×128, K = d_in), B = W `[d_out, d_in]` (128×128,
/// block scales `[⌈d_out/128⌉, ⌈d_in/128⌉]`, rows padded).
pub fn fprop(n: usize, d_in: usize, d_out: usize) -> Plan {
    let kbs = d_in.div_ceil(TILE);
    let ld = round_up(kbs, SCALES_ALIGN);
    let b = Operand {
        rows: d_out,
        codes: codes_row_major(d_out, d_in),
        scales: Gather {
            rows: d_out.div_ceil(TILE),
            cols: kbs,
            rs: kbs,
            cs: 1,
            ld,
        },
        mode: PackedScales::Blk128 { ld },
    };
    Plan {
        m: n,
        n: d_out,
        k: d_in,
        a: vec128_from_1x128(n, d_in),
        b,
    }
}

/// Dgrad: dx `[n, d_in]` = dy · W; A = dy (1×128, K = d_out), B = Wᵀ: W's codes transposed to
/// `[d_in, d_out]` and its block scales `[⌈d_out/128⌉, ⌈d_in/128⌉]` transposed.
pub fn dgrad(n: usize, d_in: usize, d_out: usize) -> Plan {
    let (kbs, nbs) = (d_out.div_ceil(TILE), d_in.div_ceil(TILE));
    let ld = round_up(kbs, SCALES_ALIGN);
    let b = Operand {
        rows: d_in,
        codes: codes_transposed(d_in, d_out),
        scales: Gather {
            rows: nbs,
            cols: kbs,
            rs: 1,
            cs: nbs,
            ld,
        },
        mode: PackedScales::Blk128 { ld },
    };
    Plan {
        m: n,
        n: d_in,
        k: d_out,
        a: vec128_from_1x128(n, d_out),
        b,
    }
}

/// Wgrad: dW `[d_out, d_in]` = dyᵀ · x; A = dyᵀ, B = xᵀ (both 128×1 over the n tokens, K = n,
/// codes transposed and K padded to 16).
pub fn wgrad(n: usize, d_in: usize, d_out: usize) -> Plan {
    Plan {
        m: d_out,
        n: d_in,
        k: round_up(n, CODES_ALIGN),
        a: vec128_from_128x1(d_out, n),
        b: vec128_from_128x1(d_in, n),
    }
}

/// The library's product on packed operands (codes and scales gathered by the plan), summed per
/// K block in k order and promoted as `fp8::gemm` does: `acc += part · sa · sb`.
pub fn packed_gemm(
    p: &Plan,
    a_codes: &[u8],
    a_scales: &[f32],
    b_codes: &[u8],
    b_scales: &[f32],
) -> Vec<f32> {
    let (lda, ldb) = (p.a.ld(), p.b.ld());
    let mut out = vec![0f32; p.m * p.n];
    for i in 0..p.m {
        for j in 0..p.n {
            let mut acc = 0f32;
            for k0 in (0..p.k).step_by(TILE) {
                let k1 = (k0 + TILE).min(p.k);
                let mut part = 0f32;
                for k in k0..k1 {
                    part += decode_e4m3_arith(a_codes[i * lda + k])
                        * decode_e4m3_arith(b_codes[j * ldb + k]);
                }
                let kb = k0 / TILE;
                acc += part * a_scales[p.a.scale_index(kb, i)] * b_scales[p.b.scale_index(kb, j)];
            }
            out[i * p.n + j] = acc;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::quant::{ScaleFormat, quantize_1x128, quantize_128x1, quantize_128x128};
    use crate::fp8::{fp8_gemm_dgrad, fp8_gemm_fprop, fp8_gemm_wgrad};
    use crate::rng::Rng;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..len).map(|_| r.normal() * 3.0).collect()
    }

    fn rel(got: &[f32], want: &[f32]) -> f64 {
        crate::device::norm_rel_error(got, want)
    }

    /// Packs both operands with the plan and multiplies them.
    fn run(p: &Plan, a: (&[u8], &[f32]), b: (&[u8], &[f32])) -> Vec<f32> {
        let (ac, asc) = (p.a.codes.apply(a.0), p.a.scales.apply(a.1));
        let (bc, bsc) = (p.b.codes.apply(b.0), p.b.scales.apply(b.1));
        assert_eq!(ac.len(), p.m * p.a.ld());
        assert_eq!(bc.len(), p.n * p.b.ld());
        packed_gemm(p, &ac, &asc, &bc, &bsc)
    }

    /// Shapes off every boundary: n not a multiple of 16 or 128, K blocks not a multiple of 4.
    const SHAPES: [(usize, usize, usize); 3] = [(200, 384, 256), (37, 640, 144), (130, 256, 528)];

    #[test]
    fn the_three_orientations_packed_equal_the_cpu_fp8_gemms() {
        let f = ScaleFormat::F32;
        for (s, &(n, din, dout)) in SHAPES.iter().enumerate() {
            let x = random(n * din, 10 + s as u64);
            let w = random(dout * din, 20 + s as u64);
            let dy = random(n * dout, 30 + s as u64);
            let (xq, wq) = (
                quantize_1x128(&x, n, din, f),
                quantize_128x128(&w, dout, din, f),
            );
            let gq = quantize_1x128(&dy, n, dout, f);
            let (gt, xt) = (
                quantize_128x1(&dy, n, dout, f),
                quantize_128x1(&x, n, din, f),
            );
            let mut y = vec![0f32; n * dout];
            fp8_gemm_fprop(&mut y, &xq, &wq);
            let mut dx = vec![0f32; n * din];
            fp8_gemm_dgrad(&mut dx, &gq, &wq);
            let mut dw = vec![0f32; dout * din];
            fp8_gemm_wgrad(&mut dw, &gt, &xt);
            for (label, p, a, b, want) in [
                ("fprop", fprop(n, din, dout), &xq, &wq, y),
                ("dgrad", dgrad(n, din, dout), &gq, &wq, dx),
                ("wgrad", wgrad(n, din, dout), &gt, &xt, dw),
            ] {
                // the same block sums promoted in the same order; within a block the library may
                // order the k-sum its own way (OpenBLAS's Zen kernel does; its SkylakeX kernel
                // gave these bits exactly): normwise 1e-6 (measured ≤ 2.4e-9), while a wrong
                // index is off by O(1)
                let got = run(&p, (&a.codes, &a.scales), (&b.codes, &b.scales));
                let r = rel(&got, &want);
                assert!(r < 1e-6, "{label} {n}x{din}x{dout}: {r:.2e}");
            }
        }
    }

    #[test]
    fn a_wrong_scale_layout_is_caught() {
        // the check above can fail: reading padded Blk128 scales as if unpadded is wrong as
        // soon as ⌈K/128⌉ is not a multiple of 4 (K = 640: 5 blocks, padded to 8)
        let (n, din, dout) = (37, 640, 256);
        let f = ScaleFormat::F32;
        let (x, w) = (random(n * din, 1), random(dout * din, 2));
        let (xq, wq) = (
            quantize_1x128(&x, n, din, f),
            quantize_128x128(&w, dout, din, f),
        );
        let mut want = vec![0f32; n * dout];
        fp8_gemm_fprop(&mut want, &xq, &wq);
        let mut p = fprop(n, din, dout);
        p.b.mode = PackedScales::Blk128 {
            ld: din.div_ceil(TILE),
        };
        let got = run(&p, (&xq.codes, &xq.scales), (&wq.codes, &wq.scales));
        assert!(rel(&got, &want) > 1e-2, "{}", rel(&got, &want));
    }

    #[test]
    fn gathers_transpose_and_pad() {
        let src: Vec<u8> = (1..=6).collect(); // [2, 3]
        let t = Gather {
            rows: 3,
            cols: 2,
            rs: 1,
            cs: 3,
            ld: 4,
        };
        assert_eq!(t.apply(&src), vec![1, 4, 0, 0, 2, 5, 0, 0, 3, 6, 0, 0]);
        assert_eq!(t.src_extent(), 6);
        assert_eq!(wgrad(37, 32, 48).k, 48);
        assert_eq!(wgrad(37, 32, 48).unsupported(), None);
        assert!(fprop(37, 40, 48).unsupported().unwrap().contains("K = 40"));
        assert!(dgrad(37, 48, 40).unsupported().unwrap().contains("K = 40"));
        assert!(fprop(37, 48, 40).unsupported().unwrap().contains("N = 40"));
    }
}

//! The routed experts' FP8 GEMMs as one list of problems (issue 12): what
//! `device/cuda/fp8_grouped.cu` computes in one launch, described here without a device. Each
//! [`Problem`] is one expert's promoted GEMM of DeepSeek-V3's recipe,
//! `out[i, j] (+)= Σ_kb (Σ_{k ∈ kb} A(i, k)·B(j, k)) · sa(kb, i) · sb(kb, j)`, with its operands
//! read through strides ([`Strided`]: the same as `fp8_gemm.cu`'s), so the three orientations of
//! a Linear ([`fprop`], [`dgrad`], [`wgrad`]) read the quantised tensors as the CPU's
//! `fp8_gemm_fprop`, `_dgrad` and `_wgrad` take them, without packing. [`Problem::fields`] is a
//! problem as the kernel reads it (device addresses added to the positions here), [`tiles`] the
//! kernel's grid: one 64×64 output tile per block.

use super::quant::TILE;

/// Long longs per problem in the kernel's list.
pub const FIELDS: usize = 20;
/// Output rows and columns of one tile (one block of 128 threads).
pub const TILE_M: usize = 64;
pub const TILE_N: usize = 64;

/// One operand: the E4M3 code of row i, K index k at `codes_at + i·row + k·k`, and the scale of
/// K block kb for row i at `scales_at + kb·scale_kb + (i / scale_div)·scale_row` (positions in
/// elements of the operand's code and scale buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    pub codes_at: usize,
    pub row: usize,
    pub k: usize,
    pub scales_at: usize,
    pub scale_kb: usize,
    pub scale_row: usize,
    pub scale_div: usize,
}

/// One expert's GEMM: `out[out_at + i·out_ld + j]` for i < m, j < n over K = k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Strided,
    pub b: Strided,
    pub out_at: usize,
    pub out_ld: usize,
    /// Add the product to the output (a weight gradient's running sum) instead of writing it.
    pub accumulate: bool,
}

/// The base addresses a problem's positions are added to (bytes): codes are one byte, scales
/// and outputs four.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bases {
    pub a_codes: u64,
    pub a_scales: u64,
    pub b_codes: u64,
    pub b_scales: u64,
    pub out: u64,
}

impl Problem {
    /// The problem as the kernel reads it: m, n, k, A's address and strides, its scales', B's,
    /// the output's address and leading dimension, and whether it accumulates.
    pub fn fields(&self, at: Bases) -> [i64; FIELDS] {
        let addr = |base: u64, pos: usize, size: u64| (base + pos as u64 * size) as i64;
        let i = |v: usize| v as i64;
        let mut f = Vec::with_capacity(FIELDS);
        f.extend([self.m, self.n, self.k].map(i));
        for (s, codes, scales) in [
            (&self.a, at.a_codes, at.a_scales),
            (&self.b, at.b_codes, at.b_scales),
        ] {
            f.extend([
                addr(codes, s.codes_at, 1),
                i(s.row),
                i(s.k),
                addr(scales, s.scales_at, 4),
                i(s.scale_kb),
                i(s.scale_row),
                i(s.scale_div),
            ]);
        }
        f.extend([addr(at.out, self.out_at, 4), i(self.out_ld)]);
        f.push(i64::from(self.accumulate));
        f.try_into().expect("FIELDS long longs")
    }

    /// The last code and scale positions the problem reads of A and of B, and the last output
    /// position it writes (+ 1 each): what its buffers must hold. None for an empty problem.
    pub fn extents(&self) -> Option<[usize; 5]> {
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return None;
        }
        let kbs = self.k.div_ceil(TILE);
        let op = |s: &Strided, rows: usize| {
            (
                s.codes_at + (rows - 1) * s.row + (self.k - 1) * s.k + 1,
                s.scales_at + (kbs - 1) * s.scale_kb + ((rows - 1) / s.scale_div) * s.scale_row + 1,
            )
        };
        let (ac, asc) = op(&self.a, self.m);
        let (bc, bsc) = op(&self.b, self.n);
        Some([
            ac,
            asc,
            bc,
            bsc,
            self.out_at + (self.m - 1) * self.out_ld + self.n,
        ])
    }
}

/// The kernel's grid: (problem, row0, col0) for every 64×64 output tile of every problem.
pub fn tiles(problems: &[Problem]) -> Vec<i32> {
    let mut t = Vec::new();
    for (p, q) in problems.iter().enumerate() {
        for row0 in (0..q.m).step_by(TILE_M) {
            for col0 in (0..q.n).step_by(TILE_N) {
                t.extend([p as i32, row0 as i32, col0 as i32]);
            }
        }
    }
    t
}

/// `p` with its B (an expert's W) read as the `i`-th of a batch of weights quantised one after
/// another in 128×128 blocks (`fp8_quantize_128x128_batched`'s layout: W i's codes at
/// i·dout·din, its scales at i·⌈dout/128⌉·⌈din/128⌉).
pub fn in_weight_batch(mut p: Problem, i: usize, din: usize, dout: usize) -> Problem {
    p.b.codes_at += i * dout * din;
    p.b.scales_at += i * dout.div_ceil(TILE) * din.div_ceil(TILE);
    p
}

/// Fprop of the expert owning rows lo..hi: y[lo..hi] = x[lo..hi]·Wᵀ; A = x's codes (1×128,
/// `[rows, din]`, all rows quantised at once: a row's tiles do not depend on the others), B = the
/// expert's W (128×128 blocks, its own buffers).
pub fn fprop(lo: usize, hi: usize, din: usize, dout: usize) -> Problem {
    let kin = din.div_ceil(TILE);
    Problem {
        m: hi - lo,
        n: dout,
        k: din,
        a: Strided {
            codes_at: lo * din,
            row: din,
            k: 1,
            scales_at: lo * kin,
            scale_kb: 1,
            scale_row: kin,
            scale_div: 1,
        },
        b: Strided {
            codes_at: 0,
            row: din,
            k: 1,
            scales_at: 0,
            scale_kb: 1,
            scale_row: kin,
            scale_div: TILE,
        },
        out_at: lo * dout,
        out_ld: dout,
        accumulate: false,
    }
}

/// Dgrad of the expert owning rows lo..hi: dx[lo..hi] (+)= dy[lo..hi]·W; A = dy's codes (1×128,
/// `[rows, dout]`), B = W read down its columns (its 128×128 scales indexed (kb, j/128)).
pub fn dgrad(lo: usize, hi: usize, din: usize, dout: usize, accumulate: bool) -> Problem {
    let (kin, kout) = (din.div_ceil(TILE), dout.div_ceil(TILE));
    Problem {
        m: hi - lo,
        n: din,
        k: dout,
        a: Strided {
            codes_at: lo * dout,
            row: dout,
            k: 1,
            scales_at: lo * kout,
            scale_kb: 1,
            scale_row: kout,
            scale_div: 1,
        },
        b: Strided {
            codes_at: 0,
            row: 1,
            k: din,
            scales_at: 0,
            scale_kb: kin,
            scale_row: 1,
            scale_div: TILE,
        },
        out_at: lo * din,
        out_ld: din,
        accumulate,
    }
}

/// The 128-row bands of each segment of `offsets` on its own (a segment's 128×1 quantisation
/// starts at its first row): (lo, hi) of every band in order, and each segment's first band.
pub fn row_bands(offsets: &[usize]) -> (Vec<i32>, Vec<usize>) {
    let (mut bands, mut first) = (Vec::new(), Vec::new());
    for w in offsets.windows(2) {
        first.push(bands.len() / 2);
        for lo in (w[0]..w[1]).step_by(TILE) {
            bands.extend([lo as i32, (lo + TILE).min(w[1]) as i32]);
        }
    }
    (bands, first)
}

/// Wgrad of the expert owning rows lo..hi, its 128×1 quantisations of dy `[rows, dout]` and x
/// `[rows, din]` made in place by segment (`row_bands`: its bands from `band0`): dW += dyᵀ·x.
pub fn wgrad_in_place(lo: usize, hi: usize, band0: usize, din: usize, dout: usize) -> Problem {
    let mut p = wgrad(hi - lo, din, dout);
    (p.a.codes_at, p.a.scales_at) = (lo * dout, band0 * dout);
    (p.b.codes_at, p.b.scales_at) = (lo * din, band0 * din);
    p
}

/// Wgrad of an expert with `n` rows: dW += dyᵀ·x on the expert's own 128×1 quantisations of dy
/// `[n, dout]` and x `[n, din]` (tiles of 128 of its rows), both read down their columns.
pub fn wgrad(n: usize, din: usize, dout: usize) -> Problem {
    let column = |width: usize| Strided {
        codes_at: 0,
        row: 1,
        k: width,
        scales_at: 0,
        scale_kb: width,
        scale_row: 1,
        scale_div: 1,
    };
    Problem {
        m: dout,
        n: din,
        k: n,
        a: column(dout),
        b: column(din),
        out_at: 0,
        out_ld: din,
        accumulate: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_output_once() {
        let ps = [
            fprop(0, 70, 256, 130),
            fprop(70, 70, 256, 130),
            wgrad(5, 64, 3),
        ];
        let t = tiles(&ps);
        // 70×130: 2×3 tiles; the empty expert none; 3×64: 1×1
        assert_eq!(t.len(), 3 * (6 + 1));
        assert_eq!(&t[..6], &[0, 0, 0, 0, 0, 64]);
        assert_eq!(&t[t.len() - 3..], &[2, 0, 0]);
    }

    #[test]
    fn bands_start_at_each_segment() {
        let (bands, first) = row_bands(&[0, 130, 130, 140, 400]);
        assert_eq!(
            bands,
            vec![0, 128, 128, 130, 130, 140, 140, 268, 268, 396, 396, 400]
        );
        assert_eq!(first, vec![0, 2, 2, 3]);
        let p = wgrad_in_place(140, 400, 3, 64, 32);
        assert_eq!((p.k, p.a.codes_at, p.a.scales_at), (260, 140 * 32, 3 * 32));
        assert_eq!((p.b.codes_at, p.b.scales_at), (140 * 64, 3 * 64));
    }

    #[test]
    fn fields_add_the_bases_in_bytes() {
        let p = dgrad(3, 10, 200, 130, true);
        let at = Bases {
            a_codes: 1000,
            a_scales: 2000,
            b_codes: 3000,
            b_scales: 4000,
            out: 5000,
        };
        let f = p.fields(at);
        assert_eq!(f[..3], [7, 200, 130]);
        assert_eq!(f[3], 1000 + 3 * 130);
        assert_eq!(f[6], 2000 + 4 * 3 * 2);
        assert_eq!(f[10], 3000);
        assert_eq!(f[17], 5000 + 4 * 3 * 200);
        assert_eq!((f[18], f[19]), (200, 1));
        // the last row's last code, its last scale, and the last output element
        assert_eq!(
            p.extents(),
            Some([
                9 * 130 + 130,
                9 * 2 + 2,
                199 + 129 * 200 + 1,
                2 + 2,
                9 * 200 + 200
            ])
        );
        assert_eq!(fprop(4, 4, 8, 8).extents(), None);
    }
}

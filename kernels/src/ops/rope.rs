//! Rotary position embedding on interleaved pairs (x₂ᵢ, x₂ᵢ₊₁), as DeepSeek-V3's weights assume.
//! Only the decoupled q^R / k^R parts of MLA are rotated; backward rotates by the negative angle.

/// cos/sin of angle pos·θᵢ for every position and pair, θᵢ = base^(−2i/dim) (optionally YaRN-corrected).
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// YaRN frequency correction parameters (reference §1.3); `None` means plain RoPE.
#[derive(Clone, Copy, Debug)]
pub struct Yarn {
    pub factor: f32,
    pub original_max_position: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

impl RopeTable {
    pub fn new(dim: usize, base: f32, positions: usize, yarn: Option<Yarn>) -> RopeTable {
        assert!(dim.is_multiple_of(2), "rope dim {dim} must be even");
        let half = dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        if let Some(y) = yarn {
            let corr = |r: f32| {
                dim as f32 * (y.original_max_position / (2.0 * std::f32::consts::PI * r)).ln()
                    / (2.0 * base.ln())
            };
            let low = corr(y.beta_fast).floor().max(0.0);
            let high = corr(y.beta_slow).ceil().min(dim as f32 - 1.0);
            for (i, f) in inv_freq.iter_mut().enumerate() {
                let ramp = ((i as f32 - low) / (high - low).max(1e-3)).clamp(0.0, 1.0);
                *f = *f * (1.0 - ramp) + (*f / y.factor) * ramp;
            }
        }
        let mut cos = vec![0.0; positions * half];
        let mut sin = vec![0.0; positions * half];
        for p in 0..positions {
            for i in 0..half {
                let angle = p as f32 * inv_freq[i];
                cos[p * half + i] = angle.cos();
                sin[p * half + i] = angle.sin();
            }
        }
        RopeTable { half, cos, sin }
    }

    pub fn positions(&self) -> usize {
        self.cos.len() / self.half
    }
}

fn rotate(
    x: &mut [f32],
    stride: usize,
    offset: usize,
    positions: &[usize],
    t: &RopeTable,
    sign: f32,
) {
    let dim = 2 * t.half;
    for (row, &pos) in x.chunks_exact_mut(stride).zip(positions) {
        let part = &mut row[offset..offset + dim];
        let cos = &t.cos[pos * t.half..(pos + 1) * t.half];
        let sin = &t.sin[pos * t.half..(pos + 1) * t.half];
        for ((pair, &c), &s) in part.chunks_exact_mut(2).zip(cos).zip(sin) {
            let s = sign * s;
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// Rotates, in place, columns [offset, offset+dim) of every row of x[rows, stride] by its position.
pub fn forward(
    x: &mut [f32],
    stride: usize,
    offset: usize,
    positions: &[usize],
    table: &RopeTable,
) {
    rotate(x, stride, offset, positions, table, 1.0);
}

/// The input gradient: rotation is orthogonal, so dx is dy rotated by the negative angle (in place).
pub fn backward_input(
    dy: &mut [f32],
    stride: usize,
    offset: usize,
    positions: &[usize],
    table: &RopeTable,
) {
    rotate(dy, stride, offset, positions, table, -1.0);
}

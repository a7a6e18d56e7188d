//! RMSNorm over the last dimension: y = w ⊙ x / sqrt(mean(x²) + ε).
//! Forward returns the per-row 1/rms that both backward passes reuse.

use rayon::prelude::*;

/// y[n,d] = w ⊙ x · rstd; rstd[n] = 1/sqrt(mean(x²)+eps)
pub fn forward(y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], d: usize, eps: f32) {
    y.par_chunks_exact_mut(d)
        .zip(x.par_chunks_exact(d))
        .zip(rstd.par_iter_mut())
        .for_each(|((yr, xr), r)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = wv * (xv * *r);
            }
        });
}

/// dx[n,d] (+)= ∂L/∂x given dy; dx = rstd·(w⊙dy − x̂·mean(w⊙dy⊙x̂)), x̂ = x·rstd.
pub fn backward_input(
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    rstd: &[f32],
    w: &[f32],
    d: usize,
    accumulate: bool,
) {
    dx.par_chunks_exact_mut(d)
        .zip(dy.par_chunks_exact(d))
        .zip(x.par_chunks_exact(d))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, dyr), xr), &r)| {
            let mut dot = 0.0f32;
            for ((g, xv), wv) in dyr.iter().zip(xr).zip(w) {
                dot += g * wv * xv * r;
            }
            let mean = dot / d as f32;
            for (((dxv, g), xv), wv) in dxr.iter_mut().zip(dyr).zip(xr).zip(w) {
                let v = r * (g * wv - xv * r * mean);
                if accumulate {
                    *dxv += v;
                } else {
                    *dxv = v;
                }
            }
        });
}

/// dw[d] += Σ_n dy ⊙ x̂
pub fn backward_weight(dw: &mut [f32], dy: &[f32], x: &[f32], rstd: &[f32], d: usize) {
    for ((dyr, xr), &r) in dy.chunks_exact(d).zip(x.chunks_exact(d)).zip(rstd) {
        for ((g, dv), xv) in dw.iter_mut().zip(dyr).zip(xr) {
            *g += dv * xv * r;
        }
    }
}

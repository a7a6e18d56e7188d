//! Causal scaled-dot-product attention per (sequence, head), MLA's naive (training) form.
//! Inputs are contiguous [bh, t, d] blocks; softmax runs in f32 and its probabilities are kept for backward.

use crate::matmul;
use rayon::prelude::*;

/// o[bh,t,dv] = softmax(scale·q kᵀ, causal) v; p[bh,t,t] receives the probabilities.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    o: &mut [f32],
    p: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    dqk: usize,
    dv: usize,
    scale: f32,
) {
    o.par_chunks_mut(t * dv)
        .zip(p.par_chunks_mut(t * t))
        .enumerate()
        .for_each(|(i, (o, p))| {
            let q = &q[i * t * dqk..(i + 1) * t * dqk];
            let k = &k[i * t * dqk..(i + 1) * t * dqk];
            let v = &v[i * t * dv..(i + 1) * t * dv];
            matmul(p, q, k, t, dqk, t, false, true, false);
            for (row, pr) in p.chunks_exact_mut(t).enumerate() {
                let mut max = f32::NEG_INFINITY;
                for x in pr[..=row].iter_mut() {
                    *x *= scale;
                    max = max.max(*x);
                }
                let mut sum = 0.0f32;
                for x in pr[..=row].iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                pr[..=row].iter_mut().for_each(|x| *x *= inv);
                pr[row + 1..].iter_mut().for_each(|x| *x = 0.0);
            }
            matmul(o, p, v, t, t, dv, false, false, false);
        });
}

/// Given do[bh,t,dv] and the forward's p, writes dq, dk [bh,t,dqk] and dv [bh,t,dv].
#[allow(clippy::too_many_arguments)]
pub fn backward_input(
    dq: &mut [f32],
    dk: &mut [f32],
    dv_out: &mut [f32],
    d_o: &[f32],
    p: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    dqk: usize,
    dv: usize,
    scale: f32,
) {
    dq.par_chunks_mut(t * dqk)
        .zip(dk.par_chunks_mut(t * dqk))
        .zip(dv_out.par_chunks_mut(t * dv))
        .enumerate()
        .for_each(|(i, ((dq, dk), dvb))| {
            let q = &q[i * t * dqk..(i + 1) * t * dqk];
            let k = &k[i * t * dqk..(i + 1) * t * dqk];
            let v = &v[i * t * dv..(i + 1) * t * dv];
            let p = &p[i * t * t..(i + 1) * t * t];
            let d_o = &d_o[i * t * dv..(i + 1) * t * dv];
            // dV = Pᵀ dO
            matmul(dvb, p, d_o, t, t, dv, true, false, false);
            // dP = dO Vᵀ, then dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
            let mut ds = vec![0.0f32; t * t];
            matmul(&mut ds, d_o, v, t, dv, t, false, true, false);
            for (dr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (d, &pv) in dr.iter_mut().zip(pr) {
                    *d = pv * (*d - dot) * scale;
                }
            }
            // dQ = dS K, dK = dSᵀ Q
            matmul(dq, &ds, k, t, t, dqk, false, false, false);
            matmul(dk, &ds, q, t, t, dqk, true, false, false);
        });
}

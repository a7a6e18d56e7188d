//! Causal scaled-dot-product attention per (sequence, head), MLA's naive (training) form.
//! Inputs are contiguous [bh, t, d] blocks; softmax runs in f32 and its probabilities are kept for backward.
//! The `_reading` forms let the products read rounded operands (a device's BF16 tensor-core
//! attention, emulated by the CPU backend); the row functions are what `attention_gemm.cu` mirrors.

use crate::matmul;
use rayon::prelude::*;
use std::borrow::Cow;

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
    forward_reading(o, p, q, k, v, t, dqk, dv, scale, &as_is);
}

/// Operands read as they are (the f32 reference).
pub fn as_is(x: &[f32]) -> Cow<'_, [f32]> {
    Cow::Borrowed(x)
}

/// How a product reads its operands: as they are, or (a device's BF16 tensor-core attention
/// emulated) each value rounded first; the sums stay f32.
pub type Read<'r> = dyn Fn(&[f32]) -> Cow<'_, [f32]> + Sync + 'r;

/// [`forward`] with both products (q·kᵀ and p·v) reading their operands through `read`; the
/// softmax and `p` stay f32.
#[allow(clippy::too_many_arguments)]
pub fn forward_reading(
    o: &mut [f32],
    p: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    dqk: usize,
    dv: usize,
    scale: f32,
    read: &Read<'_>,
) {
    o.par_chunks_mut(t * dv)
        .zip(p.par_chunks_mut(t * t))
        .enumerate()
        .for_each(|(i, (o, p))| {
            let q = &q[i * t * dqk..(i + 1) * t * dqk];
            let k = &k[i * t * dqk..(i + 1) * t * dqk];
            let v = &v[i * t * dv..(i + 1) * t * dv];
            matmul(p, &read(q), &read(k), t, dqk, t, false, true, false);
            softmax_causal_rows(p, t, scale);
            matmul(o, &read(p), &read(v), t, t, dv, false, false, false);
        });
}

/// One (sequence, head) block's scores [t, t] into probabilities in place: row i is
/// softmax(scale·s) over its first i + 1 columns (left to right), zeros after.
pub fn softmax_causal_rows(p: &mut [f32], t: usize, scale: f32) {
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
}

/// The softmax's backward on rows of `t`, in place: `ds` holds dP and receives
/// dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale.
pub fn softmax_backward_rows(ds: &mut [f32], p: &[f32], t: usize, scale: f32) {
    for (dr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
        let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
        for (d, &pv) in dr.iter_mut().zip(pr) {
            *d = pv * (*d - dot) * scale;
        }
    }
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
    backward_input_reading(dq, dk, dv_out, d_o, p, q, k, v, t, dqk, dv, scale, &as_is);
}

/// [`backward_input`] with its four products reading their operands through `read` (p and dS
/// too; the softmax's backward reads the f32 p).
#[allow(clippy::too_many_arguments)]
pub fn backward_input_reading(
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
    read: &Read<'_>,
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
            let d_o = read(&d_o[i * t * dv..(i + 1) * t * dv]);
            // dV = Pᵀ dO
            matmul(dvb, &read(p), &d_o, t, t, dv, true, false, false);
            // dP = dO Vᵀ, then dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
            let mut ds = vec![0.0f32; t * t];
            matmul(&mut ds, &d_o, &read(v), t, dv, t, false, true, false);
            softmax_backward_rows(&mut ds, p, t, scale);
            // dQ = dS K, dK = dSᵀ Q
            let ds = read(&ds);
            matmul(dq, &ds, &read(k), t, t, dqk, false, false, false);
            matmul(dk, &ds, &read(q), t, t, dqk, true, false, false);
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn bf16(x: &[f32]) -> Cow<'_, [f32]> {
        Cow::Owned(
            x.iter()
                .map(|&y| half::bf16::from_f32(y).to_f32())
                .collect(),
        )
    }

    /// Reading BF16-rounded operands (the tensor-core path the CPU backend emulates) changes o
    /// and every input gradient, by BF16's rounding and no more.
    #[test]
    fn bf16_operands_round_the_products_only() {
        let (bh, t, dqk, dv, scale) = (2, 37, 24, 16, 0.2f32);
        let mut rng = Rng::new(5);
        let mut random = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
        let (q, k, v, d_o) = (
            random(bh * t * dqk),
            random(bh * t * dqk),
            random(bh * t * dv),
            random(bh * t * dv),
        );
        let run = |read: &Read<'_>| {
            let (mut o, mut p) = (vec![0.0; bh * t * dv], vec![0.0; bh * t * t]);
            forward_reading(&mut o, &mut p, &q, &k, &v, t, dqk, dv, scale, read);
            let (mut dq, mut dk, mut dvv) =
                (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            backward_input_reading(
                &mut dq, &mut dk, &mut dvv, &d_o, &p, &q, &k, &v, t, dqk, dv, scale, read,
            );
            [o, dq, dk, dvv]
        };
        let (exact, rounded) = (run(&as_is), run(&bf16));
        for (name, (a, b)) in ["o", "dq", "dk", "dv"]
            .iter()
            .zip(exact.iter().zip(&rounded))
        {
            let e = crate::device::norm_rel_error(b, a);
            // measured 2.7e-3 to 3.6e-3: BF16's unit roundoff (3.9e-3) on the operands
            println!("{name}: {e:.2e}");
            assert!(e > 0.0 && e < 1e-2, "{name}: {e:.2e}");
        }
    }
}

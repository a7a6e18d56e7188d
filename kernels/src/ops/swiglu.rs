//! The SwiGLU gate: h = SiLU(a) ⊙ b, between the gate/up and down projections of every FFN.
//! Elementwise; its backward returns the gradients of both inputs.

use rayon::prelude::*;

fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// Elements per parallel chunk (elementwise, so the split cannot change a bit).
const CHUNK: usize = 1 << 14;

/// h = silu(a) ⊙ b, all [len]
pub fn forward(h: &mut [f32], a: &[f32], b: &[f32]) {
    h.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((h, a), b)| {
            for ((hv, &av), &bv) in h.iter_mut().zip(a).zip(b) {
                *hv = silu(av) * bv;
            }
        });
}

/// da = dh ⊙ b ⊙ silu'(a), db = dh ⊙ silu(a)
pub fn backward_input(da: &mut [f32], db: &mut [f32], dh: &[f32], a: &[f32], b: &[f32]) {
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK))
        .zip(dh.par_chunks(CHUNK))
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(((da, db), dh), (a, b))| {
            for ((((dav, dbv), &g), &av), &bv) in
                da.iter_mut().zip(db.iter_mut()).zip(dh).zip(a).zip(b)
            {
                let sig = 1.0 / (1.0 + (-av).exp());
                let s = av * sig;
                *dbv = g * s;
                *dav = g * bv * (sig + s * (1.0 - sig));
            }
        });
}

//! The SwiGLU gate: h = SiLU(a) ⊙ b, between the gate/up and down projections of every FFN.
//! Elementwise; its backward returns the gradients of both inputs.

fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// h = silu(a) ⊙ b, all [len]
pub fn forward(h: &mut [f32], a: &[f32], b: &[f32]) {
    for ((hv, &av), &bv) in h.iter_mut().zip(a).zip(b) {
        *hv = silu(av) * bv;
    }
}

/// da = dh ⊙ b ⊙ silu'(a), db = dh ⊙ silu(a)
pub fn backward_input(da: &mut [f32], db: &mut [f32], dh: &[f32], a: &[f32], b: &[f32]) {
    for ((((dav, dbv), &g), &av), &bv) in da.iter_mut().zip(db.iter_mut()).zip(dh).zip(a).zip(b) {
        let sig = 1.0 / (1.0 + (-av).exp());
        let s = av * sig;
        *dbv = g * s;
        *dav = g * bv * (sig + s * (1.0 - sig));
    }
}

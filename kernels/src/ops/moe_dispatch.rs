//! Expert dispatch (gather each expert's tokens into one contiguous block) and combine
//! (weighted scatter-add of expert outputs back to tokens), in a fixed expert-then-token order.

use crate::ops::moe_gate::Routing;

/// Which rows each expert receives: rows `offsets[e]..offsets[e+1]` of the dispatched block are
/// tokens `token[r]` in slot `slot[r]` of their routing, sorted by expert then token.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchPlan {
    pub offsets: Vec<usize>,
    pub token: Vec<u32>,
    pub slot: Vec<u32>,
}

impl DispatchPlan {
    pub fn new(routing: &Routing, n_experts: usize) -> DispatchPlan {
        let k = routing.k;
        let mut counts = vec![0usize; n_experts];
        for &e in &routing.experts {
            counts[e as usize] += 1;
        }
        let mut offsets = vec![0usize; n_experts + 1];
        for e in 0..n_experts {
            offsets[e + 1] = offsets[e] + counts[e];
        }
        let mut fill = offsets.clone();
        let total = routing.experts.len();
        let mut token = vec![0u32; total];
        let mut slot = vec![0u32; total];
        for (i, &e) in routing.experts.iter().enumerate() {
            let r = fill[e as usize];
            fill[e as usize] += 1;
            token[r] = (i / k) as u32;
            slot[r] = (i % k) as u32;
        }
        DispatchPlan {
            offsets,
            token,
            slot,
        }
    }

    /// Number of (token, slot) assignments per expert: the expert load.
    pub fn loads(&self) -> Vec<u32> {
        self.offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as u32)
            .collect()
    }

    pub fn rows(&self) -> usize {
        self.token.len()
    }
}

/// xe[r, :] = x[token[r], :]
pub fn dispatch_forward(xe: &mut [f32], x: &[f32], plan: &DispatchPlan, d: usize) {
    for (row, &t) in xe.chunks_exact_mut(d).zip(&plan.token) {
        let t = t as usize;
        row.copy_from_slice(&x[t * d..(t + 1) * d]);
    }
}

/// dx[token[r], :] += dxe[r, :] in plan order.
pub fn dispatch_backward_input(dx: &mut [f32], dxe: &[f32], plan: &DispatchPlan, d: usize) {
    for (row, &t) in dxe.chunks_exact(d).zip(&plan.token) {
        let t = t as usize;
        for (a, b) in dx[t * d..(t + 1) * d].iter_mut().zip(row) {
            *a += b;
        }
    }
}

/// out[token[r], :] += weight(token, slot) · ye[r, :] in plan order.
pub fn combine_forward(
    out: &mut [f32],
    ye: &[f32],
    weights: &[f32],
    k: usize,
    plan: &DispatchPlan,
    d: usize,
) {
    for ((row, &t), &s) in ye.chunks_exact(d).zip(&plan.token).zip(&plan.slot) {
        let t = t as usize;
        let w = weights[t * k + s as usize];
        for (a, b) in out[t * d..(t + 1) * d].iter_mut().zip(row) {
            *a += w * b;
        }
    }
}

/// dye[r] = w · dout[token[r]]; dweights[token, slot] = dout[token] · ye[r].
#[allow(clippy::too_many_arguments)]
pub fn combine_backward_input(
    dye: &mut [f32],
    dweights: &mut [f32],
    dout: &[f32],
    ye: &[f32],
    weights: &[f32],
    k: usize,
    plan: &DispatchPlan,
    d: usize,
) {
    for (((drow, row), &t), &s) in dye
        .chunks_exact_mut(d)
        .zip(ye.chunks_exact(d))
        .zip(&plan.token)
        .zip(&plan.slot)
    {
        let t = t as usize;
        let idx = t * k + s as usize;
        let g = &dout[t * d..(t + 1) * d];
        let w = weights[idx];
        let mut dot = 0.0f32;
        for ((dv, &gv), &yv) in drow.iter_mut().zip(g).zip(row) {
            *dv = w * gv;
            dot += gv * yv;
        }
        dweights[idx] = dot;
    }
}

//! Linear layer without bias, y = x·Wᵀ with W stored [out, in] as in Hugging Face.
//! Forward, input gradient (B) and weight gradient (W) are three separate GEMM calls.

use crate::matmul;

/// y[n,out] = x[n,in] · w[out,in]ᵀ
pub fn forward(y: &mut [f32], x: &[f32], w: &[f32], n: usize, d_in: usize, d_out: usize) {
    matmul(y, x, w, n, d_in, d_out, false, true, false);
}

/// dx[n,in] (+)= dy[n,out] · w[out,in]
pub fn backward_input(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    matmul(dx, dy, w, n, d_out, d_in, false, false, accumulate);
}

/// dw[out,in] += dy[n,out]ᵀ · x[n,in]
pub fn backward_weight(dw: &mut [f32], dy: &[f32], x: &[f32], n: usize, d_in: usize, d_out: usize) {
    matmul(dw, dy, x, d_out, n, d_in, true, false, true);
}

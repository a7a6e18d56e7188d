//! Softmax cross-entropy over a vocabulary, the loss of the main head and the MTP heads.
//! Forward gives the summed loss; backward writes scale·(softmax − onehot) into dlogits.

use rayon::prelude::*;

/// Returns Σ_n −log softmax(logits[n])[targets[n]] (a sum, not a mean; callers divide).
/// Rows are computed in parallel; their losses are summed in row order (deterministic).
pub fn forward(logits: &[f32], targets: &[u32], v: usize) -> f64 {
    let per_row: Vec<f64> = logits
        .par_chunks_exact(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
            (sum.ln() + max - row[t as usize]) as f64
        })
        .collect();
    per_row.iter().sum()
}

/// dlogits[n,v] = scale · (softmax(logits[n]) − onehot(targets[n]))
pub fn backward_input(dlogits: &mut [f32], logits: &[f32], targets: &[u32], v: usize, scale: f32) {
    dlogits
        .par_chunks_exact_mut(v)
        .zip(logits.par_chunks_exact(v))
        .zip(targets.par_iter())
        .for_each(|((drow, row), &t)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0f32;
            for (d, &x) in drow.iter_mut().zip(row) {
                *d = (x - max).exp();
                sum += *d;
            }
            let inv = scale / sum;
            for d in drow.iter_mut() {
                *d *= inv;
            }
            drow[t as usize] -= scale;
        });
}

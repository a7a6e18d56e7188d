//! Expert load balancing: the complementary sequence-wise balance loss (α·Σ fᵢPᵢ) and the
//! auxiliary-loss-free bias update (bᵢ += γ·sign(mean load − loadᵢ)).

/// L_Bal for one sequence of `t` tokens: `scores` [t, E] sigmoid affinities, `experts` [t, k] chosen.
/// Returns α·Σᵢ fᵢ·Pᵢ with fᵢ = E/(k·t)·count(i), Pᵢ = mean over tokens of sᵢ/Σⱼsⱼ.
pub fn sequence_loss_forward(
    scores: &[f32],
    experts: &[u32],
    k: usize,
    n_experts: usize,
    alpha: f32,
) -> f64 {
    let t = scores.len() / n_experts;
    let f = frequencies(experts, k, n_experts, t);
    let mut p = vec![0.0f64; n_experts];
    for s in scores.chunks_exact(n_experts) {
        let sum: f64 = s.iter().map(|&v| v as f64).sum();
        for (pi, &si) in p.iter_mut().zip(s) {
            *pi += si as f64 / sum / t as f64;
        }
    }
    alpha as f64 * f.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>()
}

fn frequencies(experts: &[u32], k: usize, n_experts: usize, t: usize) -> Vec<f64> {
    let mut f = vec![0.0f64; n_experts];
    for &e in experts {
        f[e as usize] += n_experts as f64 / (k * t) as f64;
    }
    f
}

/// ds[t, E] += ∂L_Bal/∂s = (α/t)·(f_j/S − Σᵢ fᵢ sᵢ/S²) per token, S = Σⱼ sⱼ.
pub fn sequence_loss_backward_input(
    ds: &mut [f32],
    scores: &[f32],
    experts: &[u32],
    k: usize,
    n_experts: usize,
    alpha: f32,
) {
    let t = scores.len() / n_experts;
    let f = frequencies(experts, k, n_experts, t);
    let c = alpha as f64 / t as f64;
    for (dr, s) in ds
        .chunks_exact_mut(n_experts)
        .zip(scores.chunks_exact(n_experts))
    {
        let sum: f64 = s.iter().map(|&v| v as f64).sum();
        let fs: f64 = f.iter().zip(s).map(|(a, &b)| a * b as f64).sum();
        for (d, fj) in dr.iter_mut().zip(&f) {
            *d += (c * (fj / sum - fs / (sum * sum))) as f32;
        }
    }
}

/// L_Bal of a MoE layer over a batch of `batch` sequences of `seq` tokens: the mean over the
/// sequences of [`sequence_loss_forward`] (`scores` [batch·seq, E], `experts` [batch·seq, k]).
pub fn batch_loss_forward(
    scores: &[f32],
    experts: &[u32],
    seq: usize,
    batch: usize,
    k: usize,
    alpha: f32,
) -> f64 {
    let e = scores.len() / (seq * batch).max(1);
    let per_sequence = scores
        .chunks_exact(seq * e)
        .zip(experts.chunks_exact(seq * k))
        .map(|(sq, ex)| sequence_loss_forward(sq, ex, k, e, alpha));
    batch_mean(per_sequence, batch)
}

/// The batch's loss from its sequences' losses: each divided by `batch`, added in order (what a
/// device that computes the per-sequence losses reports, bit for bit).
pub fn batch_mean(per_sequence: impl IntoIterator<Item = f64>, batch: usize) -> f64 {
    per_sequence
        .into_iter()
        .map(|l| l / batch as f64)
        .fold(0.0, |acc, l| acc + l)
}

/// ds += ∂[`batch_loss_forward`]/∂s, sequence by sequence.
pub fn batch_loss_backward_input(
    ds: &mut [f32],
    scores: &[f32],
    experts: &[u32],
    seq: usize,
    batch: usize,
    k: usize,
    alpha: f32,
) {
    let e = scores.len() / (seq * batch).max(1);
    for ((dsq, sq), ex) in ds
        .chunks_exact_mut(seq * e)
        .zip(scores.chunks_exact(seq * e))
        .zip(experts.chunks_exact(seq * k))
    {
        sequence_loss_backward_input(dsq, sq, ex, k, e, alpha / batch as f32);
    }
}

/// Auxiliary-loss-free update after a step: overloaded experts (load > mean) get b −= γ,
/// underloaded ones b += γ, exactly balanced ones stay.
pub fn bias_update(bias: &mut [f32], loads: &[u32], gamma: f32) {
    let mean = loads.iter().map(|&l| l as f64).sum::<f64>() / loads.len() as f64;
    for (b, &l) in bias.iter_mut().zip(loads) {
        let l = l as f64;
        if l > mean {
            *b -= gamma;
        } else if l < mean {
            *b += gamma;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_update_reference_example() {
        let g = 0.001f32;
        let mut b = vec![0.0f32; 8];
        bias_update(&mut b, &[3, 1, 0, 2, 2, 4, 0, 4], g);
        assert_eq!(b, vec![-g, g, g, 0.0, 0.0, -g, g, -g]);
    }

    #[test]
    fn sequence_loss_reference_example() {
        let s = [0.8, 0.6, 0.2, 0.4, 0.1, 0.7, 0.5, 0.3];
        // top-2 of each token: {0,1} and {1,2}
        let experts = [0u32, 1, 1, 2];
        assert_eq!(frequencies(&experts, 2, 4, 2), vec![1.0, 2.0, 1.0, 0.0]);
        let l = sequence_loss_forward(&s, &experts, 2, 4, 1e-4);
        assert!((l - 1.175e-4).abs() < 1e-10, "{l}");
    }

    #[test]
    fn uniform_routing_gives_alpha() {
        let s = [0.5f32; 8];
        let experts = [0u32, 1, 2, 3];
        let l = sequence_loss_forward(&s, &experts, 2, 4, 1e-4);
        assert!((l - 1e-4).abs() < 1e-10, "{l}");
    }
}

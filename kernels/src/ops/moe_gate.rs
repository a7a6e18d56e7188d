//! DeepSeek-V3's router: sigmoid affinities, bias used only for selection, group-limited top-k
//! (groups scored by the sum of their top-2), weights from the raw sigmoid, normalised, × routed_scaling_factor.

/// How one MoE layer routed its tokens: `experts[n*k + j]` with weight `weights[n*k + j]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// The routing rule of one layer (Hugging Face names in comments).
#[derive(Clone, Copy, Debug)]
pub struct RouteRule {
    /// n_group; 1 disables the group limit.
    pub n_group: usize,
    /// topk_group
    pub topk_group: usize,
    /// num_experts_per_tok
    pub k: usize,
    /// routed_scaling_factor
    pub scale: f32,
    /// norm_topk_prob
    pub normalize: bool,
}

/// Sorts candidate indices by descending score, ties to the lower index, and keeps `keep`.
fn top_indices(scores: &[f32], candidates: impl Iterator<Item = usize>, keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = candidates.collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(keep);
    idx
}

/// Selects experts for one token from its affinities `s` and the selection bias `b`.
pub fn select(s: &[f32], b: &[f32], rule: &RouteRule) -> (Vec<u32>, Vec<f32>) {
    let e = s.len();
    let sb: Vec<f32> = s.iter().zip(b).map(|(x, y)| x + y).collect();
    let allowed: Vec<bool> = if rule.n_group > 1 {
        let size = e / rule.n_group;
        let group_scores: Vec<f32> = (0..rule.n_group)
            .map(|g| {
                let top = top_indices(&sb, g * size..(g + 1) * size, 2);
                top.iter().map(|&i| sb[i]).sum()
            })
            .collect();
        let groups = top_indices(&group_scores, 0..rule.n_group, rule.topk_group);
        (0..e).map(|i| groups.contains(&(i / size))).collect()
    } else {
        vec![true; e]
    };
    let chosen = top_indices(&sb, (0..e).filter(|&i| allowed[i]), rule.k);
    let raw: Vec<f32> = chosen.iter().map(|&i| s[i]).collect();
    let denom = if rule.normalize {
        raw.iter().sum::<f32>() + 1e-20
    } else {
        1.0
    };
    let weights = raw.iter().map(|g| g / denom * rule.scale).collect();
    (chosen.iter().map(|&i| i as u32).collect(), weights)
}

/// Routes n tokens: `scores` [n, E] are sigmoid affinities, `bias` [E] the correction bias.
pub fn forward(scores: &[f32], bias: &[f32], rule: &RouteRule) -> Routing {
    let e = bias.len();
    let mut experts = Vec::with_capacity(scores.len() / e * rule.k);
    let mut weights = Vec::with_capacity(scores.len() / e * rule.k);
    for s in scores.chunks_exact(e) {
        let (ex, w) = select(s, bias, rule);
        experts.extend(ex);
        weights.extend(w);
    }
    Routing {
        k: rule.k,
        experts,
        weights,
    }
}

/// ds[n,E] (+)= ∂L/∂s from ∂L/∂weights[n,k]; only the chosen experts' affinities receive gradient.
pub fn backward_input(
    ds: &mut [f32],
    dweights: &[f32],
    scores: &[f32],
    routing: &Routing,
    rule: &RouteRule,
) {
    let e = scores.len() / (routing.experts.len() / routing.k);
    let k = routing.k;
    for (n, s) in scores.chunks_exact(e).enumerate() {
        let ex = &routing.experts[n * k..(n + 1) * k];
        let dw = &dweights[n * k..(n + 1) * k];
        let dsr = &mut ds[n * e..(n + 1) * e];
        if rule.normalize {
            let sum: f32 = ex.iter().map(|&i| s[i as usize]).sum::<f32>() + 1e-20;
            let dot: f32 = ex.iter().zip(dw).map(|(&i, g)| g * s[i as usize]).sum();
            for (&i, g) in ex.iter().zip(dw) {
                dsr[i as usize] += rule.scale * (g / sum - dot / (sum * sum));
            }
        } else {
            for (&i, g) in ex.iter().zip(dw) {
                dsr[i as usize] += rule.scale * g;
            }
        }
    }
}

/// s = sigmoid(logits), elementwise.
pub fn sigmoid_forward(s: &mut [f32], logits: &[f32]) {
    for (y, &x) in s.iter_mut().zip(logits) {
        *y = 1.0 / (1.0 + (-x).exp());
    }
}

/// dlogits = ds ⊙ s(1−s)
pub fn sigmoid_backward_input(dlogits: &mut [f32], ds: &[f32], s: &[f32]) {
    for ((d, &g), &y) in dlogits.iter_mut().zip(ds).zip(s) {
        *d = g * y * (1.0 - y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: [f32; 8] = [0.9, 0.15, 0.6, 0.5, 0.8, 0.7, 0.2, 0.3];
    const B: [f32; 8] = [0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 0.4, 0.0];

    fn rule(n_group: usize) -> RouteRule {
        RouteRule {
            n_group,
            topk_group: 2,
            k: 2,
            scale: 2.5,
            normalize: true,
        }
    }

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn reference_example_with_bias_and_group_limit() {
        let (ex, w) = select(&S, &B, &rule(4));
        assert_eq!(ex, vec![0, 2]);
        close(&w, &[1.5, 1.0]);
    }

    #[test]
    fn reference_example_without_group_limit() {
        let (ex, w) = select(&S, &B, &rule(1));
        assert_eq!(ex, vec![0, 5]);
        close(&w, &[1.40625, 1.09375]);
    }

    #[test]
    fn reference_example_without_bias() {
        let (ex, w) = select(&S, &[0.0; 8], &rule(4));
        assert_eq!(ex, vec![4, 5]);
        close(&w, &[1.333_333_3, 1.166_666_7]);
    }

    #[test]
    fn a_token_reaches_at_most_topk_group_groups() {
        let mut rng = crate::rng::Rng::new(9);
        let r = RouteRule {
            n_group: 4,
            topk_group: 2,
            k: 4,
            scale: 1.0,
            normalize: true,
        };
        for _ in 0..200 {
            let s: Vec<f32> = (0..16).map(|_| rng.uniform()).collect();
            let b: Vec<f32> = (0..16).map(|_| rng.normal() * 0.1).collect();
            let (ex, w) = select(&s, &b, &r);
            let mut groups: Vec<u32> = ex.iter().map(|e| e / 4).collect();
            groups.dedup();
            groups.sort();
            groups.dedup();
            assert!(groups.len() <= 2, "{ex:?}");
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
}

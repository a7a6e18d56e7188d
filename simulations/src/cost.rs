//! The compute cost model: training FLOPs per token from a DeepSeek-V3 config (every matrix a
//! token passes through, MLA's attention over the causal context, the head and the MTP
//! modules; ×3 for forward plus backward), and the step time that follows from a GPU's peak and
//! an efficiency.

use kernels::model::ModelConfig;

/// Forward FLOPs of one token through one MLA block's attention (projections and scores over
/// an average causal context of `seq / 2`).
fn attention_flops(c: &ModelConfig, seq: u64) -> f64 {
    let (h, heads) = (c.hidden_size as f64, c.num_attention_heads as f64);
    let (dn, dr, dv) = (
        c.qk_nope_head_dim as f64,
        c.qk_rope_head_dim as f64,
        c.v_head_dim as f64,
    );
    let (ql, kvl) = (c.q_lora_rank as f64, c.kv_lora_rank as f64);
    let q = if c.q_lora_rank > 0 {
        h * ql + ql * heads * (dn + dr)
    } else {
        h * heads * (dn + dr)
    };
    let params = q + h * (kvl + dr) + kvl * heads * (dn + dv) + heads * dv * h;
    2.0 * params + 2.0 * heads * (seq as f64 / 2.0) * (dn + dr + dv)
}

/// Forward FLOPs of one token through one feed-forward (dense for the first
/// `first_k_dense_replace` layers, MoE with the routed top-k plus the shared experts after).
fn ffn_flops(c: &ModelConfig, layer: usize) -> f64 {
    let h = c.hidden_size as f64;
    if layer < c.first_k_dense_replace || c.n_routed_experts == 0 {
        2.0 * 3.0 * h * c.intermediate_size as f64
    } else {
        let experts = (c.num_experts_per_tok + c.n_shared_experts) as f64;
        2.0 * (experts * 3.0 * h * c.moe_intermediate_size as f64 + h * c.n_routed_experts as f64)
    }
}

/// Training FLOPs (forward + backward = 3 × forward) per token at sequence length `seq`.
pub fn training_flops_per_token(c: &ModelConfig, seq: u64) -> f64 {
    let h = c.hidden_size as f64;
    let head = 2.0 * h * c.vocab_size as f64;
    let mut fwd = head;
    for l in 0..c.num_hidden_layers {
        fwd += attention_flops(c, seq) + ffn_flops(c, l);
    }
    // each MTP module: a projection of [h; emb] to h, one (MoE) block, the shared head
    for _ in 0..c.num_nextn_predict_layers {
        fwd +=
            2.0 * 2.0 * h * h + attention_flops(c, seq) + ffn_flops(c, c.num_hidden_layers) + head;
    }
    3.0 * fwd
}

/// Seconds of one step of `tokens` tokens on `gpus` GPUs at `tflops` peak × `efficiency`.
pub fn step_seconds(
    flops_per_token: f64,
    tokens: f64,
    gpus: u64,
    tflops: f64,
    efficiency: f64,
) -> f64 {
    flops_per_token * tokens / (gpus as f64 * tflops * 1e12 * efficiency)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> ModelConfig {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/deepseek-v3-671b.toml"
        );
        kernels::model::RunConfig::load(std::path::Path::new(p))
            .unwrap()
            .model
    }

    /// DeepSeek-V3 activates about 37B parameters per token. By hand: 61 blocks of 187M attention
    /// and 398M MoE (3 of them dense, 396M), the 0.93B head and the MTP module (block, projection,
    /// head) make about 38.2B matrix parameters, so 76.4 GFLOP forward, and 10.4 GFLOP more of
    /// attention scores over an average context of 2K; three times that for training: 2.60e11.
    #[test]
    fn deepseek_v3_costs_about_six_times_its_active_parameters() {
        let f = training_flops_per_token(&v3(), 4096);
        println!("DeepSeek-V3 training FLOPs per token at 4K: {f:.4e}");
        assert!((f / 2.60e11 - 1.0).abs() < 0.005, "{f:e}");
    }
}

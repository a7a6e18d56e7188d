//! The communication cost model of one step: pipeline sends between neighbouring stages (FP8
//! activations forward, BF16 gradients backward), the expert-parallel all-to-all of every MoE
//! layer (FP8 dispatch and BF16 combine, under node-limited routing: a token reaches at most
//! `node_limit` nodes over the network, then its experts' GPUs over NVLink), and the
//! data-parallel gradient reduction at the end of the step (a ring all-reduce of BF16
//! gradients). Every formula and default is stated in `simulations/README.md`.

use kernels::model::ModelConfig;
use serde::Deserialize;

/// Links of the cluster, per GPU. Defaults: DeepSeek-V3's H800 cluster (§3.2.2 of the report:
/// 50 GB/s InfiniBand and 160 GB/s NVLink per GPU); the latencies are assumptions (a few
/// microseconds; at the megabyte messages of a step the bandwidth term dominates).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Network (InfiniBand/RoCE) bandwidth per GPU, GB/s.
    pub network_gb_s: f64,
    /// NVLink bandwidth per GPU, GB/s.
    pub nvlink_gb_s: f64,
    /// One message's latency over the network and over NVLink, microseconds.
    pub network_latency_us: f64,
    pub nvlink_latency_us: f64,
}

impl Default for Network {
    fn default() -> Network {
        Network {
            network_gb_s: 50.0,
            nvlink_gb_s: 160.0,
            network_latency_us: 5.0,
            nvlink_latency_us: 2.0,
        }
    }
}

impl Network {
    /// No communication cost at all (infinite bandwidth, no latency).
    pub const FREE: Network = Network {
        network_gb_s: f64::INFINITY,
        nvlink_gb_s: f64::INFINITY,
        network_latency_us: 0.0,
        nvlink_latency_us: 0.0,
    };

    /// Seconds to move `bytes` over the network (`over_network`) or NVLink, latency included.
    pub fn transfer_s(&self, bytes: f64, over_network: bool) -> f64 {
        if over_network {
            self.network_latency_us * 1e-6 + bytes / (self.network_gb_s * 1e9)
        } else {
            self.nvlink_latency_us * 1e-6 + bytes / (self.nvlink_gb_s * 1e9)
        }
    }
}

/// Bytes of one token's hidden vector in FP8 E4M3 with one FP32 scale per 128 channels.
pub fn fp8_token_bytes(hidden: usize) -> f64 {
    hidden as f64 + 4.0 * hidden.div_ceil(128) as f64
}

/// Bytes of one token's hidden vector in BF16.
pub fn bf16_token_bytes(hidden: usize) -> f64 {
    2.0 * hidden as f64
}

/// Expected number of distinct bins that `k` uniform picks among `n` bins land in.
pub fn distinct_of(n: f64, k: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    n * (1.0 - (1.0 - 1.0 / n).powf(k))
}

/// Where the ranks of one step sit and what they exchange.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    /// Pipeline ranks, model stages (2 × pp for DualPipeV) and expert-parallel size.
    pub pp: usize,
    pub stages: usize,
    pub ep: usize,
    /// GPUs of the cluster and per node.
    pub gpus: u64,
    pub gpus_per_node: u64,
    /// Most nodes one token's routed experts may sit on (DeepSeek-V3: 4).
    pub node_limit: usize,
    /// Tokens of one micro-batch on one GPU.
    pub microbatch_tokens: f64,
}

impl Layout {
    /// Nodes one expert-parallel group spans.
    pub fn ep_nodes(&self) -> f64 {
        (self.ep as f64 / self.gpus_per_node as f64).max(1.0)
    }

    /// Whether neighbouring pipeline stages talk over the network: each stage's GPUs
    /// (gpus / pp) fill at least a node, so its neighbour is on another one.
    pub fn stages_across_nodes(&self) -> bool {
        self.gpus / self.pp as u64 >= self.gpus_per_node
    }
}

/// What one micro-batch's chunk on one stage sends, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CommCosts {
    /// Expert all-to-all of one chunk's forward (FP8 dispatch + BF16 combine, every MoE layer
    /// of the chunk) and of its backward (both directions BF16).
    pub a2a_forward_s: f64,
    pub a2a_backward_s: f64,
    /// One pipeline send: an FP8 activation forward, a BF16 gradient backward.
    pub send_activation_s: f64,
    pub send_gradient_s: f64,
    /// The data-parallel reduction of one rank's gradients at the end of the step.
    pub dp_reduce_s: f64,
}

/// Seconds of one all-to-all of `token_bytes` per token copy within an EP group: the network
/// carries each token once per remote target node, NVLink fans it out to its experts' GPUs; the
/// two overlap, so the slower decides.
fn all_to_all_s(l: &Layout, net: &Network, token_bytes: f64, experts_per_token: f64) -> f64 {
    if l.ep <= 1 {
        return 0.0;
    }
    let nodes = l.ep_nodes();
    let reach = (l.node_limit as f64).min(nodes);
    let target_nodes = distinct_of(reach, experts_per_token);
    let gpus_reached = (reach * l.gpus_per_node as f64).min(l.ep as f64);
    let target_gpus = distinct_of(gpus_reached, experts_per_token);
    let tokens = l.microbatch_tokens;
    let nvlink = net.transfer_s(tokens * target_gpus * token_bytes, false);
    if nodes <= 1.0 {
        return nvlink;
    }
    let remote = target_nodes * (nodes - 1.0) / nodes;
    let network = net.transfer_s(tokens * remote * token_bytes, true);
    network.max(nvlink)
}

/// MoE layers of the main model (those with routed experts).
fn moe_layers(c: &ModelConfig) -> usize {
    (0..c.num_hidden_layers)
        .filter(|&l| c.n_routed_experts > 0 && c.is_moe_layer(l))
        .count()
}

/// Parameters of the routed experts (per model, MTP modules included) and of everything else.
fn expert_and_dense_params(c: &ModelConfig) -> (f64, f64) {
    let total = c.param_counts().total() as f64;
    let expert = 3.0 * (c.hidden_size * c.moe_intermediate_size * c.n_routed_experts) as f64;
    let routed = if c.n_routed_experts > 0 {
        expert * (moe_layers(c) + c.num_nextn_predict_layers) as f64
    } else {
        0.0
    };
    (routed, total - routed)
}

/// Seconds of a ring all-reduce of `bytes` over `n` ranks on the network.
pub fn ring_all_reduce_s(net: &Network, bytes: f64, n: f64) -> f64 {
    if n <= 1.0 {
        return 0.0;
    }
    2.0 * (n - 1.0) * net.network_latency_us * 1e-6
        + 2.0 * (n - 1.0) / n * bytes / (net.network_gb_s * 1e9)
}

/// The communication costs of one chunk of `c` under layout `l` on `net`; `copies` is the
/// number of stage copies one rank holds (2 for DualPipe, whose ranks keep two).
pub fn chunk_comm(c: &ModelConfig, l: &Layout, net: &Network, copies: usize) -> CommCosts {
    let h = c.hidden_size;
    let per_chunk = moe_layers(c) as f64 / l.stages as f64;
    let k = c.num_experts_per_tok as f64;
    let fp8 = fp8_token_bytes(h);
    let bf16 = bf16_token_bytes(h);
    let a2a_forward_s = per_chunk * (all_to_all_s(l, net, fp8, k) + all_to_all_s(l, net, bf16, k));
    let a2a_backward_s = per_chunk * 2.0 * all_to_all_s(l, net, bf16, k);
    let across = l.stages_across_nodes();
    let (send_activation_s, send_gradient_s) = if l.pp > 1 {
        (
            net.transfer_s(l.microbatch_tokens * fp8, across),
            net.transfer_s(l.microbatch_tokens * bf16, across),
        )
    } else {
        (0.0, 0.0)
    };
    // data parallelism: every stage is replicated gpus / pp times; its dense parameters are
    // all-reduced over all of them, its experts (split ep ways) over gpus / (pp · ep)
    let (routed, dense) = expert_and_dense_params(c);
    let replicas = l.gpus as f64 / l.pp as f64;
    let per_stage = |p: f64| p / l.stages as f64 * copies as f64;
    let dense_s = ring_all_reduce_s(net, 2.0 * per_stage(dense), replicas);
    let expert_s = ring_all_reduce_s(
        net,
        2.0 * per_stage(routed) / l.ep.max(1) as f64,
        replicas / l.ep.max(1) as f64,
    );
    CommCosts {
        a2a_forward_s,
        a2a_backward_s,
        send_activation_s,
        send_gradient_s,
        dp_reduce_s: dense_s + expert_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_bins_follow_the_occupancy_formula() {
        // 8 experts among 4 nodes: 4 (1 − (3/4)^8) = 3.5995
        assert!((distinct_of(4.0, 8.0) - 3.599_548_339_843_75).abs() < 1e-12);
        assert_eq!(distinct_of(1.0, 8.0), 1.0);
        assert!((distinct_of(32.0, 8.0) - 32.0 * (1.0 - (31.0f64 / 32.0).powi(8))).abs() < 1e-12);
    }

    /// One token of DeepSeek-V3 (hidden 7168) in FP8 is 7168 codes and 56 scales: 7392 bytes;
    /// a ring all-reduce of 1 GB over 2 ranks moves 1 GB per rank: 20 ms at 50 GB/s (+ 10 µs).
    #[test]
    fn wire_sizes_and_ring_all_reduce_by_hand() {
        assert_eq!(fp8_token_bytes(7168), 7392.0);
        assert_eq!(bf16_token_bytes(7168), 14336.0);
        let net = Network::default();
        let t = ring_all_reduce_s(&net, 1e9, 2.0);
        assert!((t - (0.02 + 10e-6)).abs() < 1e-12, "{t}");
        assert_eq!(ring_all_reduce_s(&net, 1e9, 1.0), 0.0);
    }

    /// Node-limited dispatch of 4096 tokens, 8 experts each, EP 64 over 8 nodes of 8 GPUs with
    /// at most 4 nodes per token: 3.5995 target nodes, 7/8 of them remote, so 4096 · 3.1496 ·
    /// 7392 B = 95.4 MB over 50 GB/s = 1.907 ms; NVLink fans out to 7.17 of 32 GPUs: 217 MB at
    /// 160 GB/s = 1.357 ms. The network decides.
    #[test]
    fn node_limited_dispatch_is_bound_by_the_network() {
        let l = Layout {
            pp: 16,
            stages: 16,
            ep: 64,
            gpus: 2048,
            gpus_per_node: 8,
            node_limit: 4,
            microbatch_tokens: 4096.0,
        };
        let net = Network::default();
        let t = all_to_all_s(&l, &net, 7392.0, 8.0);
        let remote = distinct_of(4.0, 8.0) * 7.0 / 8.0;
        let want = 5e-6 + 4096.0 * remote * 7392.0 / 50e9;
        assert!((t - want).abs() < 1e-12, "{t} vs {want}");
        let nv = 2e-6 + 4096.0 * distinct_of(32.0, 8.0) * 7392.0 / 160e9;
        assert!(nv < t, "NVLink {nv} < network {t}");
        // without the node limit a token may reach all 8 nodes: more network traffic
        let unlimited = all_to_all_s(&Layout { node_limit: 8, ..l }, &net, 7392.0, 8.0);
        let want8 = 5e-6 + 4096.0 * distinct_of(8.0, 8.0) * 7.0 / 8.0 * 7392.0 / 50e9;
        assert!((unlimited - want8).abs() < 1e-12, "{unlimited} vs {want8}");
        assert!(unlimited > t * 1.3, "{unlimited} vs {t}");
        // inside one node there is no network at all
        let one_node = Layout { ep: 8, ..l };
        let t1 = all_to_all_s(&one_node, &net, 7392.0, 8.0);
        let want1 = 2e-6 + 4096.0 * distinct_of(8.0, 8.0) * 7392.0 / 160e9;
        assert!((t1 - want1).abs() < 1e-12);
    }
}

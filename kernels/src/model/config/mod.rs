//! The DeepSeek-V3 model config (Hugging Face `DeepseekV3Config` key names) and phalanx's training
//! table, loaded from phalanx TOML or a Hugging Face config.json, validated with errors naming file and field.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// YaRN rope scaling as in the released config (`rope_scaling`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: String,
    pub factor: f32,
    pub original_max_position_embeddings: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    #[serde(default = "one")]
    pub mscale: f32,
    #[serde(default = "one")]
    pub mscale_all_dim: f32,
}

fn one() -> f32 {
    1.0
}

/// The model hyper-parameters, named exactly as Hugging Face's `DeepseekV3Config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_nextn_predict_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub scoring_func: String,
    pub topk_method: String,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub hidden_act: String,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub initializer_range: f32,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub aux_loss_alpha: f32,
    pub seq_aux: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// phalanx's own training settings (the `[training]` table); every key has a default.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f32,
    pub warmup_steps: u64,
    /// Fraction of the run after which the cosine decay starts.
    pub decay_start_frac: f32,
    pub min_lr_ratio: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub adam_eps: f32,
    pub grad_clip: f32,
    pub init_std: f32,
    /// γ of the auxiliary-loss-free bias update.
    pub bias_update_speed: f32,
    /// λ of the MTP loss.
    pub mtp_loss_weight: f32,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Loss-spike rules (see `actors::core::monitor`): a loss above `spike_loss_factor` × the
    /// mean of the last `spike_window` accepted losses (0: off), more than `spike_zscore`
    /// standard deviations above its EMA of decay `spike_ema_decay` (0: off), a gradient norm
    /// above `spike_grad_factor` × its mean (0: off); rules apply after `spike_min_history`
    /// accepted steps. NaN and Inf are always spikes.
    pub spike_loss_factor: f64,
    pub spike_window: usize,
    pub spike_zscore: f64,
    pub spike_ema_decay: f64,
    pub spike_grad_factor: f64,
    pub spike_min_history: usize,
    /// A rollback skips the data of this many steps ending at the spike (1: the spike's own).
    pub rollback_skip_steps: u64,
    /// Committed states kept in memory for rollbacks past the step before a spike (0: such a
    /// rollback reads the newest checkpoint at or before its target from the store).
    pub rollback_ring: usize,
    /// After a rollback the learning rate is multiplied by this for `rollback_lr_steps` steps.
    pub rollback_lr_factor: f32,
    pub rollback_lr_steps: u64,
    /// Rejected steps in a row after which the run stops as diverged.
    pub max_consecutive_rollbacks: u32,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            seq_len: 128,
            batch_size: 8,
            steps: 300,
            lr: 3e-3,
            warmup_steps: 20,
            decay_start_frac: 0.67,
            min_lr_ratio: 0.1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            init_std: 0.02,
            bias_update_speed: 1e-3,
            mtp_loss_weight: 0.3,
            eval_every: 50,
            eval_batches: 4,
            spike_loss_factor: 3.0,
            spike_window: 20,
            spike_zscore: 0.0,
            spike_ema_decay: 0.9,
            spike_grad_factor: 0.0,
            spike_min_history: 5,
            rollback_skip_steps: 1,
            rollback_ring: 0,
            rollback_lr_factor: 1.0,
            rollback_lr_steps: 0,
            max_consecutive_rollbacks: 5,
        }
    }
}

/// A model config plus its training table, as read from one phalanx TOML file.
#[derive(Clone, Debug, PartialEq)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub training: TrainingConfig,
}

/// A config that cannot be used, with the file and the field at fault (`field` is empty when the
/// whole file is: unreadable, not TOML/JSON).
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: field `{}`: {}", self.file, self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

const MODEL_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_nextn_predict_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
    "scoring_func",
    "topk_method",
    "first_k_dense_replace",
    "moe_layer_freq",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "initializer_range",
    "tie_word_embeddings",
    "attention_bias",
    "aux_loss_alpha",
    "seq_aux",
    "rope_scaling",
];

const YARN_KEYS: &[&str] = &[
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
];

fn err(file: &str, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_string(),
        field: field.to_string(),
        message: message.into(),
    }
}

/// Pulls the field name out of a serde message such as "missing field `x`" or "unknown field `y`".
fn serde_field(msg: &str) -> String {
    msg.split('`').nth(1).unwrap_or("?").to_string()
}

/// Deserialises with the path of the failing field: a type error names its key, a missing or
/// unknown key is named from serde's message. `prefix` qualifies nested tables (e.g. "training.").
fn deserialize_named<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    value: D,
    file: &str,
    prefix: &str,
) -> Result<T, ConfigError>
where
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let msg = msg.lines().next().unwrap_or("").to_string();
        let named = serde_field(&msg);
        let field = if path.is_empty() || path == "." {
            named
        } else if msg.contains("unknown field") && !path.ends_with(&named) {
            format!("{path}.{named}")
        } else {
            path
        };
        err(file, &format!("{prefix}{field}"), msg)
    })
}

impl RunConfig {
    /// Reads a phalanx TOML config; unknown keys, missing keys and inconsistent values are refused.
    pub fn load(path: &Path) -> Result<RunConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(&file, "", format!("cannot read: {e}")))?;
        RunConfig::parse(&text, &file)
    }

    /// Parses TOML text; `file` names the source in errors.
    /// The config as phalanx TOML (what `parse` reads back to an equal config).
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::try_from(&self.model).expect("a model config is a table");
        let training = toml::Table::try_from(&self.training).expect("training is a table");
        table.insert("training".into(), toml::Value::Table(training));
        table.to_string()
    }

    pub fn parse(text: &str, file: &str) -> Result<RunConfig, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            err(file, "", format!("not valid TOML: {msg}"))
        })?;
        let training = match table.remove("training") {
            None => TrainingConfig::default(),
            Some(v) => deserialize_named(v, file, "training.")?,
        };
        for key in table.keys() {
            if !MODEL_KEYS.contains(&key.as_str()) {
                return Err(err(
                    file,
                    key,
                    "unknown key (not a DeepseekV3Config field or `training`)",
                ));
            }
        }
        let model: ModelConfig = deserialize_named(toml::Value::Table(table), file, "")?;
        model.validate(file)?;
        let rc = RunConfig { model, training };
        rc.validate_run(file)?;
        Ok(rc)
    }

    /// The training table on its own and against the model (a sequence longer than the
    /// model's positions); run again after command-line flags change the training table.
    pub fn validate_run(&self, file: &str) -> Result<(), ConfigError> {
        self.training.validate(file)?;
        let (t, m) = (&self.training, &self.model);
        if t.seq_len > m.max_position_embeddings {
            return Err(err(
                file,
                "training.seq_len",
                format!(
                    "{} is longer than the model's max_position_embeddings = {}",
                    t.seq_len, m.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }
}

impl TrainingConfig {
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let positive = [
            ("training.seq_len", self.seq_len),
            ("training.batch_size", self.batch_size),
        ];
        for (f, v) in positive {
            if v == 0 {
                return Err(err(file, f, "must be at least 1"));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(err(
                file,
                "training.lr",
                format!("must be a positive number, got {}", self.lr),
            ));
        }
        if !(0.0..=1.0).contains(&self.decay_start_frac) {
            return Err(err(file, "training.decay_start_frac", "must lie in [0, 1]"));
        }
        if self.eval_every == 0 {
            return Err(err(file, "training.eval_every", "must be at least 1"));
        }
        if self.eval_batches == 0 {
            return Err(err(file, "training.eval_batches", "must be at least 1"));
        }
        for (f, v) in [
            ("training.beta1", self.beta1),
            ("training.beta2", self.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(err(file, f, format!("must lie in [0, 1), got {v}")));
            }
        }
        if !(self.adam_eps > 0.0 && self.adam_eps.is_finite()) {
            return Err(err(
                file,
                "training.adam_eps",
                format!("must be a positive number, got {}", self.adam_eps),
            ));
        }
        let non_negative = [
            ("training.grad_clip", self.grad_clip),
            ("training.weight_decay", self.weight_decay),
            ("training.bias_update_speed", self.bias_update_speed),
            ("training.mtp_loss_weight", self.mtp_loss_weight),
        ];
        for (f, v) in non_negative {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(err(
                    file,
                    f,
                    format!("must be zero or positive (0 turns it off), got {v}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(err(file, "training.min_lr_ratio", "must lie in [0, 1]"));
        }
        self.validate_spike_rules(file)
    }

    fn validate_spike_rules(&self, file: &str) -> Result<(), ConfigError> {
        for (f, v) in [
            ("training.spike_loss_factor", self.spike_loss_factor),
            ("training.spike_zscore", self.spike_zscore),
            ("training.spike_grad_factor", self.spike_grad_factor),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(err(
                    file,
                    f,
                    format!("must be zero (off) or positive, got {v}"),
                ));
            }
        }
        if self.spike_loss_factor > 0.0 && self.spike_loss_factor <= 1.0 {
            return Err(err(
                file,
                "training.spike_loss_factor",
                format!(
                    "{} would reject ordinary steps: use a factor above 1, or 0 to turn the rule off",
                    self.spike_loss_factor
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.spike_ema_decay) {
            return Err(err(file, "training.spike_ema_decay", "must lie in [0, 1)"));
        }
        for (f, v) in [
            ("training.spike_window", self.spike_window as u64),
            ("training.rollback_skip_steps", self.rollback_skip_steps),
        ] {
            if v == 0 {
                return Err(err(file, f, "must be at least 1"));
            }
        }
        if !(self.rollback_lr_factor > 0.0 && self.rollback_lr_factor <= 1.0) {
            return Err(err(
                file,
                "training.rollback_lr_factor",
                format!("must lie in (0, 1], got {}", self.rollback_lr_factor),
            ));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Reads a Hugging Face config.json (transformers 4.51+ or 5.x). Keys phalanx does not use are
    /// ignored; keys HF may omit take HF's defaults; `rope_parameters` (5.x) is understood.
    pub fn load_hf_json(path: &Path) -> Result<ModelConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(&file, "", format!("cannot read: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| err(&file, "", format!("not valid JSON: {e}")))?;
        let obj = json
            .as_object()
            .ok_or_else(|| err(&file, "", "top level is not an object"))?;
        let defaults = serde_json::json!({
            "num_nextn_predict_layers": 0, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 1.0, "norm_topk_prob": true, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "first_k_dense_replace": 0, "moe_layer_freq": 1,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "initializer_range": 0.02, "tie_word_embeddings": false,
            "attention_bias": false, "aux_loss_alpha": 0.001, "seq_aux": true,
        });
        let mut m = serde_json::Map::new();
        for (k, v) in defaults.as_object().into_iter().flatten() {
            m.insert(k.clone(), v.clone());
        }
        for key in MODEL_KEYS {
            if let Some(v) = obj.get(*key).filter(|v| !v.is_null()) {
                m.insert(key.to_string(), v.clone());
            }
        }
        if !m.contains_key("n_routed_experts")
            && let Some(v) = obj.get("num_local_experts")
        {
            m.insert("n_routed_experts".into(), v.clone());
        }
        if !m.contains_key("num_key_value_heads")
            && let Some(v) = obj.get("num_attention_heads")
        {
            m.insert("num_key_value_heads".into(), v.clone());
        }
        if let Some(rp) = obj.get("rope_parameters").and_then(|v| v.as_object()) {
            if let Some(theta) = rp.get("rope_theta") {
                m.insert("rope_theta".into(), theta.clone());
            }
            let kind = rp
                .get("rope_type")
                .or_else(|| rp.get("type"))
                .and_then(|v| v.as_str());
            if kind == Some("yarn") {
                m.insert("rope_scaling".into(), serde_json::Value::Object(rp.clone()));
            }
        }
        if let Some(rs) = m.get("rope_scaling").and_then(|v| v.as_object()) {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str());
            if kind == Some("yarn") {
                let mut clean = serde_json::Map::new();
                clean.insert("type".into(), "yarn".into());
                for k in YARN_KEYS {
                    if let Some(v) = rs.get(*k) {
                        clean.insert(k.to_string(), v.clone());
                    }
                }
                m.insert("rope_scaling".into(), serde_json::Value::Object(clean));
            } else {
                m.remove("rope_scaling");
            }
        }
        let model: ModelConfig = deserialize_named(serde_json::Value::Object(m), &file, "")?;
        model.validate(&file)?;
        Ok(model)
    }

    /// Checks the fields against each other; the first inconsistency is reported by field name.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("moe_layer_freq", self.moe_layer_freq),
        ];
        for (f, v) in nonzero {
            if v == 0 {
                return Err(err(file, f, "must be at least 1"));
            }
        }
        if self.vocab_size < 2 {
            return Err(err(
                file,
                "vocab_size",
                format!("must be at least 2, got {}", self.vocab_size),
            ));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(err(
                file,
                "qk_rope_head_dim",
                format!("must be even for RoPE pairs, got {}", self.qk_rope_head_dim),
            ));
        }
        if self.num_key_value_heads != self.num_attention_heads {
            return Err(err(
                file,
                "num_key_value_heads",
                format!(
                    "MLA needs num_key_value_heads == num_attention_heads ({}), got {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.first_k_dense_replace < self.num_hidden_layers || self.num_nextn_predict_layers > 0
        {
            if self.n_routed_experts == 0 {
                return Err(err(
                    file,
                    "n_routed_experts",
                    "MoE layers need at least one routed expert",
                ));
            }
            if self.moe_intermediate_size == 0 {
                return Err(err(file, "moe_intermediate_size", "must be at least 1"));
            }
        }
        if self.n_routed_experts > 0 {
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                return Err(err(
                    file,
                    "n_group",
                    format!(
                        "n_group ({}) must divide n_routed_experts ({})",
                        self.n_group, self.n_routed_experts
                    ),
                ));
            }
            if self.topk_group > self.n_group {
                return Err(err(
                    file,
                    "topk_group",
                    format!(
                        "topk_group ({}) must not exceed n_group ({})",
                        self.topk_group, self.n_group
                    ),
                ));
            }
            let reachable = self.topk_group * (self.n_routed_experts / self.n_group);
            if self.num_experts_per_tok > reachable {
                return Err(err(
                    file,
                    "num_experts_per_tok",
                    format!(
                        "num_experts_per_tok ({}) exceeds the {} experts in topk_group ({}) groups",
                        self.num_experts_per_tok, reachable, self.topk_group
                    ),
                ));
            }
        }
        if self.scoring_func != "sigmoid" {
            return Err(err(
                file,
                "scoring_func",
                format!(
                    "only \"sigmoid\" (DeepSeek-V3) is supported, got {:?}",
                    self.scoring_func
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(err(
                file,
                "hidden_act",
                format!("only \"silu\" is supported, got {:?}", self.hidden_act),
            ));
        }
        if self.attention_bias {
            return Err(err(
                file,
                "attention_bias",
                "DeepSeek-V3 has no linear biases; must be false",
            ));
        }
        if self.tie_word_embeddings {
            return Err(err(
                file,
                "tie_word_embeddings",
                "DeepSeek-V3 unties embedding and head; must be false",
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(err(file, "rms_norm_eps", "must be positive"));
        }
        Ok(())
    }

    /// Whether decoder layer `l` (0-based, main model) has a MoE FFN.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        l >= self.first_k_dense_replace
            && (l - self.first_k_dense_replace).is_multiple_of(self.moe_layer_freq)
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The attention softmax scale: 1/sqrt(qk_head_dim), times mscale² under YaRN.
    pub fn softmax_scale(&self) -> f32 {
        let base = 1.0 / (self.qk_head_dim() as f32).sqrt();
        match &self.rope_scaling {
            Some(rs) if rs.mscale_all_dim != 0.0 && rs.factor > 1.0 => {
                let m = 0.1 * rs.mscale_all_dim * rs.factor.ln() + 1.0;
                base * m * m
            }
            _ => base,
        }
    }

    /// Parameter counts by formula (reference §1.1, §8): main model, MTP-unique, active per token.
    pub fn param_counts(&self) -> ParamCounts {
        let d = self.hidden_size as u64;
        let h = self.num_attention_heads as u64;
        let (dn, dr, dv) = (
            self.qk_nope_head_dim as u64,
            self.qk_rope_head_dim as u64,
            self.v_head_dim as u64,
        );
        let (ql, kl) = (self.q_lora_rank as u64, self.kv_lora_rank as u64);
        let attn =
            d * ql + ql + ql * h * (dn + dr) + d * (kl + dr) + kl + kl * h * (dn + dv) + h * dv * d;
        let dense = 3 * d * self.intermediate_size as u64;
        let e = self.n_routed_experts as u64;
        let expert = 3 * d * self.moe_intermediate_size as u64;
        let shared = self.n_shared_experts as u64 * expert;
        let moe = e * expert + shared + e * d + e;
        let moe_active = self.num_experts_per_tok as u64 * expert + shared + e * d;
        let v = self.vocab_size as u64;
        let mut main = 2 * v * d + d;
        let mut active = 2 * v * d + d;
        for l in 0..self.num_hidden_layers {
            if self.is_moe_layer(l) {
                main += attn + moe + 2 * d;
                active += attn + moe_active + 2 * d;
            } else {
                main += attn + dense + 2 * d;
                active += attn + dense + 2 * d;
            }
        }
        let mtp =
            self.num_nextn_predict_layers as u64 * (2 * d + 2 * d * d + attn + moe + 2 * d + d);
        ParamCounts { main, mtp, active }
    }
}

/// Parameter totals of a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    pub main: u64,
    pub mtp: u64,
    pub active: u64,
}

impl ParamCounts {
    pub fn total(&self) -> u64 {
        self.main + self.mtp
    }
}

#[cfg(test)]
mod tests;

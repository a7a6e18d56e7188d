//! The DeepSeek-V3 model assembled from the ops: config, named parameters, layers, whole model.
//! Tensor names follow Hugging Face (`model.layers.L.self_attn.q_a_proj.weight`, MTP as layer L = n).

pub mod config;
pub mod deepseek;
pub mod experts;
pub mod layers;
pub mod params;
pub mod stage;

pub use config::{ConfigError, ModelConfig, RunConfig, TrainingConfig};
pub use deepseek::{Batch, DeepSeekV3, Precision, StepStats};
pub use params::{ParamId, ParamStore, TensorSource, WeightGradQueue};

//! The ops of the DeepSeek-V3 model, one module per op, each with forward and split backward.
//! Shapes are explicit arguments; callers own activations and stash what backward needs.

pub mod adamw;
pub mod attention;
pub mod balance;
pub mod cross_entropy;
pub mod embedding;
pub mod linear;
pub mod moe_dispatch;
pub mod moe_gate;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

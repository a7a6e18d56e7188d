//! The ops of the DeepSeek-V3 model, one module per op, each with forward and split backward.
//! Shapes are explicit arguments; callers own activations and stash what backward needs.


//! An expert group whose forward and backward run on a device instead of the CPU model: the
//! [`DeviceExperts`] trait an [`super::ExpertGroup`] hands its blocks to
//! (`kernels::device::model::experts` implements it on any `Backend`). The group keeps its host
//! parameter store (structure, the values it loads); the device keeps its own copy of the
//! parameters and the activations between a block's forward and backward.

use super::ExpertGroup;
use crate::model::layers::{ExpertGrads, ExpertSite};

/// Forward and backward of one expert group's blocks on a device: the same blocks and answers
/// as [`ExpertGroup::forward`] and [`ExpertGroup::backward`] on the CPU model (each expert's
/// weight gradients from zero). Errors are the device's or an out-of-order call's; the group
/// turns them into a panic naming itself, which its supervisor heals.
pub trait DeviceExperts: Send + std::fmt::Debug {
    /// e.g. `cuda:0 NVIDIA H200 …` or `cpu (2 threads)`.
    fn describe(&self) -> String;
    /// The outputs of the `(expert, rows)` blocks at `site`, in block order.
    fn forward(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> Result<Vec<Vec<f32>>, String>;
    /// The input and weight gradients of the `(expert, dy)` blocks at `site`.
    fn backward(
        &mut self,
        group: &ExpertGroup,
        site: ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> Result<Vec<ExpertGrads>, String>;
    /// Activations kept for backward (a count: zero when every forward's backward ran).
    fn stashed(&self) -> usize;
    /// Drops every kept activation (an aborted step).
    fn reset(&mut self);
    /// Uploads the group's parameter values.
    fn load(&mut self, group: &ExpertGroup) -> Result<(), String>;
}

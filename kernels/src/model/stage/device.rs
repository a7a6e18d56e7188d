//! A stage copy whose F, B* and W run on a device instead of the CPU model: the [`DeviceStage`]
//! trait a [`super::StageRunner`] hands its micro-batches to (`kernels::device::model::stage`
//! implements it on any `Backend`). The runner keeps its host [`Stage`] (structure, parameter
//! values for the update, the reduce of shared tensors); the device keeps its own copy of the
//! parameters, the stashes and the gradient sums of the open step.

use super::{GradSums, Stage, StageStats};
use crate::model::deepseek::Batch;

/// F, B* and W of one stage copy on a device. Activations and gradients come and go as host
/// vectors (what the pipeline's wire carries); the gradient sums come back as [`GradSums`], the
/// same sums the CPU runner keeps, so the reduce and the update do not know where they ran.
///
/// Errors are the device's (a refused launch, an allocation) or the schedule's (an order the
/// device cannot keep); the runner turns them into a panic naming the stage, which the stage's
/// supervisor sees as a failure and heals like any other.
pub trait DeviceStage: Send + std::fmt::Debug {
    /// e.g. `cuda:0 NVIDIA H200 …` or `cpu (2 threads)`.
    fn describe(&self) -> String;
    /// F of micro-batch `mb`: the output activations (None on the last stage) and the stats.
    fn forward(
        &mut self,
        stage: &Stage,
        mb: usize,
        batch: &Batch,
        input: Option<Vec<f32>>,
        mtp_weight: f32,
    ) -> Result<(Option<Vec<f32>>, StageStats), String>;
    /// B* of `mb` from the gradient of its output (None on the last stage); the gradient of its
    /// input (None on stage 0).
    fn backward_input(
        &mut self,
        stage: &Stage,
        mb: usize,
        dy: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, String>;
    /// W of `mb`.
    fn backward_weight(&mut self, stage: &Stage, mb: usize) -> Result<(), String>;
    /// Micro-batches whose forward ran and whose backward has not.
    fn stashed(&self) -> usize;
    /// Micro-batches whose W is still owed.
    fn pending_weight(&self) -> usize;
    /// The step's gradient sums, on the host; the device's sums start again from zero.
    fn take_grads(&mut self, stage: &Stage) -> Result<GradSums, String>;
    /// Drops every stash, owed W and gradient (an aborted step).
    fn reset(&mut self);
    /// Uploads the parameter values of `stage` (after a commit or on restore).
    fn load(&mut self, stage: &Stage) -> Result<(), String>;
}

//! A stage copy whose F, B* and W run on a device instead of the CPU model: the [`DeviceStage`]
//! trait a [`super::StageRunner`] hands its micro-batches to (`kernels::device::model::stage`
//! implements it on any `Backend`). The runner keeps its host [`Stage`] (structure, parameter
//! values for the update, the reduce of shared tensors); the device keeps its own copy of the
//! parameters, the stashes and the gradient sums of the open step.

use super::{GradSums, Stage, StageStats};
use crate::model::deepseek::Batch;
use crate::model::layers::ExpertCompute;

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
    /// `experts`: where the MoE layers' routed experts run when not on the device (`--ep`).
    fn forward(
        &mut self,
        stage: &Stage,
        mb: usize,
        batch: &Batch,
        input: Option<Vec<f32>>,
        mtp_weight: f32,
        experts: Option<&mut dyn ExpertCompute>,
    ) -> Result<(Option<Vec<f32>>, StageStats), String>;
    /// B* of `mb` from the gradient of its output (None on the last stage); the gradient of its
    /// input (None on stage 0). `experts` as the forward's.
    fn backward_input(
        &mut self,
        stage: &Stage,
        mb: usize,
        dy: Option<Vec<f32>>,
        experts: Option<&mut dyn ExpertCompute>,
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

/// A device behind a mutex no one else holds (a panic inside it poisons nothing that matters:
/// its owner is dropped with it). Shared by the stage runner and the expert group.
pub(crate) fn lock<T: ?Sized>(d: &std::sync::Mutex<Box<T>>) -> std::sync::MutexGuard<'_, Box<T>> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device whose owner is borrowed mutably: no lock needed.
pub(crate) fn unlocked<T: ?Sized>(d: &mut std::sync::Mutex<Box<T>>) -> &mut Box<T> {
    d.get_mut().unwrap_or_else(|p| p.into_inner())
}

/// `r`, or a panic naming `who` and the device it ran `on` (a failure its supervisor heals).
pub(crate) fn or_panic<T>(r: Result<T, String>, who: &str, on: Option<String>) -> T {
    r.unwrap_or_else(|e| panic!("{who} on {}: {e}", on.unwrap_or_default()))
}

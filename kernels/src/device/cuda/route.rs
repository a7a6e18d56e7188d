//! The CUDA backend's MoE routing (feature `cuda`): on the device through `router.cu` (the
//! group-limited top-k, the dispatch plan, the balance loss and their backward, only the plan's
//! expert offsets and the per-sequence losses copied to the host, each read when the host needs
//! it rather than when it is queued), or, for layers beyond its limits
//! (more than 256 experts, 32 groups or top-8) or with `PHALANX_DEVICE_ROUTER=off`, on the host
//! as the CPU backend does, with the affinities downloaded and the plan uploaded. Never run on a
//! GPU.

use super::backend::CudaBackend;
use super::launch::{DeviceRoute, Gpu, MoePlan, Readback, route_unsupported};
use crate::device::backend::{Backend, BackendResult, Cpu, CpuRoute};
use crate::ops::balance;
use crate::ops::moe_gate::RouteRule;
use cudarc::driver::CudaSlice;

/// A MoE layer's routing on a CUDA device.
pub enum CudaRoute {
    /// Routed by `router.cu`.
    Device(DeviceRoute),
    /// Routed on the host by the CPU backend: its route, the affinities it was made from, and
    /// the plan uploaded.
    Host {
        cpu: CpuRoute,
        s: Vec<f32>,
        plan: MoePlan,
    },
}

impl CudaRoute {
    pub fn plan(&self) -> &MoePlan {
        match self {
            CudaRoute::Device(d) => &d.plan,
            CudaRoute::Host { plan, .. } => plan,
        }
    }

    /// The plan's expert offsets (the first call on a device route waits for their copy).
    pub fn offsets(&self, gpu: &Gpu) -> BackendResult<&[usize]> {
        match self {
            CudaRoute::Device(d) => Ok(d.offsets(gpu)?),
            CudaRoute::Host { cpu, .. } => Ok(&cpu.plan.plan.offsets),
        }
    }
}

/// A MoE layer's balance loss: known on the host (routed there), or its per-sequence values on
/// their way from the device.
pub enum CudaLoss {
    Host(f64),
    /// One loss per sequence of the batch.
    Device(Readback<f64>),
}

impl CudaBackend {
    pub(super) fn route_on(
        &self,
        s: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        rule: &RouteRule,
        e: usize,
    ) -> BackendResult<CudaRoute> {
        let n = s.len() / e.max(1);
        if !self.host_routing && route_unsupported(e, rule).is_none() {
            return Ok(CudaRoute::Device(self.gpu.moe_route(s, bias, n, e, rule)?));
        }
        let s_host = self.gpu.download(s)?;
        let mut bias_host = self.gpu.download(bias)?;
        bias_host.truncate(e);
        let cpu = Cpu::new().route(&s_host, &bias_host, rule, e)?;
        let plan = self.gpu.upload_plan(&cpu.plan)?;
        Ok(CudaRoute::Host {
            cpu,
            s: s_host,
            plan,
        })
    }

    pub(super) fn balance_on(
        &self,
        s: &CudaSlice<f32>,
        r: &CudaRoute,
        (seq, batch): (usize, usize),
        alpha: f32,
    ) -> BackendResult<CudaLoss> {
        match r {
            CudaRoute::Device(d) => {
                let e = s.len() / (seq * batch).max(1);
                let per_seq = self.gpu.moe_balance_forward(s, d, (seq, batch), e, alpha)?;
                Ok(per_seq.map_or(CudaLoss::Host(0.0), CudaLoss::Device))
            }
            CudaRoute::Host { cpu, s, .. } => Ok(CudaLoss::Host(Cpu::new().balance_loss(
                s,
                cpu,
                (seq, batch),
                alpha,
            )?)),
        }
    }

    /// The loss's value: the mean over the batch of the per-sequence losses, as the CPU sums it.
    pub(super) fn read_loss_on(&self, l: CudaLoss) -> BackendResult<f64> {
        match l {
            CudaLoss::Host(v) => Ok(v),
            CudaLoss::Device(per_seq) => {
                let v = self.gpu.read(per_seq)?;
                let batch = v.len();
                Ok(balance::batch_mean(v, batch))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn route_backward_on(
        &self,
        dweights: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
        r: &CudaRoute,
        rule: &RouteRule,
        (seq, batch): (usize, usize),
        alpha: f32,
    ) -> BackendResult<CudaSlice<f32>> {
        let e = s.len() / (seq * batch).max(1);
        match r {
            CudaRoute::Device(d) => {
                let mut ds = self.gpu.moe_route_backward(dweights, s, d, e, rule)?;
                if alpha > 0.0 {
                    // the CPU passes α / batch in f32 to each sequence
                    let a = alpha / batch as f32;
                    self.gpu
                        .moe_balance_backward(&mut ds, s, d, (seq, batch), e, a)?;
                }
                Ok(ds)
            }
            CudaRoute::Host { cpu, s, .. } => {
                let mut dw = self.gpu.download(dweights)?;
                dw.truncate(cpu.routing.weights.len());
                let ds = Cpu::new().route_backward(&dw, s, cpu, rule, (seq, batch), alpha)?;
                Ok(self.gpu.upload(&ds)?)
            }
        }
    }
}

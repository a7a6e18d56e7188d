//! Launch wrappers of `router.cu`: a MoE layer's routing, dispatch plan and balance loss on the
//! device, so that only the plan's offsets (one per expert) and the per-sequence balance losses
//! reach the host, both as readbacks (`readback.rs`) the host waits for only when it reads them.
//! Limits of the kernels: E ≤ 256 experts, ≤ 32 groups, k ≤ 8. Never run on a GPU.

use super::{
    BLOCK, GRID_X_MAX, Gpu, GpuError, MoePlan, Readback, check_len, config, grid_dim, grid_stride,
    int, shape_err,
};
use crate::ops::moe_gate::RouteRule;
use cudarc::driver::{CudaSlice, PushKernelArg};
use std::sync::{Mutex, OnceLock};

/// The kernels' limits (`router.cu`: ROUTE_MAX_E, the group mask, the picked list).
pub const ROUTE_MAX_EXPERTS: usize = 256;
pub const ROUTE_MAX_GROUPS: usize = 32;
pub const ROUTE_MAX_K: usize = 8;

/// A MoE layer's routing on the device.
pub struct DeviceRoute {
    /// [tokens, k] the chosen experts, in selection order.
    pub experts: CudaSlice<u32>,
    pub plan: MoePlan,
    /// The plan's expert offsets (E + 1), on their way to the host.
    offsets: PendingOffsets,
}

/// Expert offsets copied to the host behind the routing kernels: the first `DeviceRoute::offsets`
/// waits for the copy (only for it: the work queued after it goes on), later ones read them.
struct PendingOffsets {
    copy: Mutex<Option<Readback<u32>>>,
    host: OnceLock<Vec<usize>>,
}

impl DeviceRoute {
    /// The plan's expert offsets (E + 1): expert i's rows are `offsets[i]..offsets[i + 1]`.
    pub fn offsets(&self, gpu: &Gpu) -> Result<&[usize], GpuError> {
        if let Some(o) = self.offsets.host.get() {
            return Ok(o);
        }
        let copy = self
            .offsets
            .copy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(copy) = copy {
            let host = gpu.read(copy)?.into_iter().map(|o| o as usize).collect();
            // a second reader that raced here finds it set: the same values either way
            let _ = self.offsets.host.set(host);
        }
        self.offsets.host.get().map(Vec::as_slice).ok_or_else(|| {
            shape_err(
                "moe_route",
                "the expert offsets' copy was lost (an earlier read failed)",
            )
        })
    }
}

/// Why `rule` over `e` experts is beyond the kernels, if it is.
pub fn route_unsupported(e: usize, rule: &RouteRule) -> Option<String> {
    if e == 0 || e > ROUTE_MAX_EXPERTS {
        return Some(format!(
            "{e} experts (the device router takes 1..={ROUTE_MAX_EXPERTS})"
        ));
    }
    if rule.n_group > ROUTE_MAX_GROUPS || (rule.n_group > 1 && !e.is_multiple_of(rule.n_group)) {
        return Some(format!("{} groups of {e} experts", rule.n_group));
    }
    if rule.k == 0 || rule.k > ROUTE_MAX_K || rule.k > e {
        return Some(format!(
            "top-{} (the device router takes 1..={ROUTE_MAX_K})",
            rule.k
        ));
    }
    None
}

impl Gpu {
    /// Routes `n` tokens from their affinities `s [n, e]` and the selection bias, builds the
    /// dispatch plan and queues the copy of its offsets to the host (`DeviceRoute::offsets`).
    pub fn moe_route(
        &self,
        s: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        n: usize,
        e: usize,
        rule: &RouteRule,
    ) -> Result<DeviceRoute, GpuError> {
        let kn = "moe_route";
        if let Some(why) = route_unsupported(e, rule) {
            return Err(shape_err(kn, why));
        }
        check_len(kn, "s", s.len(), n * e)?;
        check_len(kn, "bias", bias.len(), e)?;
        let k = rule.k;
        let total = n * k;
        let mut experts = self.zeros::<u32>(total)?;
        let mut weights = self.zeros::<f32>(total)?;
        let (ni, ei, ki) = (int(kn, "n", n)?, int(kn, "e", e)?, int(kn, "k", k)?);
        let (groups, topk) = (rule.n_group as i32, rule.topk_group as i32);
        let normalize = i32::from(rule.normalize);
        if n > 0 {
            let warps = (BLOCK / 32) as usize;
            let cfg = config((grid_dim(kn, n.div_ceil(warps), GRID_X_MAX)?, 1), BLOCK);
            let mut b = self.stream.launch_builder(self.function(kn)?);
            b.arg(&mut experts).arg(&mut weights).arg(s).arg(bias);
            b.arg(&ni)
                .arg(&ei)
                .arg(&groups)
                .arg(&topk)
                .arg(&ki)
                .arg(&rule.scale)
                .arg(&normalize);
            // SAFETY: moe_route's arguments; s holds n·e, bias e, the outputs n·k (checked); one
            // warp per token, E ≤ 256 and k ≤ 8 (route_unsupported) fit its shared arrays.
            unsafe { b.launch(cfg) }?;
        }
        let total_l = total as i64;
        let mut counts = self.zeros::<u32>(e)?;
        let ex_blocks = config((int(kn, "e", e)? as u32, 1), BLOCK);
        let mut b = self.stream.launch_builder(self.function("moe_plan_count")?);
        b.arg(&mut counts).arg(&experts).arg(&total_l);
        // SAFETY: one block per expert over the n·k entries.
        unsafe { b.launch(ex_blocks) }?;
        let mut offsets = self.zeros::<u32>(e + 1)?;
        let mut token = self.zeros::<u32>(total)?;
        let mut slot = self.zeros::<u32>(total)?;
        let mut row_of = self.zeros::<u32>(total)?;
        let mut b = self.stream.launch_builder(self.function("moe_plan_fill")?);
        b.arg(&mut offsets)
            .arg(&mut token)
            .arg(&mut slot)
            .arg(&mut row_of);
        b.arg(&counts).arg(&experts).arg(&total_l).arg(&ki).arg(&ei);
        // SAFETY: one block per expert; rows r < n·k index the n·k-long outputs.
        unsafe { b.launch(ex_blocks) }?;
        let mut rows_of_token = self.zeros::<u32>(total)?;
        let n_l = n as i64;
        let mut b = self.stream.launch_builder(self.function("moe_plan_rows")?);
        b.arg(&mut rows_of_token).arg(&row_of).arg(&n_l).arg(&ki);
        // SAFETY: grid-stride over tokens; each reads and writes its own k entries.
        unsafe { b.launch(grid_stride(n)) }?;
        let copy = self.readback(&offsets)?;
        Ok(DeviceRoute {
            experts,
            plan: MoePlan::from_parts(token, slot, rows_of_token, weights, total, n, k),
            offsets: PendingOffsets {
                copy: Mutex::new(Some(copy)),
                host: OnceLock::new(),
            },
        })
    }

    /// ds [n, e]: the router's gradient at the chosen experts from dweights [n, k].
    pub fn moe_route_backward(
        &self,
        dweights: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
        route: &DeviceRoute,
        e: usize,
        rule: &RouteRule,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let kn = "moe_route_backward";
        let (n, k) = (route.plan.tokens, rule.k);
        check_len(kn, "dweights", dweights.len(), n * k)?;
        check_len(kn, "s", s.len(), n * e)?;
        let mut ds = self.zeros::<f32>(n * e)?;
        let (n_l, ei, ki) = (n as i64, int(kn, "e", e)?, int(kn, "k", k)?);
        let normalize = i32::from(rule.normalize);
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(&mut ds).arg(dweights).arg(s).arg(&route.experts);
        b.arg(&n_l)
            .arg(&ei)
            .arg(&ki)
            .arg(&rule.scale)
            .arg(&normalize);
        // SAFETY: grid-stride over tokens, each its own rows of ds, s and the n·k entries.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(ds)
    }

    /// α·Σ fᵢPᵢ of each of `batch` sequences of `seq` tokens (`balance::sequence_loss_forward`),
    /// on its way to the host (`Gpu::read`; none for an empty batch).
    pub fn moe_balance_forward(
        &self,
        s: &CudaSlice<f32>,
        route: &DeviceRoute,
        (seq, batch): (usize, usize),
        e: usize,
        alpha: f32,
    ) -> Result<Option<Readback<f64>>, GpuError> {
        let kn = "moe_balance_forward";
        let k = route.plan.k;
        check_len(kn, "s", s.len(), seq * batch * e)?;
        check_len(kn, "experts", route.experts.len(), seq * batch * k)?;
        if batch == 0 {
            return Ok(None);
        }
        let mut loss = self.zeros::<f64>(batch)?;
        let mut tok_sum = self.zeros::<f64>(seq * batch)?;
        let (ti, ei, ki) = (int(kn, "seq", seq)?, int(kn, "e", e)?, int(kn, "k", k)?);
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(&mut loss)
            .arg(&mut tok_sum)
            .arg(s)
            .arg(&route.experts);
        b.arg(&ti).arg(&ei).arg(&ki).arg(&alpha);
        // SAFETY: one block per sequence over its seq·e affinities and seq·k entries, E ≤ 256.
        unsafe { b.launch(config((grid_dim(kn, batch, GRID_X_MAX)?, 1), BLOCK)) }?;
        Ok(Some(self.readback(&loss)?))
    }

    /// ds += ∂(balance loss)/∂s, `alpha_per_seq` = α / batch in f32 as the CPU passes it.
    pub fn moe_balance_backward(
        &self,
        ds: &mut CudaSlice<f32>,
        s: &CudaSlice<f32>,
        route: &DeviceRoute,
        (seq, batch): (usize, usize),
        e: usize,
        alpha_per_seq: f32,
    ) -> Result<(), GpuError> {
        let kn = "moe_balance_backward";
        let k = route.plan.k;
        check_len(kn, "s", s.len(), seq * batch * e)?;
        check_len(kn, "ds", ds.len(), seq * batch * e)?;
        if batch == 0 {
            return Ok(());
        }
        let (ti, ei, ki) = (int(kn, "seq", seq)?, int(kn, "e", e)?, int(kn, "k", k)?);
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(ds)
            .arg(s)
            .arg(&route.experts)
            .arg(&ti)
            .arg(&ei)
            .arg(&ki)
            .arg(&alpha_per_seq);
        // SAFETY: one block per sequence, each its own rows of ds and s, E ≤ 256.
        unsafe { b.launch(config((grid_dim(kn, batch, GRID_X_MAX)?, 1), BLOCK)) }?;
        Ok(())
    }
}

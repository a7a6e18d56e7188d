//! Launch wrappers of the optimizer's kernels: `adamw.cu` (one AdamW step, F32 or BF16 moments)
//! and `grad_norm.cu` (the global gradient L2 norm in two deterministic passes), on device
//! buffers, with host-level twins of `ops::adamw::AdamW::step` and `ops::adamw::global_norm`.
//! Never run on a GPU.

use super::{
    BLOCK, GRID_X_MAX, Gpu, GpuError, check_len, config, grid_dim, grid_stride, int, long,
};
use crate::ops::adamw::{AdamW, Moments, StepConsts};
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use half::bf16;

// SAFETY: `StepConsts` is #[repr(C)] with seven f32 and no padding: the layout of adamw.cu's
// struct of seven floats, which the kernels take by value.
unsafe impl DeviceRepr for StepConsts {}

/// An element type the AdamW kernels store moments in: f32, or bf16 as its bits.
pub trait MomentElem: DeviceRepr {
    const KERNEL: &'static str;
}

impl MomentElem for f32 {
    const KERNEL: &'static str = "adamw_step_f32";
}

impl MomentElem for u16 {
    const KERNEL: &'static str = "adamw_step_bf16";
}

/// Elements of each pass-1 chunk of `grad_norm.cu` (`NORM_CHUNK`) and threads per chunk.
const NORM_CHUNK: usize = 16_384;
const NORM_LANES: usize = 8;

impl Gpu {
    /// One AdamW step on device buffers: `p`, `g` (zeroed afterwards), moments `m`, `v` as f32
    /// or bf16 bits, all of one length.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_dev<M: MomentElem>(
        &self,
        p: &mut CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        m: &mut CudaSlice<M>,
        v: &mut CudaSlice<M>,
        grad_scale: f32,
        c: &StepConsts,
    ) -> Result<(), GpuError> {
        let k = M::KERNEL;
        let n = p.len();
        check_len(k, "g", g.len(), n)?;
        check_len(k, "m", m.len(), n)?;
        check_len(k, "v", v.len(), n)?;
        let nl = long(k, "n", n)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(p)
            .arg(g)
            .arg(m)
            .arg(v)
            .arg(&nl)
            .arg(&grad_scale)
            .arg(c);
        // SAFETY: adamw_step_f32 / adamw_step_bf16 take (float* p, float* g, M* m, M* v,
        // long long n, float grad_scale, StepConsts c) with M float or u16 as `M::KERNEL` pairs
        // them; all four buffers hold n (checked); StepConsts is #[repr(C)] like the CUDA struct;
        // a grid-stride loop, any launch shape.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// `AdamW::step` on the GPU: uploads, steps, downloads `param`, `grad` (zeroed) and the
    /// moments (converted to BF16 first when `opt.bf16_moments`, as the CPU does).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        opt: &AdamW,
        param: &mut [f32],
        grad: &mut [f32],
        grad_scale: f32,
        st: &mut Moments,
        lr: f32,
        t: u64,
        decay: bool,
    ) -> Result<(), GpuError> {
        check_len("adamw_step", "grad", grad.len(), param.len())?;
        if param.is_empty() {
            return Ok(());
        }
        if opt.bf16_moments {
            st.ensure_bf16();
        }
        let c = opt.consts(lr, t, decay);
        let mut dp = self.upload(param)?;
        let mut dg = self.upload(grad)?;
        match st {
            Moments::F32 { m, v } => {
                let (mut dm, mut dv) = (self.upload(m)?, self.upload(v)?);
                self.adamw_step_dev(&mut dp, &mut dg, &mut dm, &mut dv, grad_scale, &c)?;
                *m = self.download(&dm)?;
                *v = self.download(&dv)?;
            }
            Moments::Bf16 { m, v } => {
                let bits = |x: &[bf16]| x.iter().map(|b| b.to_bits()).collect::<Vec<u16>>();
                let (mut dm, mut dv) = (self.upload(&bits(m))?, self.upload(&bits(v))?);
                self.adamw_step_dev(&mut dp, &mut dg, &mut dm, &mut dv, grad_scale, &c)?;
                let back = |x: Vec<u16>| x.into_iter().map(bf16::from_bits).collect();
                *m = back(self.download(&dm)?);
                *v = back(self.download(&dv)?);
            }
        }
        param.copy_from_slice(&self.download(&dp)?);
        grad.copy_from_slice(&self.download(&dg)?);
        Ok(())
    }

    /// Pass 1 of `grad_norm.cu` for every tensor into one buffer of chunk sums, then pass 2:
    /// `out [1]` = the global L2 norm in `global_norm`'s order. `chunk_sums` holds at least the
    /// tensors' chunk counts (⌈len/16384⌉ each) together; the chunk ends are uploaded per call.
    pub fn grad_norm_dev(
        &self,
        out: &mut CudaSlice<f64>,
        chunk_sums: &mut CudaSlice<f64>,
        grads: &[&CudaSlice<f32>],
    ) -> Result<(), GpuError> {
        let k = "grad_norm_chunks";
        let ends = grad_norm_ends(grads.iter().map(|g| g.len()));
        let total = ends.last().copied().unwrap_or(0) as usize;
        check_len(k, "out", out.len(), 1)?;
        if chunk_sums.len() < total {
            let why = format!(
                "chunk_sums holds {}, the tensors need {total}",
                chunk_sums.len()
            );
            return Err(super::shape_err(k, why));
        }
        let mut start = 0usize;
        for (g, &end) in grads.iter().zip(&ends) {
            let chunks = end as usize - start;
            if chunks == 0 {
                continue;
            }
            let nl = long(k, "n", g.len())?;
            let threads = chunks * NORM_LANES;
            let grid = grid_dim(k, threads.div_ceil(BLOCK as usize), GRID_X_MAX)?;
            let mut view = chunk_sums.slice_mut(start..end as usize);
            let mut b = self.stream.launch_builder(self.function(k)?);
            b.arg(&mut view).arg(*g).arg(&nl);
            // SAFETY: grad_norm_chunks takes (double* chunk_sums, const float* x, long long n);
            // the view holds ⌈n/16384⌉ ≥ 1 chunk sums and x n elements; ≥ 8 threads per
            // chunk in blocks of BLOCK (a multiple of 32), as it requires.
            unsafe { b.launch(config((grid, 1), BLOCK)) }?;
            start = end as usize;
        }
        let k = "grad_norm_finish";
        let tensors = int(k, "tensors", grads.len())?;
        let ends_dev = if ends.is_empty() {
            self.zeros::<i64>(1)?
        } else {
            self.upload(&ends)?
        };
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(out).arg(&*chunk_sums).arg(&ends_dev).arg(&tensors);
        // SAFETY: grad_norm_finish takes (double* out, const double* chunk_sums,
        // const long long* tensor_ends, int tensors); out holds 1, ends_dev one end per tensor,
        // the last ≤ chunk_sums.len() (checked); <<<1, 1>>> as it requires.
        unsafe { b.launch(config((1, 1), 1)) }?;
        Ok(())
    }

    /// `ops::adamw::global_norm` on the GPU (uploads every tensor; empty ones add nothing on
    /// the CPU either and are left out).
    pub fn global_norm(&self, grads: &[&[f32]]) -> Result<f64, GpuError> {
        let dev: Vec<CudaSlice<f32>> = grads
            .iter()
            .filter(|g| !g.is_empty())
            .map(|g| self.upload(g))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&CudaSlice<f32>> = dev.iter().collect();
        let total = grad_norm_ends(refs.iter().map(|g| g.len())).last().copied();
        let mut sums = self.zeros::<f64>(total.unwrap_or(0) as usize)?;
        let mut out = self.zeros::<f64>(1)?;
        self.grad_norm_dev(&mut out, &mut sums, &refs)?;
        Ok(self.download(&out)?[0])
    }
}

/// One past each tensor's last chunk in the shared chunk-sum buffer (`grad_norm_finish`'s
/// `tensor_ends`).
pub fn grad_norm_ends(lens: impl Iterator<Item = usize>) -> Vec<i64> {
    lens.scan(0i64, |acc, n| {
        *acc += n.div_ceil(NORM_CHUNK) as i64;
        Some(*acc)
    })
    .collect()
}

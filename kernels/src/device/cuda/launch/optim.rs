//! Launch wrappers of the optimizer's kernels: `adamw.cu` (one AdamW step, F32 or BF16 moments)
//! and `grad_norm.cu` (the global gradient L2 norm in two deterministic passes), on device
//! buffers, with host-level twins of `ops::adamw::AdamW::step` and `ops::adamw::global_norm`.
//! Never run on a GPU.

use super::{GRID_X_MAX, Gpu, GpuError, check_len, config, grid_dim, grid_stride, int, long};
use crate::ops::adamw::{AdamW, Moments, StepConsts};
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use half::bf16;

// SAFETY: `StepConsts` is #[repr(C)] with seven f32 and no padding: the layout of adamw.cu's
// struct of seven floats, which the kernels take by value.
unsafe impl DeviceRepr for StepConsts {}

/// An element type the AdamW kernels store moments in: f32, or bf16 as its bits.
pub trait MomentElem: DeviceRepr {
    const KERNEL: &'static str;
    /// The kernel that updates many tensors in one launch.
    const MANY: &'static str;
}

impl MomentElem for f32 {
    const KERNEL: &'static str = "adamw_step_f32";
    const MANY: &'static str = "adamw_many_f32";
}

impl MomentElem for u16 {
    const KERNEL: &'static str = "adamw_step_bf16";
    const MANY: &'static str = "adamw_many_bf16";
}

/// Elements per block of `adamw_many_*` (`ADAM_CHUNK`).
const ADAM_CHUNK: usize = 4096;

/// One tensor's update for [`Gpu::adamw_many_dev`]: values, gradient (zeroed), moments, constants.
pub type AdamTensor<'a, M> = (
    &'a mut CudaSlice<f32>,
    &'a mut CudaSlice<f32>,
    &'a mut CudaSlice<M>,
    &'a mut CudaSlice<M>,
    StepConsts,
);

/// Elements of each pass-1 chunk of `grad_norm.cu` (`NORM_CHUNK`).
const NORM_CHUNK: usize = 16_384;

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

    /// [`Gpu::adamw_step_dev`] for every tensor of `jobs` in one launch of `adamw_many_*` (each
    /// with its own constants): the same element updates, one launch instead of one per tensor.
    pub fn adamw_many_dev<M: MomentElem>(
        &self,
        jobs: Vec<AdamTensor<'_, M>>,
        grad_scale: f32,
    ) -> Result<(), GpuError> {
        use cudarc::driver::DevicePtrMut;
        let k = M::MANY;
        let stream = &self.stream;
        let (mut ps, mut gs, mut ms, mut vs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut lens, mut consts) = (Vec::new(), Vec::new());
        for (p, g, m, v, c) in jobs {
            let n = p.len();
            check_len(k, "g", g.len(), n)?;
            check_len(k, "m", m.len(), n)?;
            check_len(k, "v", v.len(), n)?;
            ps.push(p.device_ptr_mut(stream).0);
            gs.push(g.device_ptr_mut(stream).0);
            ms.push(m.device_ptr_mut(stream).0);
            vs.push(v.device_ptr_mut(stream).0);
            lens.push(long(k, "n", n)?);
            consts.extend([c.b1, c.b2, c.bc1, c.bc2, c.eps, c.lr, c.wd]);
        }
        let ends = block_ends(lens.iter().map(|&n| n as usize), ADAM_CHUNK);
        let chunks = ends.last().copied().unwrap_or(0);
        if chunks == 0 {
            return Ok(());
        }
        let tensors = int(k, "tensors", lens.len())?;
        let firsts = first_blocks(&ends);
        let (ps, gs, ms, vs) = (
            self.upload(&ps)?,
            self.upload(&gs)?,
            self.upload(&ms)?,
            self.upload(&vs)?,
        );
        let (lens, firsts, consts) = (
            self.upload(&lens)?,
            self.upload(&firsts)?,
            self.upload(&consts)?,
        );
        let grid = grid_dim(k, chunks, GRID_X_MAX)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(&ps).arg(&gs).arg(&ms).arg(&vs);
        b.arg(&lens)
            .arg(&firsts)
            .arg(&tensors)
            .arg(&consts)
            .arg(&grad_scale);
        // SAFETY: adamw_many_f32 / adamw_many_bf16 take (const u64* ps, gs, ms, vs, const long
        // long* lens, const long long* firsts, int tensors, const float* consts, float
        // grad_scale); per tensor its four buffers' addresses (each holding `lens` elements,
        // checked; borrowed mutably from `jobs` for this call, freed only stream-ordered after
        // it), its first chunk (`first_blocks`) and seven constants; one block per ADAM_CHUNK
        // chunk as it requires.
        unsafe { b.launch(config((grid, 1), 256)) }?;
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

    /// The global L2 norm of `grads` in `global_norm`'s order: pass 1 of `grad_norm.cu` for every
    /// tensor in one launch into the chunks' sums of squares (⌈len/16384⌉ per tensor), then pass
    /// 2 on the host over them (`adamw::norm_from_chunk_sums`, the CPU's own finish). Waits for
    /// the device.
    pub fn grad_norm_dev(&self, grads: &[&CudaSlice<f32>]) -> Result<f64, GpuError> {
        use cudarc::driver::DevicePtr;
        let k = "grad_norm_chunks";
        let ends = block_ends(grads.iter().map(|g| g.len()), NORM_CHUNK);
        let total = ends.last().copied().unwrap_or(0);
        let mut chunk_sums = self.zeros::<f64>(total)?;
        if total > 0 {
            let stream = &self.stream;
            let xs: Vec<u64> = grads.iter().map(|g| g.device_ptr(stream).0).collect();
            let lens: Vec<i64> = grads.iter().map(|g| g.len() as i64).collect();
            let tensors = int(k, "tensors", grads.len())?;
            let (xs, lens) = (self.upload(&xs)?, self.upload(&lens)?);
            let firsts = self.upload(&first_blocks(&ends))?;
            let grid = grid_dim(k, total, GRID_X_MAX)?;
            let mut b = self.stream.launch_builder(self.function(k)?);
            b.arg(&mut chunk_sums)
                .arg(&xs)
                .arg(&lens)
                .arg(&firsts)
                .arg(&tensors);
            // SAFETY: grad_norm_chunks takes (double* chunk_sums, const unsigned long long* xs,
            // const long long* lens, const long long* firsts, int tensors); xs and lens give
            // each tensor's address and length (the buffers borrowed from `grads`, alive until
            // the download below has waited for the kernel), firsts its first chunk,
            // chunk_sums one per chunk; one block of 256 (NORM_THREADS) per chunk, as it
            // requires.
            unsafe { b.launch(config((grid, 1), 256)) }?;
        }
        let sums = self.download(&chunk_sums)?;
        Ok(crate::ops::adamw::norm_from_chunk_sums(
            &sums[..total],
            &ends,
        ))
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
        self.grad_norm_dev(&refs)
    }
}

/// One past each tensor's last block of `per_block` elements, the blocks of all tensors
/// numbered in turn (an empty tensor has none).
fn block_ends(lens: impl Iterator<Item = usize>, per_block: usize) -> Vec<usize> {
    lens.scan(0, |acc, n| {
        *acc += n.div_ceil(per_block);
        Some(*acc)
    })
    .collect()
}

/// Each tensor's first block from [`block_ends`], as the kernels' `tensor_of_block` reads them.
fn first_blocks(ends: &[usize]) -> Vec<i64> {
    std::iter::once(0)
        .chain(ends.iter().map(|&e| e as i64))
        .take(ends.len())
        .collect()
}

//! The CUDA backend's Linear GEMMs (feature `cuda`): one GEMM of a Linear in f32 (SGEMM, TF32
//! off) or BF16 (operands rounded on the device, f32 accumulation and output), the backward pair
//! sharing dy's BF16 rounding, a weight's BF16 rounding and FP8 quantisation kept while the model
//! holds its weights (`backend::weight_cache`), and the GEMM ceiling `bench train --device cuda`
//! divides by. Never run on a GPU.

use super::backend::CudaBackend;
use super::fp8_linear::{Quantised, quantize};
use super::launch::{GpuError, LinearGemm};
use crate::device::backend::weight_cache::{Form, Storage};
use crate::device::backend::{BackendResult, GemmPrecision};
use crate::fp8::ScaleLayout;
use cudarc::driver::{CudaSlice, DevicePtr};
use std::sync::Arc;

impl CudaBackend {
    /// The GEMM ceiling of this device in precision `p` through the same cuBLAS call the Linear
    /// layers use (y = x·Wᵀ, n×n×n; f32: SGEMM, TF32 off; BF16: GemmEx with f32 accumulation and
    /// output, operands already rounded): TFLOP/s of the best of `reps` timed calls.
    pub fn gemm_tflops(&self, n: usize, reps: usize, p: GemmPrecision) -> Result<f64, GpuError> {
        let x = self.gpu.upload(&vec![0.5f32; n * n])?;
        let w = self.gpu.upload(&vec![0.25f32; n * n])?;
        let (mut x16, mut w16) = (self.gpu.zeros::<u16>(n * n)?, self.gpu.zeros::<u16>(n * n)?);
        self.gpu.to_bf16(&mut x16, &x)?;
        self.gpu.to_bf16(&mut w16, &w)?;
        let mut y = self.gpu.zeros::<f32>(n * n)?;
        let fwd = LinearGemm::Forward;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) {
            let ms = self.gpu.time_ms(1, || match p {
                GemmPrecision::F32 => self.blas.linear(fwd, &mut y, &x, &w, n, n, n),
                GemmPrecision::Bf16 => self.blas.linear_bf16(fwd, &mut y, &x16, &w16, n, n, n),
            })?;
            best = best.min(ms);
        }
        Ok(2.0 * (n as f64).powi(3) / (best * 1e-3) / 1e12)
    }

    /// `x` rounded to BF16 on the device (bits as u16).
    pub(super) fn bf16(&self, x: &CudaSlice<f32>) -> BackendResult<CudaSlice<u16>> {
        let mut out = self.gpu.zeros::<u16>(x.len())?;
        self.gpu.to_bf16(&mut out, x)?;
        Ok(out)
    }

    /// A buffer as the weight cache knows it.
    pub(super) fn storage(&self, w: &CudaSlice<f32>) -> Storage {
        Storage::one(w.device_ptr(self.gpu.stream()).0, w.len())
    }

    /// Weight `w` rounded to BF16: kept while the weights are held.
    pub(super) fn bf16_weight(&self, w: &CudaSlice<f32>) -> BackendResult<Arc<CudaSlice<u16>>> {
        self.bf16_weights
            .get(Form::Bf16, self.storage(w), || self.bf16(w))
    }

    /// Weight `w` `[dout, din]` quantised in 128×128 blocks: kept while the weights are held.
    pub(super) fn fp8_weight(
        &self,
        w: &CudaSlice<f32>,
        dout: usize,
        din: usize,
    ) -> BackendResult<Arc<Quantised>> {
        let form = Form::Fp8Blocks { dout, din };
        self.fp8_weights.get(form, self.storage(w), || {
            Ok(quantize(
                &self.gpu,
                w,
                dout,
                din,
                ScaleLayout::Block128x128,
            )?)
        })
    }

    /// One Linear GEMM in precision `p` (BF16: both operands rounded on the device first; the
    /// weight of Forward and BackwardInput through [`bf16_weight`](Self::bf16_weight)).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        which: LinearGemm,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        w_or_x: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        match p {
            GemmPrecision::F32 => Ok(self.blas.linear(which, out, a, w_or_x, n, din, dout)?),
            GemmPrecision::Bf16 => {
                let a16 = self.bf16(a)?;
                let b16 = match which {
                    LinearGemm::BackwardWeight => Arc::new(self.bf16(w_or_x)?),
                    _ => self.bf16_weight(w_or_x)?,
                };
                Ok(self
                    .blas
                    .linear_bf16(which, out, &a16, &b16, n, din, dout)?)
            }
        }
    }
    /// dx (+)= dy·W, then dW += dyᵀ·x, with dy rounded to BF16 once for both.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_backward_shared_dy(
        &self,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        (n, din, dout): (usize, usize, usize),
        acc: bool,
        p: GemmPrecision,
    ) -> BackendResult<()> {
        let input = LinearGemm::BackwardInput { acc };
        match p {
            GemmPrecision::F32 => {
                self.gemm(input, dx, dy, w, n, din, dout, p)?;
                self.gemm(LinearGemm::BackwardWeight, dw, dy, x, n, din, dout, p)
            }
            GemmPrecision::Bf16 => {
                let dy16 = self.bf16(dy)?;
                let (w16, x16) = (self.bf16_weight(w)?, self.bf16(x)?);
                self.blas
                    .linear_bf16(input, dx, &dy16, &w16, n, din, dout)?;
                Ok(self.blas.linear_bf16(
                    LinearGemm::BackwardWeight,
                    dw,
                    &dy16,
                    &x16,
                    n,
                    din,
                    dout,
                )?)
            }
        }
    }
}

//! The routed experts' Linear GEMMs in one cuBLAS call (`cublasGemmGroupedBatchedEx`, issue 12):
//! one group per expert with rows, each the GEMM `tensor::plan` gives a Linear (the same
//! operation, leading dimensions and β as `Blas::linear`), operands f32 or BF16, f32 output and
//! accumulation. The operand and output addresses go to the device as pointer arrays. **Never run
//! on a GPU**: a refused call (an unsupported type combination, say) is an error the backend
//! answers by running the groups one by one; cuBLAS may not take BF16 operands with an f32 output
//! grouped, so after such a refusal the same groups go one `cublasGemmEx` each
//! (`one_call: false`), on the same addresses, without copying any rows.

use super::tensor::{Blas, LinearGemm, Plan, blas_err, plan};
use super::{Gpu, GpuError, shape_err};
use cudarc::cublas::sys::{self, cublasComputeType_t, cudaDataType_t};

/// One group: `n` rows, the device addresses of its `a` operand (x or dy rows), its W (or x rows
/// for the weight gradient) and its output, each where the group's values start.
#[derive(Clone, Copy, Debug)]
pub struct Group {
    pub n: usize,
    pub a: u64,
    pub w_or_x: u64,
    pub out: u64,
}

impl Blas {
    /// Every group's Linear GEMM `which` (W `[dout, din]`) in one call (`one_call`), or one call
    /// per group; `bf16`: the operands hold BF16 bits (u16), else f32. Lengths are the caller's
    /// to check (the addresses are raw).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_grouped(
        &self,
        gpu: &Gpu,
        which: LinearGemm,
        groups: &[Group],
        din: usize,
        dout: usize,
        (bf16, one_call): (bool, bool),
    ) -> Result<(), GpuError> {
        self.bind()?;
        let kn = "cublas grouped gemm";
        let groups: Vec<&Group> = groups.iter().filter(|g| g.n > 0).collect();
        if groups.is_empty() {
            return Ok(());
        }
        let count = i32::try_from(groups.len()).map_err(|_| shape_err(kn, "too many groups"))?;
        let mut p = Vec::with_capacity(groups.len());
        for g in &groups {
            // lengths as `plan` wants them: the group's own, so it checks only the shape's fit
            let (a_len, b_len, out_len) = match which {
                LinearGemm::Forward => (g.n * din, dout * din, g.n * dout),
                LinearGemm::BackwardInput { .. } => (g.n * dout, dout * din, g.n * din),
                LinearGemm::BackwardWeight => (g.n * dout, g.n * din, dout * din),
            };
            p.push(plan(which, a_len, b_len, out_len, g.n, din, dout)?);
        }
        if !one_call {
            return self.linear_per_group(&groups, &p, bf16);
        }
        let collect = |f: &dyn Fn(usize) -> i32| (0..p.len()).map(f).collect::<Vec<i32>>();
        let (m, n, k) = (
            collect(&|i| p[i].m),
            collect(&|i| p[i].n),
            collect(&|i| p[i].k),
        );
        let (lda, ldb, ldc) = (
            collect(&|i| p[i].lda),
            collect(&|i| p[i].ldb),
            collect(&|i| p[i].ldc),
        );
        let transa: Vec<_> = p.iter().map(|q| q.transa).collect();
        let transb: Vec<_> = p.iter().map(|q| q.transb).collect();
        let alpha = vec![1.0f32; p.len()];
        let beta: Vec<f32> = p.iter().map(|q| q.beta).collect();
        let size = vec![1i32; p.len()];
        // cuBLAS's A is W (or x), its B the `a` operand, as in `Blas::linear`
        let ptrs_a = gpu.upload(&groups.iter().map(|g| g.w_or_x).collect::<Vec<u64>>())?;
        let ptrs_b = gpu.upload(&groups.iter().map(|g| g.a).collect::<Vec<u64>>())?;
        let ptrs_c = gpu.upload(&groups.iter().map(|g| g.out).collect::<Vec<u64>>())?;
        let stream = &self.stream;
        use cudarc::driver::DevicePtr;
        let (pa, _ra) = ptrs_a.device_ptr(stream);
        let (pb, _rb) = ptrs_b.device_ptr(stream);
        let (pc, _rc) = ptrs_c.device_ptr(stream);
        let ab = if bf16 {
            cudaDataType_t::CUDA_R_16BF
        } else {
            cudaDataType_t::CUDA_R_32F
        };
        // SAFETY: every host array holds one entry per group and lives past the call; the
        // pointer arrays hold, per group, addresses of buffers the caller keeps alive and sized
        // for the group's (m, n, k, ld); alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            sys::cublasGemmGroupedBatchedEx(
                *self.blas.handle(),
                transa.as_ptr(),
                transb.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr().cast(),
                pa as *const *const _,
                ab,
                lda.as_ptr(),
                pb as *const *const _,
                ab,
                ldb.as_ptr(),
                beta.as_ptr().cast(),
                pc as *const *mut _,
                cudaDataType_t::CUDA_R_32F,
                ldc.as_ptr(),
                count,
                size.as_ptr(),
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        }
        .result()
        .map_err(blas_err)
    }

    /// The groups' GEMMs one `cublasGemmEx` each, with the plans and addresses of the grouped
    /// call.
    fn linear_per_group(
        &self,
        groups: &[&Group],
        plans: &[Plan],
        bf16: bool,
    ) -> Result<(), GpuError> {
        for (g, q) in groups.iter().zip(plans) {
            // SAFETY: as the grouped call's: each address holds the values the group's plan
            // describes, in buffers the caller keeps alive until the calls are queued.
            unsafe { self.gemm_ex(q, (g.w_or_x, g.a, g.out), bf16) }?;
        }
        Ok(())
    }
}

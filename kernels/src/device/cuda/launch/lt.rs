//! FP8 GEMMs on the tensor cores through cuBLASLt's block-scaled matmul (issue 12): the operands
//! packed by `fp8_pack.cu` into the layout `fp8::pack` defines (codes K-major, scales
//! `VEC128_32F` or `BLK128x128_32F`), then one `cublasLtMatmul` with E4M3 inputs, an f32 output
//! and FP32 scales, fast accumulation off (the library promotes partial sums to FP32).
//!
//! Row-major `out[m, n] = A[m, k]·B[n, k]ᵀ` is column-major `outᵀ[n, m]`, so cuBLASLt's A is our
//! B (op T over a `k × n` K-major matrix) and its B is our A (op N): the "TN" layout its FP8
//! kernels require. Each shape's descriptor, layouts and heuristic algorithm are prepared once
//! and kept (at most 512; expert GEMMs change their row counts every step); only the scale
//! pointers are set per call. **Never run on a GPU**: the backend checks this path against its
//! own FP8 kernel when it opens (`Fp8Linear::open`) and uses it only if they agree.

use super::{Gpu, GpuError, check_len, grid_stride, long, shape_err};
use crate::fp8::pack::{Gather, Operand, PackedScales, Plan};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PushKernelArg};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

const KN: &str = "cublaslt fp8 gemm";

/// Workspace for cuBLASLt's kernels (32 MiB, NVIDIA's advice for Hopper).
const WORKSPACE: usize = 32 << 20;

fn lt_err(what: &str, e: lt::CublasError) -> GpuError {
    shape_err(KN, format!("{what}: {:?}", e.0))
}

impl Gpu {
    /// One operand of a plan packed from quantised codes and scales in `fp8::gemm`'s layouts.
    pub fn fp8_pack(
        &self,
        op: &Operand,
        codes: &CudaSlice<u8>,
        scales: &CudaSlice<f32>,
    ) -> Result<Packed, GpuError> {
        Ok(Packed {
            codes: self.fp8_pack_codes(&op.codes, codes)?,
            scales: self.fp8_pack_scales(&op.scales, scales)?,
        })
    }

    /// `g` applied to device codes: a new `[rows, ld]` buffer.
    pub fn fp8_pack_codes(
        &self,
        g: &Gather,
        src: &CudaSlice<u8>,
    ) -> Result<CudaSlice<u8>, GpuError> {
        self.pack("fp8_pack_codes", g, src)
    }

    /// `g` applied to device scales: a new `[rows, ld]` buffer.
    pub fn fp8_pack_scales(
        &self,
        g: &Gather,
        src: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>, GpuError> {
        self.pack("fp8_pack_scales", g, src)
    }

    fn pack<T>(
        &self,
        kn: &'static str,
        g: &Gather,
        src: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>, GpuError>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        if src.len() < g.src_extent() {
            return Err(shape_err(
                kn,
                format!(
                    "source has {} elements, the gather reads {}",
                    src.len(),
                    g.src_extent()
                ),
            ));
        }
        let mut dst = self.zeros::<T>(g.len())?;
        if g.is_empty() {
            return Ok(dst);
        }
        let l = |what: &str, v: usize| long(kn, what, v);
        let (rows, cols, rs, cs, ld) = (
            l("rows", g.rows)?,
            l("cols", g.cols)?,
            l("rs", g.rs)?,
            l("cs", g.cs)?,
            l("ld", g.ld)?,
        );
        let mut b = self.stream.launch_builder(self.function(kn)?);
        b.arg(&mut dst)
            .arg(src)
            .arg(&rows)
            .arg(&cols)
            .arg(&rs)
            .arg(&cs)
            .arg(&ld);
        // SAFETY: the arguments are the kernel's; it writes rows·ld elements of `dst` (its
        // length) and reads src up to src_extent (checked); grid-stride over rows·ld.
        unsafe { b.launch(grid_stride(g.len())) }?;
        Ok(dst)
    }
}

/// A cuBLASLt handle, its workspace on the backend's stream, and the prepared GEMMs by shape.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    cache: RefCell<HashMap<PrepKey, Prepared>>,
}

/// (m, n, k, A's ld, B's ld, A's and B's scale modes).
type PrepKey = (usize, usize, usize, usize, usize, i32, i32);

/// Prepared GEMMs kept at most (then the cache starts again).
const CACHE_MAX: usize = 512;

/// One shape's descriptor, layouts and algorithm.
struct Prepared {
    desc: Desc,
    la: Layout,
    lb: Layout,
    lc: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the handle is only used through &self on the one stream it was made for; cuBLASLt
// handles may be used from any thread when calls are not concurrent (the backend is not Sync).
unsafe impl Send for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `Lt::new` and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// A descriptor destroyed when dropped.
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// An operand packed on the device.
pub struct Packed {
    pub codes: CudaSlice<u8>,
    pub scales: CudaSlice<f32>,
}

fn scale_mode(s: PackedScales) -> i32 {
    use sys::cublasLtMatmulMatrixScale_t as M;
    match s {
        PackedScales::Vec128 => M::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32,
        PackedScales::Blk128 { .. } => M::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32,
    }
}

impl Lt {
    /// A handle on `gpu`'s stream; an error (never a panic) without libcublasLt.
    pub fn new(gpu: &Gpu) -> Result<Lt, GpuError> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(shape_err(KN, "libcublasLt could not be loaded"));
        }
        let handle = lt::create_handle().map_err(|e| lt_err("creating the handle", e))?;
        let workspace = gpu.zeros::<u8>(WORKSPACE)?;
        Ok(Lt {
            handle,
            workspace,
            stream: gpu.stream().clone(),
            cache: RefCell::new(HashMap::new()),
        })
    }

    /// The descriptor, layouts and algorithm of `p`'s shapes and scale modes (created once per
    /// shape and kept: the heuristic query is not repeated; the scale pointers are set per call).
    fn prepare(&self, p: &Plan) -> Result<Prepared, GpuError> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cudaDataType_t as T;
        let err = |what: &'static str| move |e| lt_err(what, e);
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, T::CUDA_R_32F)
                .map_err(err("matmul descriptor"))?,
        );
        // cuBLASLt's A is our B (op T), its B our A (op N)
        let (op_t, op_n) = (1i32, 0i32);
        let (mode_a, mode_b) = (scale_mode(p.b.mode), scale_mode(p.a.mode));
        for (attr, v) in [
            (D::CUBLASLT_MATMUL_DESC_TRANSA, &op_t),
            (D::CUBLASLT_MATMUL_DESC_TRANSB, &op_n),
            (D::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_a),
            (D::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_b),
        ] {
            // SAFETY: each attribute is an int32 and `v` points to a live i32.
            unsafe { lt::set_matmul_desc_attribute(desc.0, attr, (v as *const i32).cast(), 4) }
                .map_err(err("matmul attribute"))?;
        }
        let layout = |t: T, rows: usize, cols: usize, ld: usize| -> Result<Layout, GpuError> {
            Ok(Layout(
                lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
                    .map_err(err("matrix layout"))?,
            ))
        };
        let la = layout(T::CUDA_R_8F_E4M3, p.k, p.n, p.b.ld())?;
        let lb = layout(T::CUDA_R_8F_E4M3, p.k, p.m, p.a.ld())?;
        let lc = layout(T::CUDA_R_32F, p.n, p.m, p.n)?;
        let pref = Pref(lt::create_matmul_pref().map_err(err("preference"))?);
        let ws = WORKSPACE as u64;
        // SAFETY: the attribute is a uint64_t byte count.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const u64).cast(),
                8,
            )
        }
        .map_err(err("workspace preference"))?;
        // SAFETY: every descriptor is live here.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0)
        }
        .map_err(err("no algorithm for these shapes and scale modes"))?;
        Ok(Prepared {
            desc,
            la,
            lb,
            lc,
            algo: heuristic.algo,
        })
    }

    /// `out[m, n] = A·Bᵀ` (row-major f32, overwritten) on packed operands.
    pub fn gemm(
        &self,
        out: &mut CudaSlice<f32>,
        p: &Plan,
        a: &Packed,
        b: &Packed,
    ) -> Result<(), GpuError> {
        self.stream.context().bind_to_thread()?;
        if let Some(why) = p.unsupported() {
            return Err(shape_err(KN, why));
        }
        check_len(KN, "out", out.len(), p.m * p.n)?;
        check_len(KN, "A codes", a.codes.len(), p.m * p.a.ld())?;
        check_len(KN, "B codes", b.codes.len(), p.n * p.b.ld())?;
        check_len(KN, "A scales", a.scales.len(), p.a.scales.len())?;
        check_len(KN, "B scales", b.scales.len(), p.b.scales.len())?;
        let key = (
            p.m,
            p.n,
            p.k,
            p.a.ld(),
            p.b.ld(),
            scale_mode(p.a.mode),
            scale_mode(p.b.mode),
        );
        let mut cache = self.cache.borrow_mut();
        if !cache.contains_key(&key) {
            if cache.len() >= CACHE_MAX {
                // expert GEMMs change their row counts every step: keep the cache bounded
                cache.clear();
            }
            let prepared = self.prepare(p)?;
            cache.insert(key, prepared);
        }
        let prep = &cache[&key];
        let stream = &self.stream;
        let (pa, _ra) = a.codes.device_ptr(stream);
        let (pb, _rb) = b.codes.device_ptr(stream);
        let (sa, _rsa) = a.scales.device_ptr(stream);
        let (sb, _rsb) = b.scales.device_ptr(stream);
        let (pw, _rw) = self.workspace.device_ptr(stream);
        let (po, _ro) = out.device_ptr_mut(stream);
        let err = |what: &'static str| move |e| lt_err(what, e);
        use sys::cublasLtMatmulDescAttributes_t as D;
        // cuBLASLt's A is our B: its scales are B's
        for (attr, v) in [
            (D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sb),
            (D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa),
        ] {
            // SAFETY: each attribute is a device pointer and `v` a live u64 address; the
            // descriptor is read when the call below is queued.
            unsafe {
                lt::set_matmul_desc_attribute(prep.desc.0, attr, (v as *const u64).cast(), 8)
            }
            .map_err(err("scale pointer"))?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the codes, scales and output hold what the layouts describe (lengths checked
        // above against the plan); the records keep the buffers alive until the call is queued.
        unsafe {
            lt::matmul(
                self.handle,
                prep.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                pb as *const _,
                prep.la.0,
                pa as *const _,
                prep.lb.0,
                po as *const _,
                prep.lc.0,
                po as *mut _,
                prep.lc.0,
                &prep.algo,
                pw as *mut _,
                WORKSPACE,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(err("matmul"))
    }
}

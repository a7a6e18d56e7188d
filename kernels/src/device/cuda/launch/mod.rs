//! Launching the CUDA C kernels (feature `cuda`): `Gpu` opens a device through cudarc (context and
//! its default stream), compiles every source of `device::cuda` with NVRTC to a cubin for the
//! device's own architecture (or loads it from the kernel cache, `device::kernel_cache`), loads
//! each as a module and keeps its entry points; the typed
//! wrappers in `fp8`, `ops`, `optim` and `attention` check shapes, pick the grid and block each kernel's
//! indexing expects (the launch shapes its `.cu` header states) and launch on the stream.
//!
//! Wrappers take device buffers (`CudaSlice`) so a caller can time kernels without transfers;
//! `upload`, `zeros` and `download` move host slices. Where a CPU function returns a type of its
//! own (`Fp8Tensor`, `Moments`, a norm), a host-level twin takes and returns that type.
//!
//! **Compile-checked only: this code has never run on a GPU.** `kernels/tests/gpu_parity.rs`
//! compares every kernel with its CPU reference when a device is present.

mod attention;
mod fp8;
mod grouped;
mod lt;
mod ops;
mod optim;
mod readback;
mod router;
mod tensor;

pub use crate::ops::adamw::StepConsts;
pub use attention::{ATTENTION_MAX_HEAD_DIM, AttentionShape};
/// The device buffer type the wrappers take, for callers without a cudarc dependency of their own.
pub use cudarc::driver::CudaSlice;
pub use fp8::Fp8Operand;
pub use grouped::Group;
pub use lt::{Lt, Packed};
pub use ops::Indices;
pub use readback::{Pooled, Readback};
pub use router::{DeviceRoute, route_unsupported};
pub use tensor::{Blas, LinearGemm, MoePlan};

use super::SOURCES;
use crate::device::kernel_cache::KernelCache;
use crate::device::nvrtc::{self, CompileError};
use crate::device::{Device, DeviceError, DeviceInfo};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig, ValidAsZeroBits,
    sys::CUevent_flags,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Threads per block for every kernel launched here (a multiple of 32, as the block reductions
/// and the warp-per-tile quantiser require).
pub const BLOCK: u32 = 256;

/// Why a device could not be opened or a kernel not launched.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("{kernel}: {why}")]
    Shape { kernel: &'static str, why: String },
    #[error("kernel {0} is in no loaded module")]
    Missing(&'static str),
}

/// A shape error for `kernel`.
pub(crate) fn shape_err(kernel: &'static str, why: impl Into<String>) -> GpuError {
    GpuError::Shape {
        kernel,
        why: why.into(),
    }
}

/// Ok when `len` is `want`, else a shape error naming the buffer.
pub(crate) fn check_len(
    kernel: &'static str,
    what: &str,
    len: usize,
    want: usize,
) -> Result<(), GpuError> {
    if len == want {
        Ok(())
    } else {
        Err(shape_err(
            kernel,
            format!("{what} has {len} elements, want {want}"),
        ))
    }
}

/// `v` as the kernel's `int`, or a shape error.
pub(crate) fn int(kernel: &'static str, what: &str, v: usize) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| shape_err(kernel, format!("{what} = {v} exceeds a CUDA int")))
}

/// `v` as the kernel's `long long`, or a shape error.
pub(crate) fn long(kernel: &'static str, what: &str, v: usize) -> Result<i64, GpuError> {
    i64::try_from(v).map_err(|_| shape_err(kernel, format!("{what} = {v} exceeds a long long")))
}

/// A grid dimension, or a shape error past `max` (2³¹−1 for x, 65,535 for y).
pub(crate) fn grid_dim(kernel: &'static str, blocks: usize, max: u32) -> Result<u32, GpuError> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= max)
        .ok_or_else(|| {
            shape_err(
                kernel,
                format!("{blocks} blocks exceed the grid limit {max}"),
            )
        })
}

/// The x-dimension limit of a grid.
pub(crate) const GRID_X_MAX: u32 = i32::MAX as u32;
/// The y-dimension limit of a grid.
pub(crate) const GRID_Y_MAX: u32 = 65_535;

/// `grid` blocks of `BLOCK` threads, no dynamic shared memory.
pub(crate) fn config(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch for a grid-stride loop over `n` elements: one thread per element up to 2²⁰ blocks
/// (the loops cover the rest), never an empty grid.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32;
    config((blocks, 1), BLOCK)
}

/// Calls a faster path refused at run time (then run another way): how many, and the first
/// reason, for the backend's description.
#[derive(Debug, Default)]
pub struct Refusals(std::cell::RefCell<(u64, Option<String>)>);

impl Refusals {
    pub fn note(&self, why: &dyn std::fmt::Display) {
        let mut r = self.0.borrow_mut();
        r.0 += 1;
        r.1.get_or_insert_with(|| why.to_string());
    }

    /// (count, first reason).
    pub fn get(&self) -> (u64, Option<String>) {
        self.0.borrow().clone()
    }
}

/// The real architecture of compute capability (major, minor): `sm_90` for 9.0.
pub fn arch_of((major, minor): (i32, i32)) -> String {
    format!("sm_{major}{minor}")
}

/// One CUDA device with every kernel loaded.
pub struct Gpu {
    pub info: DeviceInfo,
    /// The architecture the kernels were compiled for (`sm_90` on an H200).
    pub arch: String,
    /// Time NVRTC took for all sources (or the cache, for the sources it held), and module
    /// loading.
    pub compile_time: Duration,
    /// Sources loaded from the kernel cache instead of compiled.
    pub cache_hits: usize,
    /// The kernel cache's directory (`device::kernel_cache`), None when it is off.
    pub kernel_cache: Option<std::path::PathBuf>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    pinned_u32: readback::PinnedPool<u32>,
    pinned_f64: readback::PinnedPool<f64>,
}

impl Gpu {
    /// Opens CUDA device `ordinal`: probes it (an error, never a panic, without a driver),
    /// compiles every kernel source for its compute capability and loads the cubins.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let info = Device::Cuda(ordinal).probe()?;
        let DeviceInfo::Cuda { capability, .. } = &info else {
            unreachable!("a CUDA probe describes a CUDA device")
        };
        let arch = arch_of(*capability);
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: every buffer of this context is used on its one stream (the default stream;
        // none other is made), so stream order is all the synchronisation a buffer needs; the
        // two events cudarc would otherwise create (and destroy) per allocation are only ever
        // waited on with several streams. Readbacks record their own event (`readback.rs`).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let start = Instant::now();
        let mut functions = HashMap::new();
        let cache = KernelCache::from_env();
        let mut cache_hits = 0;
        for src in SOURCES {
            let (cubin, used) = nvrtc::compile_cached(src, &arch, cache.as_ref())?;
            let module = match ctx.load_module(Ptx::from_binary(cubin)) {
                Ok(m) => {
                    cache_hits += usize::from(used == nvrtc::CacheUse::Hit);
                    m
                }
                // a cached cubin the driver refuses: compile it again (and store the new one)
                Err(_) if used == nvrtc::CacheUse::Hit => {
                    let fresh = nvrtc::compile(src, &arch)?.cubin;
                    if let Some(c) = &cache {
                        let _ = c.store(src.name, &nvrtc::cache_key(src, &arch)?, &fresh);
                    }
                    ctx.load_module(Ptx::from_binary(fresh))?
                }
                Err(e) => return Err(e.into()),
            };
            for &name in src.entry_points {
                functions.insert(name, module.load_function(name)?);
            }
        }
        Ok(Gpu {
            info,
            arch,
            compile_time: start.elapsed(),
            cache_hits,
            kernel_cache: cache.map(|c| c.dir),
            ctx,
            stream,
            functions,
            pinned_u32: Default::default(),
            pinned_f64: Default::default(),
        })
    }

    /// The stream every wrapper launches on (the context's default stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn function(&self, name: &'static str) -> Result<&CudaFunction, GpuError> {
        self.functions.get(name).ok_or(GpuError::Missing(name))
    }

    /// A new device buffer holding `host`.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// A new zeroed device buffer of `n` elements (at least one is allocated).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.alloc_zeros(n.max(1))?)
    }

    /// The buffer's contents on the host, after everything queued before has finished.
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>, GpuError> {
        let host = self.stream.clone_dtoh(dev)?;
        self.stream.synchronize()?;
        Ok(host)
    }

    /// Waits for the stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// Mean milliseconds of one call of `f` (which should only launch), by CUDA events around
    /// `reps` calls after one warm-up call.
    pub fn time_ms(
        &self,
        reps: usize,
        mut f: impl FnMut() -> Result<(), GpuError>,
    ) -> Result<f64, GpuError> {
        f()?;
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags)?;
        for _ in 0..reps.max(1) {
            f()?;
        }
        let end = self.stream.record_event(flags)?;
        let ms = start.elapsed_ms(&end)? as f64;
        Ok(ms / reps.max(1) as f64)
    }
}

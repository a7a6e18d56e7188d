//! Opening the CUDA backend (feature `cuda`): the device and its kernels, cuBLAS, the memory
//! pool's release threshold, the checks at open that decide each fast path (FP8 tensor cores,
//! grouped expert GEMMs, FP8 experts in one launch, BF16 attention on the tensor cores; once per
//! device and process), and
//! the description of what opened. Never run on a GPU.

use super::backend::CudaBackend;
use super::fp8_linear::Fp8Linear;
use super::launch::{Blas, Gpu, GpuError, Refusals};
use crate::device::backend::weight_cache::WeightCache;
use cudarc::driver::sys;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// What the checks at open decided for one device: the FP8 engine (`Fp8Linear::verdict`), and
/// why the grouped expert GEMMs and BF16 attention on the tensor cores are off, if they are.
#[derive(Clone, Debug)]
struct Verdicts {
    fp8: Result<(Option<f64>, usize), String>,
    grouped_off: Option<String>,
    grouped_bf16_refused: bool,
    fp8_grouped: Result<f64, String>,
    gemm_attention_off: Option<String>,
}

/// The verdicts of the first open of each device in this process: later opens of the same device
/// (more stage copies, expert groups, a restarted actor) reuse them instead of checking again.
static VERDICTS: Mutex<BTreeMap<usize, Verdicts>> = Mutex::new(BTreeMap::new());

impl CudaBackend {
    /// Opens device `ordinal` (probe, NVRTC compile of every kernel, cuBLAS handle) and keeps
    /// freed memory in its pool. The checks at open run on the first open of a device in this
    /// process; later opens take their verdicts (`VERDICTS`).
    pub fn open(ordinal: usize) -> Result<CudaBackend, GpuError> {
        let gpu = Gpu::open(ordinal)?;
        let blas = Blas::new(&gpu)?;
        let ctx = gpu.context();
        if ctx.has_async_alloc() {
            // SAFETY: plain driver calls on the context's own device; `pool` is written by the
            // first and read by the second, `threshold` outlives the call.
            unsafe {
                let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
                let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
                if r == sys::CUresult::CUDA_SUCCESS {
                    let mut threshold = u64::MAX;
                    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
                    let r =
                        sys::cuMemPoolSetAttribute(pool, attr, (&mut threshold as *mut u64).cast());
                    if r != sys::CUresult::CUDA_SUCCESS {
                        return Err(super::launch::shape_err(
                            "memory pool",
                            format!("setting the release threshold: {r:?}"),
                        ));
                    }
                }
            }
        }
        let known = VERDICTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ordinal)
            .cloned();
        let fp8 = match &known {
            Some(v) => Fp8Linear::reopen(&gpu, v.fp8.clone()),
            None => Fp8Linear::open(&gpu),
        };
        let mut b = CudaBackend {
            gpu,
            blas,
            fp8,
            grouped_refused: Refusals::default(),
            grouped_off: None,
            fp8_grouped: Err("not checked yet".into()),
            host_routing: std::env::var("PHALANX_DEVICE_ROUTER").is_ok_and(|v| v == "off"),
            grouped_bf16_refused: std::cell::Cell::new(false),
            gemm_attention_off: None,
            checks_reused: known.is_some(),
            reuse_weights: !std::env::var("PHALANX_WEIGHT_REUSE").is_ok_and(|v| v == "off"),
            bf16_weights: WeightCache::default(),
            fp8_weights: WeightCache::default(),
        };
        match known {
            Some(v) => {
                b.grouped_off = v.grouped_off;
                b.grouped_bf16_refused.set(v.grouped_bf16_refused);
                b.fp8_grouped = v.fp8_grouped;
                b.gemm_attention_off = v.gemm_attention_off;
            }
            None => {
                b.grouped_off = b.grouped_check();
                b.fp8_grouped = b.fp8_grouped_check();
                b.gemm_attention_off = b.gemm_attention_check();
                let v = Verdicts {
                    fp8: b.fp8.verdict(),
                    grouped_off: b.grouped_off.clone(),
                    grouped_bf16_refused: b.grouped_bf16_refused.get(),
                    fp8_grouped: b.fp8_grouped.clone(),
                    gemm_attention_off: b.gemm_attention_off.clone(),
                };
                VERDICTS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(ordinal, v);
            }
        }
        Ok(b)
    }
}

impl CudaBackend {
    /// The device and what opened on it: the kernels (from the cache or compiled), the FP8
    /// engine, the expert GEMMs, the routing and BF16 attention (each fast path, or why not).
    pub fn description(&self) -> String {
        let grouped = match self.grouped_refused.get() {
            _ if self.grouped_off.is_some() => format!(
                "expert gemms: one by one ({})",
                self.grouped_off.as_deref().unwrap_or_default()
            ),
            _ if self.grouped_bf16_refused.get() => {
                "expert gemms: grouped, bf16 one cublasGemmEx per expert (cuBLAS refused the grouped call on bf16 operands)".to_string()
            }
            (0, _) => "expert gemms: grouped".to_string(),
            (n, first) => format!(
                "expert gemms: {n} grouped calls refused, run expert by expert (first: {})",
                first.unwrap_or_default()
            ),
        };
        let fp8_experts = match &self.fp8_grouped {
            Ok(a) => format!("fp8 experts: one launch per gemm ({a:.1e} from the expert loop)"),
            Err(why) => format!("fp8 experts: expert by expert ({why})"),
        };
        let routing = if self.host_routing {
            "routing: host (PHALANX_DEVICE_ROUTER=off)"
        } else {
            "routing: device"
        };
        let kernels = match &self.gpu.kernel_cache {
            Some(dir) => format!(
                "kernels: {} of {} sources from the cache {}, {:.1} s to load",
                self.gpu.cache_hits,
                super::SOURCES.len(),
                dir.display(),
                self.gpu.compile_time.as_secs_f64()
            ),
            None => format!(
                "kernels: compiled in {:.1} s, no cache",
                self.gpu.compile_time.as_secs_f64()
            ),
        };
        let attention = match &self.gemm_attention_off {
            None => "bf16 attention: tensor cores".to_string(),
            Some(why) => format!("bf16 attention: the f32 kernel ({why})"),
        };
        let weights = if self.reuse_weights {
            "weights: prepared once per step"
        } else {
            "weights: prepared at every use (PHALANX_WEIGHT_REUSE=off)"
        };
        let checks = if self.checks_reused {
            "; checks at open: this process's first open of the device"
        } else {
            ""
        };
        format!(
            "{} ({}; {kernels}; {}; {grouped}; {fp8_experts}; {routing}; {attention}; {weights}{checks})",
            self.gpu.info,
            self.gpu.arch,
            self.fp8.describe()
        )
    }
}

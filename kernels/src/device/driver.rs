//! The CUDA driver probe (feature `cuda`): loads libcuda through cudarc's dynamic loading, which
//! panics when a library or symbol is missing, so the library is looked for first with cudarc's
//! non-panicking `is_culib_present` and every driver call runs under `catch_unwind`.
//!
//! Only the no-driver path has run (the machines this was written on have no GPU).

use super::{DeviceError, DeviceInfo};
use cudarc::driver::{CudaContext, sys::CUdevice_attribute};

/// Name, capability, SMs and memory of CUDA device `index`, or why there is none.
pub(super) fn probe(index: usize) -> Result<DeviceInfo, DeviceError> {
    // SAFETY: tries to dlopen the candidate names of libcuda; calls nothing in it
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DeviceError::NoDriver(format!(
            "none of {} loads; install the NVIDIA driver or put the directory of libcuda.so.1 on \
             LD_LIBRARY_PATH",
            super::searched_names("cuda")
        )));
    }
    let read = move || -> Result<DeviceInfo, DeviceError> {
        let drv = |e: cudarc::driver::DriverError| DeviceError::Driver(e.to_string());
        let found = CudaContext::device_count().map_err(drv)?.max(0) as usize;
        if index >= found {
            return Err(DeviceError::NoSuchDevice { index, found });
        }
        let ctx = CudaContext::new(index).map_err(drv)?;
        Ok(DeviceInfo::Cuda {
            index,
            name: ctx.name().map_err(drv)?,
            capability: ctx.compute_capability().map_err(drv)?,
            multiprocessors: ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(drv)?,
            memory_bytes: ctx.total_mem().map_err(drv)?,
        })
    };
    std::panic::catch_unwind(read).unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        Err(DeviceError::Driver(format!(
            "libcuda loaded but a driver call failed to load or run: {why}"
        )))
    })
}

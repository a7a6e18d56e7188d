//! GPU peer copies (feature `cuda`, through cudarc): a frame moved from one GPU's memory to
//! another's with `cuMemcpyPeerAsync` (the driver routes it over NVLink when the GPUs are linked,
//! PCIe otherwise; peer access is not enabled explicitly, so it may be staged through the host).
//! libcuda is loaded at run time: without it, or without two GPUs, `PeerCopy::open` fails with a
//! clear error and the job keeps its TCP link.
//!
//! **Not run on multi-GPU hardware**: the machines this was written on have no GPU, or one.

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use std::sync::Arc;

/// Why a peer copy cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no CUDA driver (libcuda could not be loaded): the job uses TCP")]
    NoDriver,
    #[error("{found} CUDA device(s), a peer copy needs devices {a} and {b}: the job uses TCP")]
    NoDevices { found: usize, a: usize, b: usize },
    #[error("CUDA: {0}")]
    Driver(String),
}

/// Whether libcuda can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only probes for the shared library, loads nothing else
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Copies between device `a` and device `b`.
pub struct PeerCopy {
    src: Arc<CudaStream>,
    dst: Arc<CudaStream>,
}

impl PeerCopy {
    pub fn open(a: usize, b: usize) -> Result<PeerCopy, PeerError> {
        if !driver_present() {
            return Err(PeerError::NoDriver);
        }
        let found =
            CudaContext::device_count().map_err(|e| PeerError::Driver(e.to_string()))? as usize;
        if a.max(b) >= found || a == b {
            return Err(PeerError::NoDevices { found, a, b });
        }
        let ca = CudaContext::new(a).map_err(|e| PeerError::Driver(e.to_string()))?;
        let cb = CudaContext::new(b).map_err(|e| PeerError::Driver(e.to_string()))?;
        Ok(PeerCopy {
            src: ca.default_stream(),
            dst: cb.default_stream(),
        })
    }

    /// A frame's bytes on the source device.
    pub fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>, PeerError> {
        self.src
            .clone_htod(bytes)
            .map_err(|e| PeerError::Driver(e.to_string()))
    }

    /// Moves `frame` to the destination device (a peer copy between the two contexts), and
    /// waits for it: the copy is queued on the destination's stream, which nothing orders with
    /// the source's freeing `frame`, so `frame` may be dropped only once it has been read.
    pub fn copy(&self, frame: &CudaSlice<u8>) -> Result<CudaSlice<u8>, PeerError> {
        let driver = |e: cudarc::driver::DriverError| PeerError::Driver(e.to_string());
        let mut out = self.dst.alloc_zeros::<u8>(frame.len()).map_err(driver)?;
        self.dst.memcpy_dtod(frame, &mut out).map_err(driver)?;
        self.dst.synchronize().map_err(driver)?;
        Ok(out)
    }

    /// A frame's bytes back on the host, from the destination device.
    pub fn download(&self, frame: &CudaSlice<u8>) -> Result<Vec<u8>, PeerError> {
        self.dst
            .clone_dtoh(frame)
            .map_err(|e| PeerError::Driver(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_two_gpus_opening_is_a_clear_error_or_a_round_trip() {
        match PeerCopy::open(0, 1) {
            Err(e) => {
                eprintln!("no peer copy here: {e}");
                assert!(e.to_string().contains("uses TCP") || matches!(e, PeerError::Driver(_)));
            }
            Ok(p) => {
                let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
                let there = p.copy(&p.upload(&bytes).unwrap()).unwrap();
                assert_eq!(p.download(&there).unwrap(), bytes);
            }
        }
    }
}

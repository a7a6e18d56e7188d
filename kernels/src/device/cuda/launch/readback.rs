//! Device-to-host copies that do not wait (feature `cuda`): a small buffer the host needs later
//! (a MoE layer's expert offsets, its per-sequence balance losses) is copied on the stream into
//! page-locked memory and read only when the host needs the values, so queueing the step's
//! kernels does not stop to drain the stream at every MoE layer. The page-locked buffers are
//! pooled per element type: allocating one is a driver call far slower than the copy.
//!
//! **Compile-checked only: this code has never run on a GPU.**

use super::{Gpu, GpuError, shape_err};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use std::sync::Mutex;

/// Page-locked buffers of one element type, kept for reuse (at most `POOL_MAX`).
#[doc(hidden)]
pub struct PinnedPool<T>(Mutex<Vec<PinnedHostSlice<T>>>);

impl<T> Default for PinnedPool<T> {
    fn default() -> Self {
        PinnedPool(Mutex::new(Vec::new()))
    }
}

const POOL_MAX: usize = 64;

/// An element type the readbacks pool.
pub trait Pooled: DeviceRepr + ValidAsZeroBits + Copy {
    #[doc(hidden)]
    fn pool(gpu: &Gpu) -> &PinnedPool<Self>;
}

impl Pooled for u32 {
    fn pool(gpu: &Gpu) -> &PinnedPool<u32> {
        &gpu.pinned_u32
    }
}

impl Pooled for f64 {
    fn pool(gpu: &Gpu) -> &PinnedPool<f64> {
        &gpu.pinned_f64
    }
}

/// A copy of `len` elements in flight to page-locked memory; `Gpu::read` waits for it. Its own
/// event marks the copy's end: cudarc records a pinned buffer's event only for streams it
/// synchronises itself (several streams with event tracking), and this backend runs one stream,
/// so the buffer's `as_slice` would not wait. Dropped unread, it waits for the copy before the
/// buffer is freed.
pub struct Readback<T> {
    pinned: Option<PinnedHostSlice<T>>,
    done: CudaEvent,
    len: usize,
}

impl<T> Readback<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Drop for Readback<T> {
    fn drop(&mut self) {
        if self.pinned.is_some() {
            // the copy may still be writing into the buffer freed next; an error here has been
            // recorded by the context and surfaces at its next call
            let _ = self.done.synchronize();
        }
    }
}

impl Gpu {
    /// Queues a copy of `src` (not empty) to the host behind everything queued so far, without
    /// waiting.
    pub fn readback<T: Pooled>(&self, src: &CudaSlice<T>) -> Result<Readback<T>, GpuError> {
        let len = src.len();
        if len == 0 {
            return Err(shape_err("readback", "an empty buffer"));
        }
        // cudarc's copy moves the whole destination (`size_of_val(dst)` bytes), so a pooled
        // buffer serves only a copy of exactly its length: a longer one would read past `src`.
        // The lengths asked are few (a layer's E + 1 offsets, a batch's losses).
        let reused = {
            let mut pool = T::pool(self).0.lock().unwrap_or_else(|p| p.into_inner());
            pool.iter()
                .position(|p| p.len() == len)
                .map(|i| pool.swap_remove(i))
        };
        let mut pinned = match reused {
            Some(p) => p,
            // SAFETY: the buffer is written by the copy below before any element of it is read
            // (`read` waits for `done`); flags 0: cached page-locked memory, which the host reads
            // fast (write-combined memory, cudarc's default, is slow to read).
            None => unsafe { self.ctx.alloc_pinned_with_flags::<T>(len, 0)? },
        };
        self.stream.memcpy_dtoh(src, &mut pinned)?;
        let done = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        Ok(Readback {
            pinned: Some(pinned),
            done,
            len,
        })
    }

    /// The values of a readback, once its copy has finished (the stream's later work goes on).
    pub fn read<T: Pooled>(&self, mut r: Readback<T>) -> Result<Vec<T>, GpuError> {
        r.done.synchronize()?;
        let pinned = r.pinned.take().expect("a readback is read once");
        let values = pinned.as_slice()?.to_vec();
        let mut pool = T::pool(self).0.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(pinned);
        }
        Ok(values)
    }
}

//! Bulk copies past the cache: a snapshot of the training state (gigabytes, written once, read
//! later by another thread) is stored with non-temporal writes, which go straight to memory
//! instead of first reading every destination line and evicting the working set.

/// Below this a plain copy (the cache is not at stake).
const STREAM_MIN: usize = 1 << 16;

/// `dst ← src` (equal lengths), with non-temporal stores for large copies on x86-64.
pub fn stream_copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "a copy between buffers of one size");
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= STREAM_MIN {
        stream_x86(dst, src);
        return;
    }
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
fn stream_x86(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    // plain bytes up to the first 64-byte line of `dst`, whole lines streamed, plain tail
    let head = dst.as_ptr().align_offset(64).min(dst.len());
    dst[..head].copy_from_slice(&src[..head]);
    let lines = (dst.len() - head) / 64;
    let d = dst[head..].as_mut_ptr();
    let s = src[head..].as_ptr();
    for line in 0..lines {
        let at = 64 * line;
        // SAFETY: SSE2 is part of x86-64; `at + 64 <= dst.len() - head == src.len() - head`, so
        // every access is in bounds; `d + at` is 64-byte aligned (the stores need 16); the loads
        // are unaligned loads.
        unsafe {
            for k in 0..4 {
                let v = _mm_loadu_si128(s.add(at + 16 * k) as *const __m128i);
                _mm_stream_si128(d.add(at + 16 * k) as *mut __m128i, v);
            }
        }
    }
    // SAFETY: SSE2; orders the streamed stores before whatever this thread does next.
    unsafe { _mm_sfence() };
    let tail = head + 64 * lines;
    dst[tail..].copy_from_slice(&src[tail..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn equals_a_plain_copy_at_any_offset_and_length() {
        let mut rng = Rng::stream(5, "stream-copy-test");
        let src: Vec<u8> = (0..(STREAM_MIN * 3))
            .map(|_| rng.next_u64() as u8)
            .collect();
        for (off, len) in [
            (0, 0),
            (1, 7),
            (3, STREAM_MIN),
            (0, STREAM_MIN * 2 + 13),
            (17, STREAM_MIN + 64),
        ] {
            let mut dst = vec![0u8; STREAM_MIN * 3];
            stream_copy(&mut dst[off..off + len], &src[off..off + len]);
            assert_eq!(
                &dst[off..off + len],
                &src[off..off + len],
                "offset {off} length {len}"
            );
            assert!(dst[..off].iter().all(|&b| b == 0), "nothing written before");
            assert!(
                dst[off + len..].iter().all(|&b| b == 0),
                "nothing written after"
            );
        }
    }
}

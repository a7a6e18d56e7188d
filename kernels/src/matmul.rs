//! The one GEMM entry point of phalanx on CPU, backed by the `gemm` crate.
//! Every Linear forward, input-gradient and weight-gradient goes through `matmul`.

use gemm::Parallelism;
use std::sync::atomic::{AtomicU64, Ordering};

/// Floating-point operations (2·m·n·k per call) executed by `matmul` since the process started.
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// The running total of GEMM FLOPs, for benchmarks (`phalanx bench`).
pub fn flops_executed() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// Below this many multiply-adds a GEMM runs on the calling thread.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// c[m,n] = op(a)[m,k] · op(b)[k,n], or c += … when `accumulate`.
///
/// `a` is stored `[m,k]` row-major, or `[k,m]` when `trans_a`; `b` is stored `[k,n]`, or `[n,k]`
/// when `trans_b`. The reduction order over k depends only on the shapes, so results are bitwise
/// reproducible for a given thread count.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert_eq!(
        c.len(),
        m * n,
        "matmul: c has {} values, want {m}x{n}",
        c.len()
    );
    assert_eq!(
        a.len(),
        m * k,
        "matmul: a has {} values, want {m}x{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: b has {} values, want {k}x{n}",
        b.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    FLOPS.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
    if k == 0 {
        if !accumulate {
            c.iter_mut().for_each(|v| *v = 0.0);
        }
        return;
    }
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // Inside a rayon worker (e.g. attention over heads) the caller already runs in parallel.
    let parallelism = if m * n * k >= PARALLEL_MIN_FLOPS && rayon::current_thread_index().is_none()
    {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound every index gemm touches: c is m×n with row stride n,
    // a and b are read through the strides computed from their stored shapes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_orientations_match_naive() {
        let mut rng = crate::rng::Rng::new(3);
        for &(m, k, n) in &[(2, 3, 2), (7, 13, 5), (65, 70, 33), (130, 90, 140)] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
                let want = naive(&a, &b, m, k, n, ta, tb);
                let mut c = vec![1.0f32; m * n];
                matmul(&mut c, &a, &b, m, k, n, ta, tb, false);
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{m}x{k}x{n} {ta} {tb}: {x} vs {y}"
                    );
                }
                let mut acc = want.clone();
                matmul(&mut acc, &a, &b, m, k, n, ta, tb, true);
                for (x, y) in acc.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() <= 2e-4 * (1.0 + y.abs()));
                }
            }
        }
    }

    #[test]
    fn row_major_example() {
        // [[1,2,3],[4,5,6]] · [[7,8],[9,10],[11,12]] = [[58,64],[139,154]]
        let mut c = vec![0.0; 4];
        matmul(
            &mut c,
            &[1., 2., 3., 4., 5., 6.],
            &[7., 8., 9., 10., 11., 12.],
            2,
            3,
            2,
            false,
            false,
            false,
        );
        assert_eq!(c, vec![58., 64., 139., 154.]);
    }
}

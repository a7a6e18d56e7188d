//! The one GEMM entry point of phalanx on CPU: OpenBLAS (single-threaded calls, split over the
//! rayon threads by us) when it was found at build time, else the pure-Rust `gemm` crate.

use std::sync::atomic::{AtomicU64, Ordering};

/// Which library computes `matmul` in this process.
pub fn backend() -> String {
    #[cfg(openblas)]
    if let Some(s) = openblas_split() {
        let cols = match s.cols {
            Some(c) => format!("columns at multiples of {c}"),
            None => "columns never".into(),
        };
        return format!(
            "OpenBLAS (single-threaded calls split over rayon threads: rows at multiples of {}, {cols})",
            s.rows
        );
    }
    "gemm crate (x86-v4)".into()
}

/// Where OpenBLAS's calls may be split over threads and still give the unsplit bits: at
/// multiples of `rows` rows, and of `cols` columns when some alignment keeps those too.
#[cfg(openblas)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Split {
    rows: usize,
    cols: Option<usize>,
}

/// OpenBLAS's split in this process, or None when it is not used. It is used only when linked
/// and built thread-safe (a sequential USE_THREAD=0 build shares one buffer pool between callers,
/// and concurrent calls then return wrong values, as Debian's libopenblas0-serial did) and when
/// some row alignment keeps the unsplit bits on this CPU's micro-kernel (`Split::probe`: 24 on
/// the Zen kernel, whose column splits never do; 16 or 64 on others). Else the gemm crate.
#[cfg(openblas)]
fn openblas_split() -> Option<Split> {
    static SPLIT: std::sync::OnceLock<Option<Split>> = std::sync::OnceLock::new();
    *SPLIT.get_or_init(|| {
        if openblas::init_thread_safe() {
            Split::probe()
        } else {
            None
        }
    })
}

/// The smallest multiple of this process's row alignment that is at least `rows`: a caller that
/// cuts a product into blocks of rows starting at multiples of it gets the uncut product's bits
/// (OpenBLAS's tiles start there; the gemm crate keeps the bits at any 128 rows, as before).
pub fn row_block(rows: usize) -> usize {
    #[cfg(openblas)]
    if let Some(s) = openblas_split() {
        return rows.div_ceil(s.rows).max(1) * s.rows;
    }
    rows
}

/// Floating-point operations (2·m·n·k per call) executed by `matmul` since the process started.
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// The running total of GEMM FLOPs, for benchmarks (`phalanx bench`).
pub fn flops_executed() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

thread_local! {
    /// Per-thread buffer for the product of an accumulating `matmul`.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
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
    // Inside a rayon worker (e.g. attention over heads, experts) the caller already runs in parallel.
    let threads = if m * n * k >= PARALLEL_MIN_FLOPS && rayon::current_thread_index().is_none() {
        rayon::current_num_threads()
    } else {
        1
    };
    matmul_threads(c, a, b, m, k, n, trans_a, trans_b, accumulate, threads);
}

/// `matmul` on `threads` threads. Accumulating adds the finished product (c + a·b), never a
/// library's in-place accumulation (BLAS beta = 1, gemm's read_dst), which folds c into the
/// K-block partial sums: a sum of products must not depend on how it was split into calls (per
/// micro-batch or per step).
#[allow(clippy::too_many_arguments)]
fn matmul_threads(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    threads: usize,
) {
    if accumulate {
        // the product goes to this thread's reused scratch buffer (a nested call on the same
        // thread, e.g. from rayon work-stealing, finds it taken and allocates its own)
        let mut prod = SCRATCH.with(|s| s.take());
        prod.clear();
        prod.resize(m * n, 0.0);
        product(&mut prod, a, b, m, k, n, trans_a, trans_b, threads);
        if threads > 1 {
            use rayon::prelude::*;
            const CHUNK: usize = 1 << 15;
            c.par_chunks_mut(CHUNK)
                .zip(prod.par_chunks(CHUNK))
                .for_each(|(c, p)| c.iter_mut().zip(p).for_each(|(x, p)| *x += p));
        } else {
            c.iter_mut().zip(&prod).for_each(|(x, p)| *x += p);
        }
        SCRATCH.with(|s| s.set(prod));
    } else {
        product(c, a, b, m, k, n, trans_a, trans_b, threads);
    }
}

/// c = a·b on the backend of this process.
#[allow(clippy::too_many_arguments)]
fn product(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    threads: usize,
) {
    #[cfg(openblas)]
    if openblas_split().is_some() {
        openblas_gemm(c, a, b, m, k, n, trans_a, trans_b, threads);
        return;
    }
    gemm_crate(c, a, b, m, k, n, trans_a, trans_b, threads);
}

#[allow(clippy::too_many_arguments)]
fn gemm_crate(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    threads: usize,
) {
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
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `matmul` asserted the lengths: c is m×n with row stride n, a and b are read through
    // the strides of their stored shapes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
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

#[cfg(openblas)]
mod openblas {
    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    #[link(name = "openblas")]
    unsafe extern "C" {
        fn cblas_sgemm(
            layout: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn openblas_set_num_threads(n: i32);
        fn openblas_get_parallel() -> i32;
    }

    /// Switches OpenBLAS's own threads off (phalanx splits the work itself, so the split and the
    /// result depend only on shapes) and says whether concurrent calls are safe.
    pub fn init_thread_safe() -> bool {
        // SAFETY: plain FFI calls without pointers.
        unsafe {
            openblas_set_num_threads(1);
            openblas_get_parallel() != 0
        }
    }

    /// One single-threaded sgemm on raw row-major operands.
    ///
    /// # Safety
    /// The pointers must address matrices of the given shapes and leading dimensions, and `c`'s
    /// block must not be written by anyone else during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        m: usize,
        k: usize,
        n: usize,
        trans_a: bool,
        trans_b: bool,
    ) {
        let (ta, tb) = (
            if trans_a { TRANS } else { NO_TRANS },
            if trans_b { TRANS } else { NO_TRANS },
        );
        let beta = 0.0;
        unsafe {
            cblas_sgemm(
                ROW_MAJOR, ta, tb, m as i32, n as i32, k as i32, 1.0, a, lda as i32, b, ldb as i32,
                beta, c, ldc as i32,
            )
        }
    }
}

/// A raw pointer handed to the threads that write disjoint blocks of one output.
#[cfg(openblas)]
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
#[cfg(openblas)]
impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, which is `Send`).
    fn get(self) -> *mut f32 {
        self.0
    }
}
#[cfg(openblas)]
// SAFETY: each thread writes a disjoint block of the matrix behind the pointer (see gemm_backend).
unsafe impl Send for SendPtr {}
#[cfg(openblas)]
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for SendPtr {}

#[cfg(openblas)]
#[allow(clippy::too_many_arguments)]
fn openblas_gemm(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    threads: usize,
) {
    // split the larger of m and n into one block per thread, at multiples of the split's
    // alignment: OpenBLAS computes a tile of its micro-kernel the same way wherever the call
    // starts, but an edge tile differently, so blocks that start on a tile boundary give the
    // unsplit bits (columns only where the probe found that true; rows otherwise)
    let split = openblas_split().expect("openblas_gemm runs only when OpenBLAS is used");
    let (split_rows, align) = match split.cols {
        Some(c) if n > m => (false, c),
        _ => (true, split.rows),
    };
    let len = if split_rows { m } else { n };
    let tiles = len.div_ceil(align);
    let parts = threads.min(tiles).max(1);
    let out = SendPtr(c.as_mut_ptr());
    let run = |i: usize| {
        let lo = (tiles * i / parts * align).min(len);
        let hi = (tiles * (i + 1) / parts * align).min(len);
        // SAFETY: block i covers rows (or columns) lo..hi of c only; a and b are read within the
        // shapes `matmul` asserted.
        unsafe {
            block(
                out.get(),
                a,
                b,
                (m, k, n),
                (trans_a, trans_b),
                split_rows,
                lo..hi,
            )
        }
    };
    if parts == 1 {
        run(0);
    } else {
        use rayon::prelude::*;
        (0..parts).into_par_iter().for_each(run);
    }
}

/// Rows (or columns) `span` of c = op(a)·op(b) in one single-threaded OpenBLAS call.
///
/// # Safety
/// `c` must address the whole m×n output, written by no one else in `span`'s rows (columns).
#[cfg(openblas)]
unsafe fn block(
    c: *mut f32,
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    (trans_a, trans_b): (bool, bool),
    rows: bool,
    span: std::ops::Range<usize>,
) {
    let lda = if trans_a { m } else { k };
    let ldb = if trans_b { k } else { n };
    let (lo, hi) = (span.start, span.end);
    // the block's offsets into c, a and b, and its rows and columns
    let (c_off, a_off, b_off, bm, bn) = if rows {
        (lo * n, if trans_a { lo } else { lo * k }, 0, hi - lo, n)
    } else {
        (lo, 0, if trans_b { lo * k } else { lo }, m, hi - lo)
    };
    unsafe {
        let (ap, bp) = (a.as_ptr().add(a_off), b.as_ptr().add(b_off));
        openblas::sgemm(
            c.add(c_off),
            n,
            ap,
            lda,
            bp,
            ldb,
            bm,
            k,
            bn,
            trans_a,
            trans_b,
        );
    }
}

#[cfg(openblas)]
impl Split {
    /// Alignments tried, smallest first (micro-kernel tiles are 4 to 32 wide).
    const ALIGNS: [usize; 9] = [16, 24, 32, 48, 64, 96, 128, 192, 384];

    /// The smallest alignment of rows (and of columns) at which a split call gives the unsplit
    /// bits on this CPU, or None when no row alignment does.
    fn probe() -> Option<Split> {
        let find = |rows| {
            Self::ALIGNS
                .into_iter()
                .find(|&al| Self::keeps_bits(al, rows))
        };
        Some(Split {
            rows: find(true)?,
            cols: find(false),
        })
    }

    /// Whether calls split at `al` rows (columns) and `2·al`, with an edge tile after, equal the
    /// unsplit call bit for bit in every orientation, for k within and past one block of k.
    fn keeps_bits(al: usize, rows: bool) -> bool {
        let mut rng = crate::rng::Rng::new(al as u64);
        let len = 2 * al + 13;
        for k in [64, 600] {
            for other in [17, 100] {
                let (m, n) = if rows { (len, other) } else { (other, len) };
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
                for t in [(false, false), (false, true), (true, false), (true, true)] {
                    let (mut whole, mut split) = (vec![0f32; m * n], vec![0f32; m * n]);
                    // SAFETY: each call writes its own span of a buffer of the whole output
                    unsafe {
                        block(whole.as_mut_ptr(), &a, &b, (m, k, n), t, rows, 0..len);
                        for span in [0..al, al..2 * al, 2 * al..len] {
                            block(split.as_mut_ptr(), &a, &b, (m, k, n), t, rows, span);
                        }
                    }
                    if whole
                        .iter()
                        .zip(&split)
                        .any(|(x, y)| x.to_bits() != y.to_bits())
                    {
                        return false;
                    }
                }
            }
        }
        true
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
    fn result_does_not_depend_on_the_thread_split() {
        // a GEMM called inside a rayon worker runs unsplit; the pipelined and the plain step must
        // still agree bit for bit, so the split may not change any value
        let mut rng = crate::rng::Rng::new(4);
        for &(m, k, n) in &[
            (300, 200, 100),
            (64, 512, 700),
            (1024, 128, 96),
            (33, 1000, 17),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
                let mut one = vec![0.0f32; m * n];
                let mut two = vec![0.0f32; m * n];
                let mut c1 = one.clone();
                matmul_threads(&mut one, &a, &b, m, k, n, ta, tb, false, 1);
                matmul_threads(&mut two, &a, &b, m, k, n, ta, tb, false, 2);
                // accumulating adds the finished product: c + a·b equals the sum of two calls
                matmul_threads(&mut c1, &a, &b, m, k, n, ta, tb, false, 2);
                matmul_threads(&mut c1, &a, &b, m, k, n, ta, tb, true, 1);
                let twice: Vec<f32> = one.iter().map(|v| v + v).collect();
                assert!(c1 == twice, "{m}x{k}x{n}: accumulate is not c + product");
                assert!(
                    one == two,
                    "{m}x{k}x{n} {ta} {tb}: split changed the result"
                );
            }
        }
    }

    #[test]
    fn concurrent_calls_return_the_serial_results() {
        // stage actors and experts call matmul from several threads at once; a BLAS whose calls
        // share buffers (a sequential OpenBLAS build) fails this
        let mut rng = crate::rng::Rng::new(5);
        let shapes = [
            (16, 32, 16),
            (16, 16, 32),
            (32, 64, 16),
            (8, 16, 48),
            (64, 16, 32),
        ];
        let cases: Vec<_> = shapes
            .iter()
            .map(|&(m, k, n)| {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
                let mut c = vec![0.0f32; m * n];
                matmul(&mut c, &a, &b, m, k, n, false, true, false);
                (m, k, n, a, b, c)
            })
            .collect();
        let bad: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|t| {
                    let cases = &cases;
                    s.spawn(move || {
                        let mut bad = 0;
                        for i in 0..3000 {
                            let (m, k, n, a, b, want) = &cases[(i * 7 + t) % cases.len()];
                            let mut c = vec![0.0f32; m * n];
                            matmul(&mut c, a, b, *m, *k, *n, false, true, false);
                            bad += (c != *want) as usize;
                        }
                        bad
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(
            bad,
            0,
            "{bad} of 9000 concurrent GEMMs differ ({})",
            backend()
        );
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

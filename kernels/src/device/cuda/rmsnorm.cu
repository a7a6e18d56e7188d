// RMSNorm over the last dimension. Mirrors kernels/src/ops/rmsnorm.rs: forward, backward_input,
// backward_weight, with the CPU's formulas and operation order (no FMA contraction). The row
// reductions (Σx², Σ dy·w·x·rstd) use a fixed block tree, so forward and backward_input match the
// CPU to rounding, not bit for bit; backward_weight sums rows in the CPU's order (same bits).
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// rmsnorm.rs: forward. y[n,d] = w ⊙ x · rstd, rstd[n] = 1/sqrt(mean(x²)+eps).
// One block per row (grid = n), blockDim.x a multiple of 32 (256 intended).
extern "C" __global__ void rmsnorm_forward(float* __restrict__ y, float* __restrict__ rstd,
                                           const float* __restrict__ x, const float* __restrict__ w,
                                           int d, float eps) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * d;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += xr[j] * xr[j];
    const float ms = block_sum(acc, sh) / (float)d;
    const float r = 1.0f / sqrtf(ms + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) y[row * d + j] = w[j] * (xr[j] * r);
    if (threadIdx.x == 0) rstd[row] = r;
}

// rmsnorm.rs: backward_input. dx (+)= rstd·(w⊙dy − x̂·mean(w⊙dy⊙x̂)), x̂ = x·rstd.
// One block per row (grid = n), blockDim.x a multiple of 32; accumulate ≠ 0 adds into dx.
extern "C" __global__ void rmsnorm_backward_input(float* __restrict__ dx, const float* __restrict__ dy,
                                                  const float* __restrict__ x,
                                                  const float* __restrict__ rstd,
                                                  const float* __restrict__ w, int d, int accumulate) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const float r = rstd[row];
    const float* g = dy + row * d;
    const float* xr = x + row * d;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += g[j] * w[j] * xr[j] * r;
    const float mean = block_sum(acc, sh) / (float)d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = r * (g[j] * w[j] - xr[j] * r * mean);
        float* o = dx + row * d + j;
        *o = accumulate ? *o + v : v;
    }
}

// rmsnorm.rs: backward_weight. dw[j] += Σ_n dy[n,j]·x[n,j]·rstd[n], rows in order: each column
// is summed by one thread, so no two threads touch one dw[j] (deterministic without atomics, the
// CPU's bits). A block owns RBW_COLS columns; its threads stage the products of RBW_ROWS rows at
// a time into shared memory, all of a thread's loads issued together (a lone thread walking n rows
// would wait on memory at every few rows), then its first warp adds them in row order.
// grid = ⌈d/RBW_COLS⌉, blockDim.x = RBW_THREADS.
#define RBW_COLS 32
#define RBW_ROWS 256
#define RBW_THREADS 256
extern "C" __global__ void __launch_bounds__(RBW_THREADS)
rmsnorm_backward_weight(float* __restrict__ dw, const float* __restrict__ dy,
                        const float* __restrict__ x, const float* __restrict__ rstd, int n, int d) {
    __shared__ float prod[RBW_ROWS][RBW_COLS];  // 32 KiB
    const int c = threadIdx.x % RBW_COLS;
    const int j = blockIdx.x * RBW_COLS + c;
    const bool summer = threadIdx.x < RBW_COLS;
    float g = summer && j < d ? dw[j] : 0.0f;
    for (int base = 0; base < n; base += RBW_ROWS) {
        const int rows = min(RBW_ROWS, n - base);
#pragma unroll
        for (int k = 0; k < RBW_ROWS * RBW_COLS / RBW_THREADS; k++) {
            const int r = threadIdx.x / RBW_COLS + k * (RBW_THREADS / RBW_COLS);
            if (r < rows && j < d) {
                const long long row = (long long)base + r;
                prod[r][c] = dy[row * d + j] * x[row * d + j] * rstd[row];
            }
        }
        __syncthreads();
        if (summer)
            for (int r = 0; r < rows; r++) g += prod[r][c];
        __syncthreads();
    }
    if (summer && j < d) dw[j] = g;
}

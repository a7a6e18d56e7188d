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

// rmsnorm.rs: backward_weight. dw[j] += Σ_n dy[n,j]·x[n,j]·rstd[n], rows in order (one thread per
// column, so no two threads touch one dw[j]: deterministic without atomics and the CPU's bits).
// grid = ⌈d/blockDim.x⌉, any block size. Parallel over columns only: slow for long n (to measure).
extern "C" __global__ void rmsnorm_backward_weight(float* __restrict__ dw, const float* __restrict__ dy,
                                                   const float* __restrict__ x,
                                                   const float* __restrict__ rstd, int n, int d) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float g = dw[j];
    for (long long row = 0; row < n; row++) g += dy[row * d + j] * x[row * d + j] * rstd[row];
    dw[j] = g;
}

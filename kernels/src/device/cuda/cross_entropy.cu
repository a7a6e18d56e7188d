// Softmax cross-entropy over a vocabulary. Mirrors kernels/src/ops/cross_entropy.rs: forward
// (per-row loss, then their f64 sum in row order) and backward_input (dlogits = scale·(softmax −
// onehot)), same formulas without FMA contraction. The row max is exact; Σ exp(x − max) uses a
// fixed block tree (the CPU adds in column order), so rows match to rounding; the f64 sum of the
// row losses is the CPU's order. One block per row, blockDim.x a multiple of 32 (256 intended).
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// cross_entropy.rs: forward, per row: loss[n] = ln Σ exp(x − max) + max − x[target].
extern "C" __global__ void cross_entropy_forward_rows(float* __restrict__ loss,
                                                     const float* __restrict__ logits,
                                                     const u32* __restrict__ targets, int v) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const float* x = logits + row * v;
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m, sh);
    float acc = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) acc += expf(x[j] - m);
    const float sum = block_sum(acc, sh);
    if (threadIdx.x == 0) loss[row] = logf(sum) + m - x[targets[row]];
}

// cross_entropy.rs: forward's total, Σ_n loss[n] in f64 in row order (as the CPU adds per_row).
// One block of CE_SUM_THREADS: the losses pass through shared memory CE_SUM_SLICE at a time,
// loaded by every thread, and thread 0 adds them in order (one thread reading them from global
// memory would wait on every few rows). <<<1, CE_SUM_THREADS>>>.
#define CE_SUM_SLICE 4096
#define CE_SUM_THREADS 256
extern "C" __global__ void __launch_bounds__(CE_SUM_THREADS)
cross_entropy_sum(double* __restrict__ out, const float* __restrict__ loss, long long n) {
    __shared__ float slice[CE_SUM_SLICE];
    double acc = -0.0;
    for (long long base = 0; base < n; base += CE_SUM_SLICE) {
        const int len = (int)min((long long)CE_SUM_SLICE, n - base);
        for (int j = threadIdx.x; j < len; j += blockDim.x) slice[j] = loss[base + j];
        __syncthreads();
        if (threadIdx.x == 0)
            for (int j = 0; j < len; j++) acc += (double)slice[j];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = acc;
}

// cross_entropy.rs: backward_input. dlogits[n,:] = scale·softmax(logits[n]) − scale·onehot(target).
extern "C" __global__ void cross_entropy_backward_input(float* __restrict__ dlogits,
                                                        const float* __restrict__ logits,
                                                        const u32* __restrict__ targets, int v,
                                                        float scale) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const float* x = logits + row * v;
    float* d = dlogits + row * v;
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m, sh);
    float acc = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float e = expf(x[j] - m);
        d[j] = e;  // each element is read back below by the thread that wrote it
        acc += e;
    }
    const float inv = scale / block_sum(acc, sh);
    const u32 t = targets[row];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float g = d[j] * inv;
        d[j] = (u32)j == t ? g - scale : g;
    }
}

// The global gradient L2 norm, two passes and no atomics. Mirrors kernels/src/ops/adamw.rs:
// global_norm and sum_of_squares bit for bit: each tensor in 16 Ki-element chunks, each chunk over
// 8 lanes (lane l takes elements l, l+8, … of the chunk, x·x in f64), the lanes of a chunk added
// in order, then (pass 2) a tensor's chunks in order, the tensors in order, and the square root.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

#define NORM_CHUNK 16384
#define NORM_LANES 8

// Pass 1, one tensor: chunk_sums[k] = Σ over chunk k. Eight consecutive threads per chunk; launch
// at least ⌈n/16384⌉·8 threads, blockDim.x a multiple of 32 (every thread reaches the shuffles).
extern "C" __global__ void grad_norm_chunks(double* __restrict__ chunk_sums, const float* __restrict__ x,
                                            long long n) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long chunk = t / NORM_LANES;
    const int lane = (int)(t % NORM_LANES);
    const long long start = chunk * NORM_CHUNK;
    const long long end = min(start + NORM_CHUNK, n);
    double acc = 0.0;
    for (long long i = start + lane; i < end; i += NORM_LANES) {
        double v = (double)x[i];
        acc += v * v;
    }
    // the chunk's lanes in order, from lane 0's thread (as `lanes.iter().sum()`)
    const int base = (threadIdx.x & 31) & ~(NORM_LANES - 1);
    double sum = -0.0;
    for (int l = 0; l < NORM_LANES; l++) sum += __shfl_sync(FULL_MASK, acc, base + l);
    if (lane == 0 && start < n) chunk_sums[chunk] = sum;
}

// Pass 2: the norm. chunk_sums holds every tensor's chunks back to back; tensor_ends[i] is the
// index one past tensor i's last chunk. One thread: <<<1, 1>>>; out[0] = sqrt(Σ_tensors Σ_chunks).
extern "C" __global__ void grad_norm_finish(double* __restrict__ out, const double* __restrict__ chunk_sums,
                                            const long long* __restrict__ tensor_ends, int tensors) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double total = -0.0;
    long long k = 0;
    for (int i = 0; i < tensors; i++) {
        double ts = -0.0;
        for (; k < tensor_ends[i]; k++) ts += chunk_sums[k];
        total += ts;
    }
    out[0] = sqrt(total);
}

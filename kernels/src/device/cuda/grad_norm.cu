// The global gradient L2 norm, two passes and no atomics. Mirrors kernels/src/ops/adamw.rs:
// global_norm and sum_of_squares bit for bit: each tensor in 16 Ki-element chunks, each chunk over
// 8 lanes (lane l takes elements l, l+8, … of the chunk, x·x in f64), the lanes of a chunk added
// in order; pass 2 (a tensor's chunks in order, the tensors in order, the square root) runs on the
// host, in the CPU's own code (`adamw::norm_from_chunk_sums`).
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

#define NORM_CHUNK 16384
#define NORM_LANES 8

// Pass 1, every tensor in one launch: chunk_sums[c] = Σ over chunk c, one block per chunk. The
// chunk's values pass through shared memory NORM_SLICE at a time, loaded by every thread (their
// loads issued together); its first NORM_LANES threads then add them as the lanes do (lane l:
// elements l, l+8, … in order), and the lanes are added in order. Chunk c is chunk c − firsts[i]
// of tensor i = `tensor_of_block` (firsts: each tensor's first chunk; xs: its address, lens: its
// length). grid = the chunks, blockDim.x = NORM_THREADS.
#define NORM_SLICE 4096
#define NORM_THREADS 256
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
grad_norm_chunks(double* __restrict__ chunk_sums, const unsigned long long* __restrict__ xs,
                 const long long* __restrict__ lens, const long long* __restrict__ firsts,
                 int tensors) {
    __shared__ float slice[NORM_SLICE];
    const long long chunk = blockIdx.x;
    const int i = tensor_of_block(firsts, tensors, chunk);
    const float* x = (const float*)xs[i];
    const long long start = (chunk - firsts[i]) * NORM_CHUNK;
    const long long end = min(start + NORM_CHUNK, lens[i]);
    double acc = 0.0;
    for (long long base = start; base < end; base += NORM_SLICE) {
        const int len = (int)min((long long)NORM_SLICE, end - base);
#pragma unroll
        for (int k = 0; k < NORM_SLICE / NORM_THREADS; k++) {
            const int j = threadIdx.x + k * NORM_THREADS;
            if (j < len) slice[j] = x[base + j];
        }
        __syncthreads();
        if (threadIdx.x < NORM_LANES)
            for (int j = threadIdx.x; j < len; j += NORM_LANES) {
                const double v = (double)slice[j];
                acc += v * v;
            }
        __syncthreads();
    }
    // the chunk's lanes in order, from lane 0's thread (as `lanes.iter().sum()`)
    if (threadIdx.x < 32) {
        double sum = -0.0;
        for (int l = 0; l < NORM_LANES; l++) sum += __shfl_sync(FULL_MASK, acc, l);
        if (threadIdx.x == 0) chunk_sums[chunk] = sum;
    }
}

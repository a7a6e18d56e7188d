// Token embedding. Mirrors kernels/src/ops/embedding.rs: forward (gather rows by id) and
// backward_weight (scatter-add rows in token order). The backward gives each thread one column of
// the table and walks the tokens in order, so no two threads write one element: deterministic
// without float atomics and bit for bit the CPU's sums.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// embedding.rs: forward. out[n,d] = table[ids[n], :]. Grid-stride over n·d, any launch.
extern "C" __global__ void embedding_forward(float* __restrict__ out, const u32* __restrict__ ids,
                                             const float* __restrict__ table, long long n, int d) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n * d;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = table[(long long)ids[i / d] * d + i % d];
    }
}

// embedding.rs: backward_weight. dtable[ids[n], j] += dout[n, j] for n in order; one thread per
// column j: grid = ⌈d/blockDim.x⌉. Parallel over columns only: slow for long n (to measure).
extern "C" __global__ void embedding_backward_weight(float* __restrict__ dtable,
                                                     const u32* __restrict__ ids,
                                                     const float* __restrict__ dout, long long n,
                                                     int d) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    for (long long row = 0; row < n; row++) dtable[(long long)ids[row] * d + j] += dout[row * d + j];
}

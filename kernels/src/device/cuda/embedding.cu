// Token embedding. Mirrors kernels/src/ops/embedding.rs: forward (gather rows by id) and
// backward_weight (scatter-add rows in token order). The backward gives each thread one column of
// one token's rows, sorted by id on the host, and adds them in order, so no two threads write one
// element: deterministic without float atomics and bit for bit the CPU's sums.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// embedding.rs: forward. out[n,d] = table[ids[n], :]. Grid-stride over n·d, any launch.
extern "C" __global__ void embedding_forward(float* __restrict__ out, const u32* __restrict__ ids,
                                             const float* __restrict__ table, long long n, int d) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n * d;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = table[(long long)ids[i / d] * d + i % d];
    }
}

// embedding.rs: backward_weight. dtable[v, j] += dout[r, j] for each row r of token v, rows in
// order. The rows come sorted by id from the host (`ops::embedding::rows_by_id`: `order`, segment
// `starts`, each segment's id in `seg_ids`): one block per (segment, blockDim.x columns), one
// thread per column of a segment, so no two threads touch one element and each adds its token's
// rows in the CPU's order (its bits) while the segments run in parallel.
// grid = (segments, ⌈d/blockDim.x⌉).
extern "C" __global__ void embedding_backward_weight(float* __restrict__ dtable,
                                                     const u32* __restrict__ order,
                                                     const u32* __restrict__ starts,
                                                     const u32* __restrict__ seg_ids,
                                                     const float* __restrict__ dout, int d) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const int s = blockIdx.x;
    float* t = dtable + (long long)seg_ids[s] * d + j;
    float g = *t;
    for (u32 i = starts[s]; i < starts[s + 1]; i++) g += dout[(long long)order[i] * d + j];
    *t = g;
}

// MoE token permutation for dispatch and combine. Mirrors kernels/src/ops/moe_dispatch.rs on a
// plan the host built (kernels/src/device/backend/mod.rs: HostPlan): `token[r]`, `slot[r]` per
// dispatched row r (rows grouped by expert), and `rows_of_token[t·k + j]`, each token's k rows in
// ascending order. Scatter-adds are turned into gathers per token that add the rows in ascending
// order, the CPU's order, so dispatch, its backward and combine give the CPU's bits (products by
// __fmul_rn, no contraction); combine's backward dot product is a fixed-tree block sum (to
// rounding). No atomics.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// moe_dispatch.rs: dispatch_forward. xe[r, :] = x[token[r], :]. Grid-stride over rows·d.
extern "C" __global__ void moe_dispatch_forward(float* __restrict__ xe,
                                                const float* __restrict__ x,
                                                const u32* __restrict__ token, long long rows,
                                                int d) {
    long long n = rows * d;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / d;
        xe[i] = x[(long long)token[r] * d + (i - r * d)];
    }
}

// moe_dispatch.rs: dispatch_backward_input. dx[t, c] += dxe[row, c] for t's rows, ascending.
// Grid-stride over tokens·d.
extern "C" __global__ void moe_dispatch_backward_input(float* __restrict__ dx,
                                                       const float* __restrict__ dxe,
                                                       const u32* __restrict__ rows_of_token,
                                                       long long tokens, int k, int d) {
    long long n = tokens * d;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / d;
        int c = (int)(i - t * d);
        float acc = dx[i];
        for (int j = 0; j < k; j++) acc = acc + dxe[(long long)rows_of_token[t * k + j] * d + c];
        dx[i] = acc;
    }
}

// moe_dispatch.rs: combine_forward. out[t, c] += weights[t·k + slot[row]] · ye[row, c] for t's
// rows, ascending. Grid-stride over tokens·d.
extern "C" __global__ void moe_combine_forward(float* __restrict__ out,
                                               const float* __restrict__ ye,
                                               const float* __restrict__ weights,
                                               const u32* __restrict__ slot,
                                               const u32* __restrict__ rows_of_token,
                                               long long tokens, int k, int d) {
    long long n = tokens * d;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / d;
        int c = (int)(i - t * d);
        float acc = out[i];
        for (int j = 0; j < k; j++) {
            u32 r = rows_of_token[t * k + j];
            acc = acc + __fmul_rn(weights[t * k + slot[r]], ye[(long long)r * d + c]);
        }
        out[i] = acc;
    }
}

// moe_dispatch.rs: combine_backward_input. For row r of token t, slot s, weight w:
// dye[r, :] = w · dout[t, :], dweights[t·k + s] = Σ_c dout[t, c] · ye[r, c]. One block per row.
extern "C" __global__ void moe_combine_backward_input(float* __restrict__ dye,
                                                      float* __restrict__ dweights,
                                                      const float* __restrict__ dout,
                                                      const float* __restrict__ ye,
                                                      const float* __restrict__ weights,
                                                      const u32* __restrict__ token,
                                                      const u32* __restrict__ slot, int k, int d) {
    __shared__ float sh[32];
    long long r = blockIdx.x;
    long long t = token[r];
    long long idx = t * k + slot[r];
    float w = weights[idx];
    const float* g = dout + t * d;
    const float* y = ye + r * d;
    float part = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        dye[r * d + c] = __fmul_rn(w, g[c]);
        part = part + __fmul_rn(g[c], y[c]);
    }
    float dot = block_sum(part, sh);
    if (threadIdx.x == 0) dweights[idx] = dot;
}

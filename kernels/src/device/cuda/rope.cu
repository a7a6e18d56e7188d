// Rotary position embedding on interleaved pairs, in place. Mirrors kernels/src/ops/rope.rs:
// forward (rotate by +angle) and backward_input (by −angle), from the same cos/sin table
// (RopeTable, [positions, half], built on the host), same arithmetic without FMA contraction:
// bit for bit the CPU's. One thread per (row, pair): grid-stride over rows·half, any launch.
// positions[row] indexes the table (u32 here, usize on the CPU).
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

__device__ __forceinline__ void rotate(float* x, int stride, int offset, const u32* positions,
                                       const float* cos_t, const float* sin_t, int half, int rows,
                                       float sign) {
    const long long n = (long long)rows * half;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        long long row = k / half;
        int i = (int)(k % half);
        long long t = (long long)positions[row] * half + i;
        float c = cos_t[t], s = sign * sin_t[t];
        float* p = x + row * stride + offset + 2 * i;
        float a = p[0], b = p[1];
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
    }
}

// rope.rs: forward. Rotates columns [offset, offset + 2·half) of each row of x[rows, stride].
extern "C" __global__ void rope_forward(float* x, int stride, int offset, const u32* __restrict__ positions,
                                        const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                        int half, int rows) {
    rotate(x, stride, offset, positions, cos_t, sin_t, half, rows, 1.0f);
}

// rope.rs: backward_input. The rotation is orthogonal: dy rotated by the negative angle, in place.
extern "C" __global__ void rope_backward_input(float* dy, int stride, int offset,
                                               const u32* __restrict__ positions,
                                               const float* __restrict__ cos_t,
                                               const float* __restrict__ sin_t, int half, int rows) {
    rotate(dy, stride, offset, positions, cos_t, sin_t, half, rows, -1.0f);
}

// Layout moves and elementwise ops of the device step (kernels/src/device/model).
// Mirrors kernels/src/device/backend/cpu.rs: each kernel is the CPU backend method its comment
// names. Pure copies and sums in the CPU's order, so every one gives the CPU's bits except the
// sigmoid (CUDA's expf, ≤ 2 ulp). Grid-stride over the output elements, any launch shape; no
// atomics.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// cpu.rs: add. out = a + b.
extern "C" __global__ void tensor_add(float* __restrict__ out, const float* __restrict__ a,
                                      const float* __restrict__ b, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

// cpu.rs: scale. x *= f.
extern "C" __global__ void tensor_scale(float* __restrict__ x, float f, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = x[i] * f;
}

// cpu.rs: add_into and put_rows. dst[dst_off + i] (+)= src[src_off + i] for i < n.
extern "C" __global__ void tensor_copy(float* __restrict__ dst, long long dst_off,
                                       const float* __restrict__ src, long long src_off,
                                       long long n, int acc) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = src[src_off + i];
        dst[dst_off + i] = acc ? dst[dst_off + i] + v : v;
    }
}

// cpu.rs: copy_cols. dst[r, dst_off + c] (+)= src[r, src_off + c] for c < width, r < rows.
extern "C" __global__ void tensor_copy_cols(float* __restrict__ dst, int dst_w, int dst_off,
                                            const float* __restrict__ src, int src_w, int src_off,
                                            int width, long long rows, int acc) {
    long long n = rows * width;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / width;
        int c = (int)(i - r * width);
        float v = src[r * src_w + src_off + c];
        float* d = dst + r * dst_w + dst_off + c;
        *d = acc ? *d + v : v;
    }
}

// cpu.rs: heads. [b, t, nh, w] → [b, nh, t, w] (inverse: back), indexed by the output element.
extern "C" __global__ void tensor_heads(float* __restrict__ y, const float* __restrict__ x, int b,
                                        int t, int nh, int w, int inverse) {
    long long n = (long long)b * t * nh * w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        int c = (int)(i % w);
        long long row = i / w;
        long long src;
        if (!inverse) {  // y row = (bi, hi, ti)
            int ti = (int)(row % t), hi = (int)(row / t % nh);
            long long bi = row / ((long long)t * nh);
            src = ((bi * t + ti) * nh + hi) * w + c;
        } else {  // y row = (bi, ti, hi)
            int hi = (int)(row % nh), ti = (int)(row / nh % t);
            long long bi = row / ((long long)t * nh);
            src = ((bi * nh + hi) * t + ti) * w + c;
        }
        y[i] = x[src];
    }
}

// cpu.rs: broadcast_heads. y[b, nh, t, w] = x[b·t, w] for every head.
extern "C" __global__ void tensor_broadcast_heads(float* __restrict__ y,
                                                  const float* __restrict__ x, int b, int t,
                                                  int nh, int w) {
    long long n = (long long)b * nh * t * w;
    long long tw = (long long)t * w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long bi = i / (tw * nh);
        y[i] = x[bi * tw + i % tw];
    }
}

// cpu.rs: sum_heads. y[b·t, w] = Σ_h x[b, h, t, w], from 0 in head order (the CPU's adds).
extern "C" __global__ void tensor_sum_heads(float* __restrict__ y, const float* __restrict__ x,
                                            int b, int t, int nh, int w) {
    long long n = (long long)b * t * w;
    long long tw = (long long)t * w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long bi = i / tw, r = i % tw;
        float acc = 0.0f;
        for (int h = 0; h < nh; h++) acc = acc + x[(bi * nh + h) * tw + r];
        y[i] = acc;
    }
}

// moe_gate.rs: sigmoid_forward. s = 1 / (1 + exp(−x)).
extern "C" __global__ void sigmoid_forward(float* __restrict__ s, const float* __restrict__ x,
                                           long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        s[i] = 1.0f / (1.0f + expf(-x[i]));
}

// moe_gate.rs: sigmoid_backward_input. d = ds · s · (1 − s), left to right, no contraction.
extern "C" __global__ void sigmoid_backward_input(float* __restrict__ d,
                                                  const float* __restrict__ ds,
                                                  const float* __restrict__ s, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float y = s[i];
        d[i] = __fmul_rn(__fmul_rn(ds[i], y), 1.0f - y);
    }
}

// backend/cpu.rs: the BF16 GEMM operand (half::bf16::from_f32: round to nearest even, a NaN
// kept quiet with its sign and top payload bits), as bits. Grid-stride over n.
extern "C" __global__ void tensor_to_bf16(u16* __restrict__ out, const float* __restrict__ x,
                                          long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16(x[i]);
    }
}

// tensor_to_bf16 of gridDim.y buffers of n values in one launch (a MoE projection's expert
// weights): buffer z is read at xs[z] and its bits written to out + z·n. Grid-stride over n in x.
extern "C" __global__ void tensor_to_bf16_batched(u16* __restrict__ out,
                                                  const u64* __restrict__ xs, long long n) {
    const float* x = (const float*)xs[blockIdx.y];
    u16* o = out + (long long)blockIdx.y * n;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        o[i] = f32_to_bf16(x[i]);
    }
}

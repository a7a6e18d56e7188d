// The SwiGLU gate, elementwise. Mirrors kernels/src/ops/swiglu.rs: forward (h = silu(a)·b) and
// backward_input (da, db), same formulas and order without FMA contraction; expf is CUDA's
// (≤ 2 ulp) where the CPU uses libm's exp, so results match to rounding, not bit for bit.
// Grid-stride over n elements, any launch shape.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// swiglu.rs: forward. h = a / (1 + exp(−a)) · b.
extern "C" __global__ void swiglu_forward(float* __restrict__ h, const float* __restrict__ a,
                                          const float* __restrict__ b, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float av = a[i];
        h[i] = av / (1.0f + expf(-av)) * b[i];
    }
}

// swiglu.rs: backward_input. db = dh·silu(a), da = dh·b·(σ + silu(a)·(1 − σ)), σ = 1/(1+exp(−a)).
extern "C" __global__ void swiglu_backward_input(float* __restrict__ da, float* __restrict__ db,
                                                 const float* __restrict__ dh,
                                                 const float* __restrict__ a,
                                                 const float* __restrict__ b, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float av = a[i], g = dh[i];
        float sig = 1.0f / (1.0f + expf(-av));
        float s = av * sig;
        db[i] = g * s;
        da[i] = g * b[i] * (sig + s * (1.0f - sig));
    }
}

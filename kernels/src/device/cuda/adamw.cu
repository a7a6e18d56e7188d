// AdamW, one update per element. Mirrors kernels/src/ops/adamw.rs: AdamW::step with F32 moments
// (adamw_step_f32) and with BF16 moments (adamw_step_bf16: each moment computed in f32 from its
// stored value, stored rounded to nearest-even bf16 exactly as half::bf16::from_f32 does, and the
// rounded values used for the update). Same expression order, no FMA contraction, IEEE division
// and sqrt: bit for bit the CPU's update. The host passes StepConsts as the CPU computes them:
// bc1 = 1 − β1^t, bc2 = 1 − β2^t (f32 powi), wd = lr·weight_decay or 0, and grad_scale (the clip
// factor). The gradient is zeroed for the next accumulation. Grid-stride over n, any launch.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

struct StepConsts {
    float b1, b2, bc1, bc2, eps, lr, wd;
};

// adamw.rs: StepConsts::apply. p −= wd·p + lr·(m/bc1) / (sqrt(v/bc2) + eps).
__device__ __forceinline__ float apply(float p, float mi, float vi, const StepConsts& c) {
    return p - (c.wd * p + c.lr * (mi / c.bc1) / (sqrtf(vi / c.bc2) + c.eps));
}

// A moment's stored value as f32, and storing one: returns the value as stored (rounded for bf16).
__device__ __forceinline__ float load_moment(const float* m, long long i) { return m[i]; }
__device__ __forceinline__ float load_moment(const u16* m, long long i) { return bf16_to_f32(m[i]); }
__device__ __forceinline__ float store_moment(float* m, long long i, float x) {
    m[i] = x;
    return x;
}
__device__ __forceinline__ float store_moment(u16* m, long long i, float x) {
    const u16 b = f32_to_bf16(x);
    m[i] = b;
    return bf16_to_f32(b);
}

// adamw.rs: AdamW::step's update of element i, moments stored as M (float or bf16 bits).
template <typename M>
__device__ __forceinline__ void adamw_element(float* __restrict__ p, float* __restrict__ g,
                                              M* __restrict__ m, M* __restrict__ v, long long i,
                                              float grad_scale, const StepConsts& c) {
    const float gi = g[i] * grad_scale;
    g[i] = 0.0f;
    const float mi = c.b1 * load_moment(m, i) + (1.0f - c.b1) * gi;
    const float vi = c.b2 * load_moment(v, i) + (1.0f - c.b2) * gi * gi;
    const float ms = store_moment(m, i, mi), vs = store_moment(v, i, vi);
    p[i] = apply(p[i], ms, vs, c);
}

// adamw.rs: AdamW::step's element loop.
template <typename M>
__device__ __forceinline__ void adamw_step(float* __restrict__ p, float* __restrict__ g,
                                           M* __restrict__ m, M* __restrict__ v, long long n,
                                           float grad_scale, const StepConsts& c) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        adamw_element(p, g, m, v, i, grad_scale, c);
}

// Moments::F32. `c` is passed by value (a #[repr(C)] struct of seven f32 on the host side).
extern "C" __global__ void adamw_step_f32(float* p, float* g, float* m, float* v, long long n,
                                          float grad_scale, StepConsts c) {
    adamw_step(p, g, m, v, n, grad_scale, c);
}

// Moments::Bf16 (bf16 bits as u16).
extern "C" __global__ void adamw_step_bf16(float* p, float* g, u16* m, u16* v, long long n,
                                           float grad_scale, StepConsts c) {
    adamw_step(p, g, m, v, n, grad_scale, c);
}

// The updates of many tensors in one launch (the model's optimizer step, instead of a launch per
// tensor): one block per ADAM_CHUNK elements of one tensor (`tensor_of_block` over firsts, each
// tensor's first chunk); ps, gs, ms, vs hold the tensors' addresses, lens their lengths, consts
// StepConsts' seven fields in order per tensor. grid = the chunks, any block size.
#define ADAM_CHUNK 4096
template <typename M>
__device__ __forceinline__ void adamw_many(const unsigned long long* __restrict__ ps,
                                           const unsigned long long* __restrict__ gs,
                                           const unsigned long long* __restrict__ ms,
                                           const unsigned long long* __restrict__ vs,
                                           const long long* __restrict__ lens,
                                           const long long* __restrict__ firsts, int tensors,
                                           const float* __restrict__ consts, float grad_scale) {
    const long long chunk = blockIdx.x;
    const int lo = tensor_of_block(firsts, tensors, chunk);
    const float* k = consts + 7 * (long long)lo;
    const StepConsts c{k[0], k[1], k[2], k[3], k[4], k[5], k[6]};
    float* p = (float*)ps[lo];
    float* g = (float*)gs[lo];
    M* m = (M*)ms[lo];
    M* v = (M*)vs[lo];
    const long long start = (chunk - firsts[lo]) * ADAM_CHUNK;
    const long long end = min(start + ADAM_CHUNK, lens[lo]);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x)
        adamw_element(p, g, m, v, i, grad_scale, c);
}

extern "C" __global__ void adamw_many_f32(const unsigned long long* ps, const unsigned long long* gs,
                                          const unsigned long long* ms, const unsigned long long* vs,
                                          const long long* lens, const long long* firsts,
                                          int tensors, const float* consts, float grad_scale) {
    adamw_many<float>(ps, gs, ms, vs, lens, firsts, tensors, consts, grad_scale);
}

extern "C" __global__ void adamw_many_bf16(const unsigned long long* ps, const unsigned long long* gs,
                                           const unsigned long long* ms, const unsigned long long* vs,
                                           const long long* lens, const long long* firsts,
                                           int tensors, const float* consts, float grad_scale) {
    adamw_many<u16>(ps, gs, ms, vs, lens, firsts, tensors, consts, grad_scale);
}

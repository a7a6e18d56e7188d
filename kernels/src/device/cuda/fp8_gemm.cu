// The FP8 GEMM of a Linear with FP32 promotion per 128-wide K block, DeepSeek-V3's recipe on
// CUDA cores. Mirrors kernels/src/fp8/gemm.rs: fp8_gemm_fprop, fp8_gemm_dgrad and fp8_gemm_wgrad
// (promoted_gemm) in one kernel whose strides pick the orientation:
//   out[i, j] = Σ_kb (Σ_{k ∈ kb} A(i, k) · B(j, k)) · sa(kb, i) · sb(kb, j)
// with A(i, k) = decode(a[i·a_i + k·a_k]), B(j, k) = decode(b[j·b_j + k·b_k]), and the scale of
// a K block kb for row i at a_scales[kb·sa_kb + (i / sa_div)·sa_i] (likewise for B). The codes'
// products are exact in f32; each block's sum runs in k order, then out += (part · sa) · sb, as
// the CPU's promote does (its block sum is a GEMM's, so results agree to rounding, not bits).
// One thread per output element, grid-stride: correct, not fast (no tensor cores); no atomics.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

extern "C" __global__ void fp8_gemm_promoted(float* __restrict__ out, int m, int n, int k,
                                             const u8* __restrict__ a, long long a_i, long long a_k,
                                             const float* __restrict__ sa, long long sa_kb,
                                             long long sa_i, int sa_div,
                                             const u8* __restrict__ b, long long b_j, long long b_k,
                                             const float* __restrict__ sb, long long sb_kb,
                                             long long sb_j, int sb_div) {
    long long total = (long long)m * n;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        long long i = e / n, j = e - (e / n) * n;
        float acc = 0.0f;
        for (int k0 = 0; k0 < k; k0 += 128) {
            int k1 = min(k0 + 128, k);
            float part = 0.0f;
            for (int kk = k0; kk < k1; kk++) {
                float x = decode_e4m3(a[i * a_i + kk * a_k]);
                float y = decode_e4m3(b[j * b_j + kk * b_k]);
                part = part + __fmul_rn(x, y);
            }
            long long kb = k0 / 128;
            float s = sa[kb * sa_kb + (i / sa_div) * sa_i];
            float t = sb[kb * sb_kb + (j / sb_div) * sb_j];
            acc = acc + __fmul_rn(__fmul_rn(part, s), t);
        }
        out[e] = acc;
    }
}

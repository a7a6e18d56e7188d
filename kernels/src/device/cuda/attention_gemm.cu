// The row kernels of attention on tensor cores (BF16 GEMMs by cuBLAS, f32 softmax here).
// Mirrors kernels/src/ops/attention.rs: `softmax_causal_rows` (p = softmax(scale·s) over the row's
// first i + 1 columns, zeros after) and `softmax_backward_rows` (ds = p ⊙ (dp − Σ dp ⊙ p) · scale),
// on bh·t rows of t columns, row r being position i = r mod t of its (sequence, head) block. The
// backend runs S = Q·Kᵀ, O = P·V and the backward's four products as strided-batched cuBLAS GEMMs
// on BF16 operands with f32 sums (`cuda/attention_gemm.rs`), and these kernels between them, each
// also writing the BF16 operand the next products read (P for P·V and Pᵀ·dO, dS for dQ and dK): the
// T×T scores are materialised, so the backend uses this path for BF16 up to a size bound and the
// fused f32 kernel (attention.cu) otherwise.
//
// One block of 256 threads per row (grid x = rows ≤ 2^31 − 1); a thread takes columns tid,
// tid + 256, …; the row max and sums use common.cuh's fixed trees, so two runs give the same bits.
// They are not the CPU's bits (the CPU sums a row left to right; expf is not Rust's exp): parity
// is normwise. No atomics.
//
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

// p[r, c] = exp(s[r, c]·scale − max) / Σ over c ≤ i, 0 for c > i (in place: p may be s), and
// p16 the same values in BF16 (f32_to_bf16: what the P·V and Pᵀ·dO products read).
extern "C" __global__ void attention_softmax_rows(float* p, u16* p16, long long rows, int t, float scale) {
    __shared__ float sh[32];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const int i = (int)(r % t);
    float* row = p + r * (long long)t;
    u16* row16 = p16 + r * (long long)t;
    float mx = -__int_as_float(0x7f800000);
    for (int c = threadIdx.x; c <= i; c += blockDim.x) mx = fmaxf(mx, row[c] * scale);
    mx = block_max(mx, sh);
    float sum = 0.0f;
    for (int c = threadIdx.x; c <= i; c += blockDim.x) {
        const float e = expf(row[c] * scale - mx);
        row[c] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);
    const float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < t; c += blockDim.x) {
        const float y = c <= i ? row[c] * inv : 0.0f;
        row[c] = y;
        row16[c] = f32_to_bf16(y);
    }
}

// ds16[r, c] = BF16 of p[r, c]·(dp[r, c] − Σ_c' dp[r, c']·p[r, c'])·scale: the operand the dQ and
// dK products read (dS itself is not kept in f32).
extern "C" __global__ void attention_softmax_backward_rows(u16* ds16, const float* dp, const float* p,
                                                           long long rows, int t, float scale) {
    __shared__ float sh[32];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const float* d = dp + r * (long long)t;
    const float* pr = p + r * (long long)t;
    u16* out = ds16 + r * (long long)t;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < t; c += blockDim.x) dot += d[c] * pr[c];
    dot = block_sum(dot, sh);
    for (int c = threadIdx.x; c < t; c += blockDim.x) out[c] = f32_to_bf16(pr[c] * (d[c] - dot) * scale);
}

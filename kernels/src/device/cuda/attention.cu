// Fused causal attention, flash style, in f32 on CUDA cores. Mirrors kernels/src/ops/attention.rs:
// `forward` (o = softmax(scale·q kᵀ, causal) v) and `backward_input` (dq, dk, dv), per (sequence,
// head) block bh with q, k [bh, t, dqk], v, o, do [bh, t, dv]. No T×T matrix is ever stored: the
// forward keeps an online softmax over key tiles and writes the per-row log-sum-exp lse [bh, t]
// (scaled units: lse = max + log Σ exp(s·scale − max)); the backward recomputes P = exp(s·scale −
// lse) tile by tile.
//
// Tiling: 256 threads as 16×16 (ty = threadIdx.x / 16, tx = threadIdx.x % 16); query tiles of
// TILE = 64 rows, key tiles of 64 (forward, dQ) or 32 (dK/dV) rows. A thread owns rows ty + 16·i
// of its tile and columns tx + 16·j. Score tiles (q·k, do·v) are accumulated over the head dim in
// chunks of KC = 32 columns staged in shared memory; products with a probability tile (P·V, Pᵀ·dO,
// dSᵀ·Q, dS·K) stage the other operand in chunks of VC = 64 columns and keep the output rows in
// registers (at most MAX_HEAD_DIM / 16 = 16 columns per row and thread). Shared memory is static
// (33.5 KB per block).
//
// Limits (checked by the launch wrappers): 1 ≤ dqk, dv ≤ MAX_HEAD_DIM = 256; grid (⌈t/64⌉ or
// ⌈t/32⌉, bh) with bh ≤ 65,535; blockDim.x must be 256.
//
// Determinism: no atomics. Every output element is written by one thread, which sums in a fixed
// order (head-dim chunks in order, key or query tiles in order, a fixed shuffle tree for the row
// max and sum), so two runs give the same bits. They are not the CPU's bits (online softmax,
// another summation order, explicit fmaf): parity is within 1e-5 normwise relative error.
// Checked on the host only, by a C++ emulation (each block's 256 threads as OS threads with real
// barriers and shuffles) against an f64 reference: 2e-7 to 7e-7 normwise for t up to 300 and
// head dims up to 256, as close as a plain f32 implementation.
//
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

#define ATT_THREADS 256
#define TILE 64
#define KEY_TILE_DKV 32
#define KC 32
#define LDC (KC + 1)
#define VC 64
#define LDV (VC + 1)
#define LDP (TILE + 1)
#define MAX_HEAD_DIM 256
#define NCHUNK (MAX_HEAD_DIM / VC)
#define OUT_COLS (NCHUNK * 4)
// The chunk region holds a score chunk pair (≤ 2·64 rows × LDC) or a VC chunk (TILE × LDV).
#define CHUNK_FLOATS (2 * TILE * LDC)

// acc[i][j] += Σ_c a[a0 + ty + 16i][c] · b[b0 + tx + 16j][c] over c < d; rows at or past `n` read
// as zero. a and b are row-major with d columns. sa holds RA·16 × LDC floats, sb RB·16 × LDC.
// Every thread of the block must call it; it begins each chunk with a barrier.
template <int RA, int RB>
__device__ __forceinline__ void tile_scores(float (&acc)[RA][RB], const float* __restrict__ a,
                                            int a0, const float* __restrict__ b, int b0, int n,
                                            int d, float* sa, float* sb) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    for (int c0 = 0; c0 < d; c0 += KC) {
        __syncthreads();
        for (int e = threadIdx.x; e < RA * 16 * KC; e += ATT_THREADS) {
            const int r = e / KC, c = e % KC;
            const bool in = a0 + r < n && c0 + c < d;
            sa[r * LDC + c] = in ? a[(long long)(a0 + r) * d + c0 + c] : 0.0f;
        }
        for (int e = threadIdx.x; e < RB * 16 * KC; e += ATT_THREADS) {
            const int r = e / KC, c = e % KC;
            const bool in = b0 + r < n && c0 + c < d;
            sb[r * LDC + c] = in ? b[(long long)(b0 + r) * d + c0 + c] : 0.0f;
        }
        __syncthreads();
#pragma unroll 4
        for (int c = 0; c < KC; c++) {
            float av[RA], bv[RB];
#pragma unroll
            for (int i = 0; i < RA; i++) av[i] = sa[(ty + 16 * i) * LDC + c];
#pragma unroll
            for (int j = 0; j < RB; j++) bv[j] = sb[(tx + 16 * j) * LDC + c];
#pragma unroll
            for (int i = 0; i < RA; i++)
#pragma unroll
                for (int j = 0; j < RB; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
    }
}

// out[i][4·ch + j] += Σ_k p[ty + 16i][k] · y[y0 + k][64·ch + tx + 16j] over k < TILE, for the
// column chunks ch with 64·ch < d; y rows at or past `n` read as zero. p is R·16 × LDP in shared
// memory (written before the call: the first barrier publishes it), ys a TILE × LDV chunk.
template <int R>
__device__ __forceinline__ void tile_accumulate(float (&out)[R][OUT_COLS], const float* p,
                                                const float* __restrict__ y, int y0, int n, int d,
                                                float* ys) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int ch = 0; ch < NCHUNK; ch++) {
        if (ch * VC < d) {
            __syncthreads();
            for (int e = threadIdx.x; e < TILE * VC; e += ATT_THREADS) {
                const int r = e / VC, c = e % VC;
                const bool in = y0 + r < n && ch * VC + c < d;
                ys[r * LDV + c] = in ? y[(long long)(y0 + r) * d + ch * VC + c] : 0.0f;
            }
            __syncthreads();
#pragma unroll 4
            for (int k = 0; k < TILE; k++) {
                float pv[R], yv[4];
#pragma unroll
                for (int i = 0; i < R; i++) pv[i] = p[(ty + 16 * i) * LDP + k];
#pragma unroll
                for (int j = 0; j < 4; j++) yv[j] = ys[k * LDV + tx + 16 * j];
#pragma unroll
                for (int i = 0; i < R; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        out[i][ch * 4 + j] = fmaf(pv[i], yv[j], out[i][ch * 4 + j]);
            }
        }
    }
}

// Writes out[i][·] (rows r0 + ty + 16i below n, columns below d) times mul[i] into dst [n, d].
template <int R>
__device__ __forceinline__ void store_rows(float* __restrict__ dst, const float (&out)[R][OUT_COLS],
                                           const float (&mul)[R], int r0, int n, int d) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int row = r0 + ty + 16 * i;
        if (row >= n) continue;
#pragma unroll
        for (int cj = 0; cj < OUT_COLS; cj++) {
            const int col = (cj / 4) * VC + tx + 16 * (cj % 4);
            if (col < d) dst[(long long)row * d + col] = out[i][cj] * mul[i];
        }
    }
}

// A sum or max over the 16 lanes sharing ty (a half warp), the same bits in each.
__device__ __forceinline__ float row16_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float row16_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// attention.rs: forward. o [bh, t, dv] and lse [bh, t] from q, k [bh, t, dqk], v [bh, t, dv].
// grid (⌈t/64⌉, bh), block 256. Query tile blockIdx.x visits key tiles 0..=blockIdx.x.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_forward(float* __restrict__ o, float* __restrict__ lse, const float* __restrict__ q,
                  const float* __restrict__ k, const float* __restrict__ v, int t, int dqk, int dv,
                  float scale) {
    __shared__ float chunk[CHUNK_FLOATS];
    __shared__ float ps[TILE * LDP];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const long long bh = blockIdx.y;
    const float* qb = q + bh * t * dqk;
    const float* kb = k + bh * t * dqk;
    const float* vb = v + bh * t * dv;
    const int q0 = blockIdx.x * TILE;
    float m[4], l[4], acc[4][OUT_COLS];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -__int_as_float(0x7f800000);
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < OUT_COLS; c++) acc[i][c] = 0.0f;
    }
    for (int kt = 0; kt <= (int)blockIdx.x; kt++) {
        const int k0 = kt * TILE;
        float s[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = 0.0f;
        tile_scores<4, 4>(s, qb, q0, kb, k0, t, dqk, chunk, chunk + TILE * LDC);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = q0 + ty + 16 * i;
            float mx = -__int_as_float(0x7f800000);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int key = k0 + tx + 16 * j;
                s[i][j] = (key <= row && key < t) ? s[i][j] * scale : -__int_as_float(0x7f800000);
                mx = fmaxf(mx, s[i][j]);
            }
            // key 0 is in tile 0 for every row, so m_new is finite from the first tile on
            const float m_new = fmaxf(m[i], row16_max(mx));
            const float alpha = expf(m[i] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float p = expf(s[i][j] - m_new);
                sum += p;
                ps[(ty + 16 * i) * LDP + tx + 16 * j] = p;
            }
            l[i] = l[i] * alpha + row16_sum(sum);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < OUT_COLS; c++) acc[i][c] *= alpha;
        }
        tile_accumulate<4>(acc, ps, vb, k0, t, dv, chunk);
    }
    float inv[4];
#pragma unroll
    for (int i = 0; i < 4; i++) inv[i] = 1.0f / l[i];
    store_rows<4>(o + bh * t * dv, acc, inv, q0, t, dv);
    if (tx == 0) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = q0 + ty + 16 * i;
            if (row < t) lse[bh * t + row] = m[i] + logf(l[i]);
        }
    }
}

// attention.rs: backward_input, step 1. delta[r] = Σ_c do[r, c]·o[r, c] over rows r < rows
// (= bh·t), which equals the CPU's rowsum(dP ⊙ P). One warp per row, grid-stride over rows; any
// grid, blockDim.x a multiple of 32.
extern "C" __global__ void attention_backward_dot(float* __restrict__ delta,
                                                  const float* __restrict__ d_o,
                                                  const float* __restrict__ o, long long rows,
                                                  int dv) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
         r += warps) {
        float acc = 0.0f;
        for (int c = lane; c < dv; c += 32) acc = fmaf(d_o[r * dv + c], o[r * dv + c], acc);
        acc = warp_sum(acc);
        if (lane == 0) delta[r] = acc;
    }
}

// dS and P of one tile, into shared memory: for the thread's (row i, column j) pairs, with
// `key`/`query` the pair's key and query index, p = exp(s·scale − lse[query]) and ds = p·(dp −
// delta[query])·scale where key ≤ query < t, else 0 (so keys at or past t give 0). p_out may be
// null.
__device__ __forceinline__ void probs(float s, float dp, int key, int query, int t, float scale,
                                      const float* lse, const float* delta, float* p_out,
                                      float* ds_out) {
    float p = 0.0f, ds = 0.0f;
    if (key <= query && query < t) {
        p = expf(s * scale - lse[query]);
        ds = p * (dp - delta[query]) * scale;
    }
    if (p_out) *p_out = p;
    *ds_out = ds;
}

// The rows of (sequence, head) block bh in each backward input.
struct Block {
    const float *q, *k, *v, *d_o, *lse, *delta;
};
__device__ __forceinline__ Block block_inputs(long long bh, int t, int dqk, int dv, const float* q,
                                              const float* k, const float* v, const float* d_o,
                                              const float* lse, const float* delta) {
    return Block{q + bh * t * dqk, k + bh * t * dqk, v + bh * t * dv,
                 d_o + bh * t * dv, lse + bh * t,    delta + bh * t};
}

// attention.rs: backward_input, step 2. dk [bh, t, dqk] and dv_out [bh, t, dv] for key tile
// blockIdx.x (32 keys), over the query tiles at or after it, from the forward's lse and step 1's
// delta. grid (⌈t/32⌉, bh), block 256.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_backward_dkdv(float* __restrict__ dk, float* __restrict__ dv_out,
                        const float* __restrict__ d_o, const float* __restrict__ lse,
                        const float* __restrict__ delta, const float* __restrict__ q,
                        const float* __restrict__ k, const float* __restrict__ v, int t, int dqk,
                        int dv, float scale) {
    __shared__ float chunk[CHUNK_FLOATS];
    __shared__ float pt[KEY_TILE_DKV * LDP];
    __shared__ float dst[KEY_TILE_DKV * LDP];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const long long bh = blockIdx.y;
    const Block in = block_inputs(bh, t, dqk, dv, q, k, v, d_o, lse, delta);
    const float *qb = in.q, *kb = in.k, *vb = in.v, *dob = in.d_o, *lb = in.lse, *db = in.delta;
    const int k0 = blockIdx.x * KEY_TILE_DKV;
    float gk[2][OUT_COLS], gv[2][OUT_COLS];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int c = 0; c < OUT_COLS; c++) gk[i][c] = gv[i][c] = 0.0f;
    const int tiles = (t + TILE - 1) / TILE;
    for (int qt = k0 / TILE; qt < tiles; qt++) {
        const int q0 = qt * TILE;
        float s[2][4], dp[2][4];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = dp[i][j] = 0.0f;
        // sᵀ = k·q and dPᵀ = v·do, keys as rows
        tile_scores<2, 4>(s, kb, k0, qb, q0, t, dqk, chunk, chunk + KEY_TILE_DKV * LDC);
        tile_scores<2, 4>(dp, vb, k0, dob, q0, t, dv, chunk, chunk + KEY_TILE_DKV * LDC);
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int at = (ty + 16 * i) * LDP + tx + 16 * j;
                probs(s[i][j], dp[i][j], k0 + ty + 16 * i, q0 + tx + 16 * j, t, scale, lb, db,
                      &pt[at], &dst[at]);
            }
        tile_accumulate<2>(gv, pt, dob, q0, t, dv, chunk);   // dV += Pᵀ·dO
        tile_accumulate<2>(gk, dst, qb, q0, t, dqk, chunk);  // dK += dSᵀ·Q
    }
    const float one[2] = {1.0f, 1.0f};
    store_rows<2>(dk + bh * t * dqk, gk, one, k0, t, dqk);
    store_rows<2>(dv_out + bh * t * dv, gv, one, k0, t, dv);
}

// attention.rs: backward_input, step 3. dq [bh, t, dqk] for query tile blockIdx.x (64 rows), over
// key tiles 0..=blockIdx.x, recomputing P from q, k and lse. grid (⌈t/64⌉, bh), block 256.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_backward_dq(float* __restrict__ dq, const float* __restrict__ d_o,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      const float* __restrict__ q, const float* __restrict__ k,
                      const float* __restrict__ v, int t, int dqk, int dv, float scale) {
    __shared__ float chunk[CHUNK_FLOATS];
    __shared__ float dss[TILE * LDP];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const long long bh = blockIdx.y;
    const Block in = block_inputs(bh, t, dqk, dv, q, k, v, d_o, lse, delta);
    const float *qb = in.q, *kb = in.k, *vb = in.v, *dob = in.d_o, *lb = in.lse, *db = in.delta;
    const int q0 = blockIdx.x * TILE;
    float g[4][OUT_COLS];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < OUT_COLS; c++) g[i][c] = 0.0f;
    for (int kt = 0; kt <= (int)blockIdx.x; kt++) {
        const int k0 = kt * TILE;
        float s[4][4], dp[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = dp[i][j] = 0.0f;
        tile_scores<4, 4>(s, qb, q0, kb, k0, t, dqk, chunk, chunk + TILE * LDC);
        tile_scores<4, 4>(dp, dob, q0, vb, k0, t, dv, chunk, chunk + TILE * LDC);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                // keys past t are past every query below t: masked by key ≤ query
                probs(s[i][j], dp[i][j], k0 + tx + 16 * j, q0 + ty + 16 * i, t, scale, lb, db,
                      nullptr, &dss[(ty + 16 * i) * LDP + tx + 16 * j]);
            }
        tile_accumulate<4>(g, dss, kb, k0, t, dqk, chunk);  // dQ += dS·K
    }
    const float one[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    store_rows<4>(dq + bh * t * dqk, g, one, q0, t, dqk);
}

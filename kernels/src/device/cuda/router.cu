// DeepSeek-V3's router on the device: the group-limited top-k selection, the dispatch plan, the
// sequence-wise balance loss and their backward. Mirrors kernels/src/ops/moe_gate.rs (select,
// backward_input), kernels/src/ops/moe_dispatch.rs (DispatchPlan::new),
// kernels/src/device/backend/mod.rs (HostPlan::new: each token's rows ascending) and
// kernels/src/ops/balance.rs (batch_loss_forward, batch_loss_backward_input), bit for bit: every
// comparison is Rust's f32::total_cmp (ties to the lower index), every sum runs in the CPU's order
// (f32 or f64 as there, from -0.0 as Rust's float Sum), no atomics, no contraction.
// Launch shapes: moe_route one warp per token (BLOCK/32 tokens per block, E ≤ 256 in shared
// memory); moe_plan_count and moe_plan_fill one block per expert; moe_plan_rows and
// moe_route_backward grid-stride over tokens; moe_balance_forward and moe_balance_backward one
// block per sequence (E ≤ 256).
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

#define ROUTE_MAX_E 256
#define ROUTE_WARPS 8
// Below every total_cmp key: "no candidate".
#define ROUTE_NONE (-2147483647 - 1)

// f32::total_cmp's order as a signed integer key.
__device__ __forceinline__ int total_key(float f) {
    int i = __float_as_int(f);
    return i ^ (int)(((unsigned)(i >> 31)) >> 1);
}

// a before b in top_indices' order: larger key first, then the lower index.
__device__ __forceinline__ bool ranks_before(int ka, int ia, int kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// moe_gate.rs: forward (select per token). experts[t·k + j], weights[t·k + j].
extern "C" __global__ void moe_route(u32* __restrict__ experts, float* __restrict__ weights,
                                     const float* __restrict__ s, const float* __restrict__ bias,
                                     int n, int e, int n_group, int topk_group, int k,
                                     float scale, int normalize) {
    __shared__ float sb_all[ROUTE_WARPS][ROUTE_MAX_E];
    __shared__ u32 picked_all[ROUTE_WARPS][8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + warp;
    if (t >= n) return;  // a whole warp leaves together
    float* sb = sb_all[warp];
    u32* picked = picked_all[warp];
    const float* st = s + (long long)t * e;
    for (int i = lane; i < e; i += 32) sb[i] = st[i] + bias[i];
    __syncwarp();
    // groups allowed: lane g scores group g by the sum of its top 2, lane 0 keeps the best
    u32 allowed = 0xffffffffu;
    if (n_group > 1) {
        const int size = e / n_group;
        float score = 0.0f;
        if (lane < n_group) {
            int i0 = -1, i1 = -1;
            for (int i = lane * size; i < (lane + 1) * size; i++) {
                int ki = total_key(sb[i]);
                if (i0 < 0 || ranks_before(ki, i, total_key(sb[i0]), i0)) {
                    i1 = i0;
                    i0 = i;
                } else if (i1 < 0 || ranks_before(ki, i, total_key(sb[i1]), i1)) {
                    i1 = i;
                }
            }
            score = -0.0f + sb[i0];
            if (i1 >= 0) score = score + sb[i1];
        }
        u32 groups = 0;
        for (int p = 0; p < topk_group; p++) {
            int key = (lane < n_group && !((groups >> lane) & 1u)) ? total_key(score) : ROUTE_NONE;
            int idx = (lane < n_group && !((groups >> lane) & 1u)) ? lane : 0x7fffffff;
            for (int o = 16; o > 0; o >>= 1) {
                int ok = __shfl_xor_sync(FULL_MASK, key, o), oi = __shfl_xor_sync(FULL_MASK, idx, o);
                if (ranks_before(ok, oi, key, idx)) key = ok, idx = oi;
            }
            if (idx < n_group) groups |= 1u << idx;
        }
        allowed = groups;
    }
    const int size = n_group > 1 ? e / n_group : e;
    // k picks: each lane its best allowed, unpicked expert, then the warp's best
    for (int p = 0; p < k; p++) {
        int key = ROUTE_NONE, idx = 0x7fffffff;
        for (int i = lane; i < e; i += 32) {
            bool ok = n_group <= 1 || ((allowed >> (i / size)) & 1u);
            for (int q = 0; q < p; q++) ok = ok && picked[q] != (u32)i;
            if (ok) {
                int ki = total_key(sb[i]);
                if (idx == 0x7fffffff || ranks_before(ki, i, key, idx)) key = ki, idx = i;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            int ok = __shfl_xor_sync(FULL_MASK, key, o), oi = __shfl_xor_sync(FULL_MASK, idx, o);
            if (oi != 0x7fffffff && (idx == 0x7fffffff || ranks_before(ok, oi, key, idx)))
                key = ok, idx = oi;
        }
        if (lane == 0) picked[p] = (u32)idx;
        __syncwarp();
    }
    if (lane == 0) {
        float denom = 1.0f;
        if (normalize) {
            float sum = -0.0f;
            for (int j = 0; j < k; j++) sum = sum + st[picked[j]];
            denom = sum + 1e-20f;
        }
        for (int j = 0; j < k; j++) {
            experts[(long long)t * k + j] = picked[j];
            weights[(long long)t * k + j] = __fmul_rn(__fdiv_rn(st[picked[j]], denom), scale);
        }
    }
}

// moe_dispatch.rs: DispatchPlan::new, the counts. counts[e] = entries routed to expert e
// (blockIdx.x = e).
extern "C" __global__ void moe_plan_count(u32* __restrict__ counts, const u32* __restrict__ experts,
                                          long long total) {
    __shared__ u32 sh[32];
    const u32 e = blockIdx.x;
    u32 c = 0;
#pragma unroll 16
    for (long long i = threadIdx.x; i < total; i += blockDim.x) c += experts[i] == e;
    c = block_reduce(c, sh, 0u, SumU32());
    if (threadIdx.x == 0) counts[e] = c;
}

#define PLAN_ITEMS 16

// DispatchPlan::new, the fill: expert e's rows are its entries in entry order (token, then slot).
// offsets[e] = Σ counts[< e] (offsets[E] by the last block); token[r], slot[r]; row_of[i] = r.
extern "C" __global__ void moe_plan_fill(u32* __restrict__ offsets, u32* __restrict__ token,
                                         u32* __restrict__ slot, u32* __restrict__ row_of,
                                         const u32* __restrict__ counts,
                                         const u32* __restrict__ experts, long long total, int k,
                                         int n_experts) {
    __shared__ u32 sh[32];
    __shared__ u32 base;
    const u32 e = blockIdx.x;
    if (threadIdx.x == 0) {
        u32 o = 0;
        for (u32 j = 0; j < e; j++) o += counts[j];
        base = o;
        offsets[e] = o;
        if ((int)e == n_experts - 1) offsets[n_experts] = o + counts[e];
    }
    __syncthreads();
    // PLAN_ITEMS consecutive entries per thread and pass (its loads issued together, one block
    // scan per blockDim.x·PLAN_ITEMS entries): thread t's entries precede thread t+1's, so the
    // rows keep entry order
    u32 at = base;
    for (long long c0 = 0; c0 < total; c0 += (long long)blockDim.x * PLAN_ITEMS) {
        const long long first = c0 + (long long)threadIdx.x * PLAN_ITEMS;
        u32 hits = 0, mine = 0;  // hits bit j: entry first + j is e's
#pragma unroll
        for (int j = 0; j < PLAN_ITEMS; j++) {
            const long long i = first + j;
            if (i < total && experts[i] == e) {
                hits |= 1u << j;
                mine++;
            }
        }
        u32 chunk;
        u32 r = at + block_exclusive_scan(mine, sh, &chunk);
        for (int j = 0; j < PLAN_ITEMS; j++) {
            if ((hits >> j) & 1u) {
                const long long i = first + j;
                token[r] = (u32)(i / k);
                slot[r] = (u32)(i % k);
                row_of[i] = r;
                r++;
            }
        }
        at += chunk;
    }
}

// HostPlan::new: rows_of_token[t·k + j], token t's k rows ascending. Grid-stride over tokens.
extern "C" __global__ void moe_plan_rows(u32* __restrict__ rows_of_token,
                                         const u32* __restrict__ row_of, long long tokens, int k) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < tokens;
         t += (long long)gridDim.x * blockDim.x) {
        u32* out = rows_of_token + t * k;
        for (int j = 0; j < k; j++) {
            u32 r = row_of[t * k + j];
            int q = j;
            while (q > 0 && out[q - 1] > r) {
                out[q] = out[q - 1];
                q--;
            }
            out[q] = r;
        }
    }
}

// moe_gate.rs: backward_input. ds[t, :] = 0, then += ∂L/∂s at t's chosen experts from
// dweights[t, :]. Grid-stride over tokens.
extern "C" __global__ void moe_route_backward(float* __restrict__ ds,
                                              const float* __restrict__ dweights,
                                              const float* __restrict__ s,
                                              const u32* __restrict__ experts, long long n, int e,
                                              int k, float scale, int normalize) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n;
         t += (long long)gridDim.x * blockDim.x) {
        const float* st = s + t * e;
        const u32* ex = experts + t * k;
        const float* dw = dweights + t * k;
        float* d = ds + t * e;
        for (int i = 0; i < e; i++) d[i] = 0.0f;
        if (normalize) {
            float sum = -0.0f, dot = -0.0f;
            for (int j = 0; j < k; j++) sum = sum + st[ex[j]];
            sum = sum + 1e-20f;
            for (int j = 0; j < k; j++) dot = dot + __fmul_rn(dw[j], st[ex[j]]);
            for (int j = 0; j < k; j++) {
                float g = __fdiv_rn(dw[j], sum) - __fdiv_rn(dot, __fmul_rn(sum, sum));
                d[ex[j]] = d[ex[j]] + __fmul_rn(scale, g);
            }
        } else {
            for (int j = 0; j < k; j++) d[ex[j]] = d[ex[j]] + __fmul_rn(scale, dw[j]);
        }
    }
}

// The balance kernels stage what their few summing threads walk through shared memory, loaded
// by the whole block at once (a thread walking a sequence's entries from global memory would wait
// on every few loads): BAL_SLICE entries or affinities at a time.
#define BAL_SLICE 4096

// balance.rs: frequencies. f[i] = Σ over the sequence's entries routed to i of E/(k·t), added
// one at a time in f64 as the CPU does. Block-strided over experts; `slice`: BAL_SLICE u32 of
// shared scratch. Every thread of the block calls it (it synchronises).
__device__ void balance_frequencies(double* f, u32* slice, const u32* ex, int t, int k, int e) {
    const double c = (double)e / (double)(k * t);
    for (int i = threadIdx.x; i < e; i += blockDim.x) f[i] = 0.0;
    for (int base = 0; base < t * k; base += BAL_SLICE) {
        const int len = min(BAL_SLICE, t * k - base);
        for (int j = threadIdx.x; j < len; j += blockDim.x) slice[j] = ex[base + j];
        __syncthreads();
        for (int i = threadIdx.x; i < e; i += blockDim.x) {
            double acc = f[i];
            for (int j = 0; j < len; j++)
                if (slice[j] == (u32)i) acc = acc + c;
            f[i] = acc;
        }
        __syncthreads();
    }
}

// balance.rs: Σ_j s[j] in f64, in expert order from -0.0.
__device__ __forceinline__ double row_sum(const float* s, int e) {
    double sum = -0.0;
    for (int j = 0; j < e; j++) sum = sum + (double)s[j];
    return sum;
}

// balance.rs: sequence_loss_forward per sequence (blockIdx.x): loss[b] = α·Σ_i f_i·P_i.
// tok_sum: scratch of batch·seq doubles.
extern "C" __global__ void moe_balance_forward(double* __restrict__ loss,
                                               double* __restrict__ tok_sum,
                                               const float* __restrict__ s,
                                               const u32* __restrict__ experts, int t, int e,
                                               int k, float alpha) {
    __shared__ double f[ROUTE_MAX_E];
    __shared__ double fp[ROUTE_MAX_E];
    __shared__ double p[ROUTE_MAX_E];
    __shared__ u32 slice[BAL_SLICE];
    __shared__ double terms[BAL_SLICE / 2];  // a tile of P's terms, (BAL_SLICE/2)/e tokens
    const long long b = blockIdx.x;
    const float* sq = s + b * t * e;
    double* ts = tok_sum + b * t;
    balance_frequencies(f, slice, experts + b * t * k, t, k, e);
    for (int u = threadIdx.x; u < t; u += blockDim.x) ts[u] = row_sum(sq + (long long)u * e, e);
    for (int i = threadIdx.x; i < e; i += blockDim.x) p[i] = 0.0;
    __syncthreads();
    // P_i = Σ_u s[u, i] / S_u / t in token order: each tile's terms computed by the whole block,
    // then added by expert i's thread
    const int tile = (BAL_SLICE / 2) / e;
    for (int u0 = 0; u0 < t; u0 += tile) {
        const int rows = min(tile, t - u0);
        for (int j = threadIdx.x; j < rows * e; j += blockDim.x) {
            const int u = u0 + j / e;
            terms[j] = (double)sq[(long long)u * e + j % e] / ts[u] / (double)t;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < e; i += blockDim.x) {
            double acc = p[i];
            for (int r = 0; r < rows; r++) acc = acc + terms[r * e + i];
            p[i] = acc;
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < e; i += blockDim.x) fp[i] = f[i] * p[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        double acc = -0.0;
        for (int i = 0; i < e; i++) acc = acc + fp[i];
        loss[b] = (double)alpha * acc;
    }
}

// balance.rs: sequence_loss_backward_input per sequence (blockIdx.x), `alpha` already divided by
// the batch as the CPU does (in f32): ds[t, j] += (f32)(c·(f_j/S − Σ_i f_i s_i/S²)), c = α/t.
extern "C" __global__ void moe_balance_backward(float* __restrict__ ds,
                                                const float* __restrict__ s,
                                                const u32* __restrict__ experts, int t, int e,
                                                int k, float alpha) {
    __shared__ double f[ROUTE_MAX_E];
    __shared__ u32 slice[BAL_SLICE];
    const long long b = blockIdx.x;
    const float* sq = s + b * t * e;
    float* dq = ds + b * t * e;
    balance_frequencies(f, slice, experts + b * t * k, t, k, e);
    __syncthreads();
    const double c = (double)alpha / (double)t;
    for (int u = threadIdx.x; u < t; u += blockDim.x) {
        const float* row = sq + (long long)u * e;
        double sum = row_sum(row, e), fs = -0.0;
        for (int i = 0; i < e; i++) fs = fs + f[i] * (double)row[i];
        for (int j = 0; j < e; j++) {
            float term = (float)(c * (f[j] / sum - fs / (sum * sum)));
            dq[(long long)u * e + j] = dq[(long long)u * e + j] + term;
        }
    }
}

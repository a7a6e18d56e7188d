// The routed experts' FP8 GEMMs in one launch on the tensor cores: a list of problems (one per
// expert with rows), each the promoted GEMM of DeepSeek-V3's recipe
//   out[i, j] (+)= Σ_kb (Σ_{k ∈ kb} A(i, k) · B(j, k)) · sa(kb, i) · sb(kb, j)
// with the operand strides of fp8_gemm.cu (A(i, k) = a[i·a_i + k·a_k], the scale of K block kb
// for row i at sa[kb·sa_kb + (i / sa_div)·sa_i], likewise for B), so the three orientations of a
// Linear need no packing. Mirrors kernels/src/fp8/gemm.rs (fp8_gemm_fprop, fp8_gemm_dgrad,
// fp8_gemm_wgrad: exact E4M3 products summed per 128 of K, then acc = acc + (part · sa) · sb);
// the 32-wide K slices of each block run on the tensor cores (mma.sync m16n8k32, E4M3 operands,
// f32 accumulation), so a block's sum is the hardware's, not the CPU's order.
//
// Problem p is FG_FIELDS long longs at problems + FG_FIELDS·p: m, n, k, then the addresses and
// strides a, a_i, a_k, sa, sa_kb, sa_i, sa_div, b, b_j, b_k, sb, sb_kb, sb_j, sb_div, out, out_ld,
// and accumulate (1: out += the product, else out = it). Tile t is (problem, row0, col0) at
// tiles + 3·t: one FG_M × FG_N output tile per block of 128 threads (4 warps of 32 × 32), K in
// blocks of 128 staged through two shared-memory buffers (zero past m, n or k; 16 codes per access
// where the operand's layout and alignment allow, along K as asynchronous copies: block kb + 1
// lands while the tensor cores work on block kb). Every output element is
// written by one thread; no atomics. Written for issue 12, compile-checked for sm_90 and run
// under the host emulation (kernels/tests/cuda_emulation, whose shim stands in for the mma);
// never run on a GPU.

#define FG_FIELDS 20
#define FG_M 64
#define FG_N 64
#define FG_K 128
// a staged row: 128 codes and 16 of padding (rows stay 16-byte aligned, banks spread)
#define FG_PITCH 144

// 4 consecutive codes as one register, the lowest k in the lowest byte.
__device__ __forceinline__ u32 fg_word(const u8* p) {
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
    return *(const u32*)p;
#else
    u32 w;
    memcpy(&w, p, 4);
    return w;
#endif
}

// d[0..4] += A·B for one m16n8k32 tile: a[4] and b[2] hold this lane's fragments (PTX ISA,
// mma.m16n8k32 with 8-bit operands: a0 rows g, a1 rows g + 8, a2 and a3 the same rows 16 further
// along K; b0 and b1 column g, K 0–15 and 16–31; d rows g and g + 8, columns 2·t and 2·t + 1,
// where g = lane / 4 and t = lane % 4).
__device__ __forceinline__ void fg_mma(float* d, const u32* a, const u32* b) {
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    emu_mma_e4m3_m16n8k32(d, a, b);
#endif
}

// The tile row and column of accumulator c of m16 tile i, n8 tile j, for lane (g, t) of the warp
// whose 32×32 part starts at (wm, wn): the mma's D layout (rows g and g + 8, columns 2t, 2t + 1).
__device__ __forceinline__ int fg_row(int wm, int i, int g, int c) {
    return wm + i * 16 + g + (c >= 2 ? 8 : 0);
}
__device__ __forceinline__ int fg_col(int wn, int j, int t, int c) { return wn + j * 8 + t * 2 + (c & 1); }

// 16 codes as one 16-byte access (aligned addresses only).
struct alignas(16) fg_v16 {
    u32 w[4];
};
__device__ __forceinline__ fg_v16 fg_load16(const u8* p) {
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
    return *(const fg_v16*)p;
#else
    fg_v16 v;
    memcpy(&v, p, 16);
    return v;
#endif
}
// One 4-code word into shared memory (4-byte aligned).
__device__ __forceinline__ void fg_put_word(u8* p, u32 w) {
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
    *(u32*)p = w;
#else
    memcpy(p, &w, 4);
#endif
}
__device__ __forceinline__ bool fg_aligned16(const u8* p) {
    return ((unsigned long long)p & 15) == 0;
}

// 16 bytes global -> shared without passing through registers (cp.async, sm_80+): it lands by
// the time this thread waits for its group (fg_async_wait); the emulation lands it exactly then.
__device__ __forceinline__ void fg_copy16_async(u8* d, const u8* s) {
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
    const unsigned sd = (unsigned)__cvta_generic_to_shared(d);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sd), "l"(s) : "memory");
#else
    emu_cp_async(d, s, 16);
#endif
}
// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void fg_async_commit() {
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    emu_cp_async_commit();
#endif
}
// Waits until at most `pending` (0 or 1) of this thread's newest groups are still in flight. The
// "memory" clobbers keep the compiler from moving shared-memory reads across the copies' issue
// and wait (today the barrier after each wait also does).
__device__ __forceinline__ void fg_async_wait(int pending) {
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
    if (pending > 0) {
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    } else {
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
#else
    emu_cp_async_wait(pending);
#endif
}

// The 4×4 byte transpose of words a, b, c, d (4 rows' codes at K 0, 1, 2, 3): out[i] holds row
// i's codes at K 0..3, the lowest K in the lowest byte.
__device__ __forceinline__ void fg_transpose4(u32 a, u32 b, u32 c, u32 d, u32* out) {
    const u32 ab_lo = __byte_perm(a, b, 0x5140), ab_hi = __byte_perm(a, b, 0x7362);
    const u32 cd_lo = __byte_perm(c, d, 0x5140), cd_hi = __byte_perm(c, d, 0x7362);
    out[0] = __byte_perm(ab_lo, cd_lo, 0x5410);
    out[1] = __byte_perm(ab_lo, cd_lo, 0x7632);
    out[2] = __byte_perm(ab_hi, cd_hi, 0x5410);
    out[3] = __byte_perm(ab_hi, cd_hi, 0x7632);
}

// K block k0 of rows row0 .. row0 + 64 of an operand into sh [64][FG_PITCH], zero past `rows` and
// `k`. K contiguous (ks = 1): 16 codes along K per access, copied asynchronously (the caller
// commits and waits); rows contiguous (rs = 1, K strided: Dgrad's W, Wgrad's operands): 16 rows
// at each of 4 K per thread, transposed in registers into one 4-code word per staged row; an
// access that is unaligned or crosses the operand's end goes code by code, as do other strides.
__device__ __forceinline__ void fg_stage(u8* sh, const u8* src, long long rs, long long ks,
                                         long long row0, long long rows, long long k0,
                                         long long k) {
    if (ks == 1) {
        for (int q = threadIdx.x; q < FG_M * FG_K / 16; q += blockDim.x) {
            const int r = q >> 3, c = (q & 7) * 16;
            const long long gr = row0 + r, gk = k0 + c;
            u8* d = sh + r * FG_PITCH + c;
            const u8* s = src + gr * rs + gk;
            if (gr < rows && gk + 16 <= k && fg_aligned16(s)) {
                fg_copy16_async(d, s);
            } else {
#pragma unroll
                for (int i = 0; i < 16; i++) d[i] = (gr < rows && gk + i < k) ? s[i] : (u8)0;
            }
        }
    } else if (rs == 1) {
        for (int q = threadIdx.x; q < FG_M * FG_K / 64; q += blockDim.x) {
            const int c = (q >> 2) * 4, r = (q & 3) * 16;
            const long long gr = row0 + r, gk = k0 + c;
            const u8* s = src + gr + gk * ks;
            if (gk + 4 <= k && gr + 16 <= rows && fg_aligned16(s) && (ks & 15) == 0) {
                const fg_v16 v0 = fg_load16(s), v1 = fg_load16(s + ks);
                const fg_v16 v2 = fg_load16(s + 2 * ks), v3 = fg_load16(s + 3 * ks);
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    u32 rows4[4];
                    fg_transpose4(v0.w[w], v1.w[w], v2.w[w], v3.w[w], rows4);
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        fg_put_word(sh + (r + 4 * w + i) * FG_PITCH + c, rows4[i]);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int i = 0; i < 16; i++)
                        sh[(r + i) * FG_PITCH + c + j] =
                            (gr + i < rows && gk + j < k) ? s[i + j * ks] : (u8)0;
            }
        }
    } else {
        for (int e = threadIdx.x; e < FG_M * FG_K; e += blockDim.x) {
            const int r = e / FG_K, c = e % FG_K;
            const long long gr = row0 + r, gk = k0 + c;
            sh[r * FG_PITCH + c] = (gr < rows && gk < k) ? src[gr * rs + gk * ks] : (u8)0;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    fp8_grouped_gemm(const long long* __restrict__ problems, const int* __restrict__ tiles) {
    // two buffers per operand (36 KiB in all): block kb + 1 is staged while block kb is read;
    // 16-byte storage keeps the staged rows aligned for the 16-code copies and fragment loads
    __shared__ fg_v16 sa_words[2][FG_M * FG_PITCH / 16];
    __shared__ fg_v16 sb_words[2][FG_N * FG_PITCH / 16];
    const int* t = tiles + 3 * (long long)blockIdx.x;
    const long long* p = problems + (long long)FG_FIELDS * t[0];
    const long long row0 = t[1], col0 = t[2];
    const long long m = p[0], n = p[1], k = p[2];
    const u8* a = (const u8*)p[3];
    const long long a_i = p[4], a_k = p[5];
    const float* sa = (const float*)p[6];
    const long long sa_kb = p[7], sa_i = p[8], sa_div = p[9];
    const u8* b = (const u8*)p[10];
    const long long b_j = p[11], b_k = p[12];
    const float* sb = (const float*)p[13];
    const long long sb_kb = p[14], sb_j = p[15], sb_div = p[16];
    float* out = (float*)p[17];
    const long long out_ld = p[18], accumulate = p[19];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tg = lane & 3;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    float acc[2][4][4];
    #pragma unroll
    for (int i = 0; i < 2; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;

    fg_stage((u8*)sa_words[0], a, a_i, a_k, row0, m, 0, k);
    fg_stage((u8*)sb_words[0], b, b_j, b_k, col0, n, 0, k);
    fg_async_commit();
    for (long long k0 = 0, buf = 0; k0 < k; k0 += FG_K, buf ^= 1) {
        const u8* sa_tile = (const u8*)sa_words[buf];
        const u8* sb_tile = (const u8*)sb_words[buf];
        // the next block into the other buffers (read by the previous block: the barrier at the
        // end of that block's loop let every warp finish it)
        const bool more = k0 + FG_K < k;
        if (more) {
            fg_stage((u8*)sa_words[buf ^ 1], a, a_i, a_k, row0, m, k0 + FG_K, k);
            fg_stage((u8*)sb_words[buf ^ 1], b, b_j, b_k, col0, n, k0 + FG_K, k);
            fg_async_commit();
        }
        // this thread's 4 rows' and 8 columns' scales of the block (0 past m or n: those
        // accumulators are never stored, and their staged codes are zero)
        const long long kb = k0 / FG_K;
        float srow[2][2], ucol[4][2];
        #pragma unroll
        for (int i = 0; i < 2; i++)
            #pragma unroll
            for (int h = 0; h < 2; h++) {
                const long long row = row0 + fg_row(wm, i, g, 2 * h);
                srow[i][h] = row < m ? sa[kb * sa_kb + (row / sa_div) * sa_i] : 0.0f;
            }
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int c = 0; c < 2; c++) {
                const long long col = col0 + fg_col(wn, j, tg, c);
                ucol[j][c] = col < n ? sb[kb * sb_kb + (col / sb_div) * sb_j] : 0.0f;
            }
        fg_async_wait(more ? 1 : 0);  // this block's copies have landed (the next may be in flight)
        __syncthreads();              // ... and every thread's, with the plain stores
        float part[2][4][4];
        #pragma unroll
        for (int i = 0; i < 2; i++)
            #pragma unroll
            for (int j = 0; j < 4; j++)
                #pragma unroll
                for (int c = 0; c < 4; c++) part[i][j][c] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < FG_K; kk += 32) {
            u32 af[2][4], bf[4][2];
            #pragma unroll
            for (int i = 0; i < 2; i++) {
                const u8* r = sa_tile + (wm + i * 16 + g) * FG_PITCH + kk + tg * 4;
                af[i][0] = fg_word(r);
                af[i][1] = fg_word(r + 8 * FG_PITCH);
                af[i][2] = fg_word(r + 16);
                af[i][3] = fg_word(r + 8 * FG_PITCH + 16);
            }
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                const u8* r = sb_tile + (wn + j * 8 + g) * FG_PITCH + kk + tg * 4;
                bf[j][0] = fg_word(r);
                bf[j][1] = fg_word(r + 16);
            }
            #pragma unroll
            for (int i = 0; i < 2; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) fg_mma(part[i][j], af[i], bf[j]);
        }
        // promotion: the block's sum times both scales into the f32 accumulator
        #pragma unroll
        for (int i = 0; i < 2; i++)
            #pragma unroll
            for (int j = 0; j < 4; j++)
                #pragma unroll
                for (int c = 0; c < 4; c++)
                    acc[i][j][c] = acc[i][j][c] +
                                   __fmul_rn(__fmul_rn(part[i][j][c], srow[i][c >> 1]), ucol[j][c & 1]);
        __syncthreads();  // every warp has read this block's buffers before they are staged again
    }
    #pragma unroll
    for (int i = 0; i < 2; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int c = 0; c < 4; c++) {
                const long long row = row0 + fg_row(wm, i, g, c), col = col0 + fg_col(wn, j, tg, c);
                if (row < m && col < n) {
                    float* o = out + row * out_ld + col;
                    *o = accumulate ? *o + acc[i][j][c] : acc[i][j][c];
                }
            }
}

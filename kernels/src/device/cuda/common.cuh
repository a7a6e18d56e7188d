// Prelude of every kernel source (kernels/src/device/cuda/mod.rs prepends it before NVRTC compiles
// a source; sources do not #include it): element types and block reductions whose tree is fixed by
// the block size alone, so a reduction gives the same bits on every run (no atomics anywhere).
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

// The reduction operators (functors, so one tree serves them all).
struct SumF {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct SumU32 {
    __device__ __forceinline__ u32 operator()(u32 a, u32 b) const { return a + b; }
};
struct MaxU32 {
    __device__ __forceinline__ u32 operator()(u32 a, u32 b) const { return max(a, b); }
};
// fmaxf drops NaN as Rust's f32::max does.
struct MaxF {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// A warp reduction by a butterfly: every lane ends with the same bits (the operators commute
// exactly: a + b == b + a).
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// A block reduction, returned to every thread: warps first, then warp 0's lanes over the warps'
// results (lanes past the last warp hold `identity`). blockDim.x must be a multiple of 32
// (≤ 1024), every thread of the block must call it, and `sh` holds 32 elements of shared memory.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* sh, T identity, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    T t = warp_reduce(lane < warps ? sh[lane] : identity, op);
    __syncthreads();  // sh may be reused by the caller's next reduction
    return t;
}

// A block's exclusive prefix sum of u32 flags or counts (exact: integers), and its total in
// *total; every thread must call it, blockDim.x a multiple of 32, `sh` 32 elements of shared
// memory. Lanes read lower lanes with __shfl_sync (a lane below the offset keeps its value).
__device__ __forceinline__ u32 block_exclusive_scan(u32 v, u32* sh, u32* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 x = v;
    for (int o = 1; o < 32; o <<= 1) {
        u32 y = __shfl_sync(FULL_MASK, x, lane >= o ? lane - o : lane);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        u32 w = lane < warps ? sh[lane] : 0u;
        for (int o = 1; o < 32; o <<= 1) {
            u32 y = __shfl_sync(FULL_MASK, w, lane >= o ? lane - o : lane);
            if (lane >= o) w += y;
        }
        sh[lane] = w;
    }
    __syncthreads();
    u32 before = (warp > 0 ? sh[warp - 1] : 0u) + x - v;
    *total = sh[warps - 1];
    __syncthreads();  // sh may be reused by the caller's next scan
    return before;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumF()); }
__device__ __forceinline__ u32 warp_max_u32(u32 v) { return warp_reduce(v, MaxU32()); }
__device__ __forceinline__ float block_sum(float v, float* sh) { return block_reduce(v, sh, 0.0f, SumF()); }
__device__ __forceinline__ u32 block_max_u32(u32 v, u32* sh) { return block_reduce(v, sh, 0u, MaxU32()); }
__device__ __forceinline__ float block_max(float v, float* sh) {
    return block_reduce(v, sh, -__int_as_float(0x7f800000), MaxF());
}

// BF16 as half 2.7's bf16::from_f32 rounds it (the moments of AdamW, every BF16 GEMM operand):
// a NaN keeps its high bits with the quiet bit set; anything else rounds to nearest even.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    const u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x0040u);
    const u32 rb = 0x8000u;
    if ((x & rb) != 0u && (x & (3u * rb - 1u)) != 0u) return (u16)((x >> 16) + 1u);
    return (u16)(x >> 16);
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float((u32)b << 16); }

// An E4M3 code's exact value (fp8/format.rs: decode_e4m3_arith): the code's low 7 bits as an f32
// exponent/mantissa field, times 2^120; the sign bit moved to bit 31; 0x7F/0xFF are NaN.
__device__ __forceinline__ float decode_e4m3(u8 code) {
    u32 c = code;
    float mag = __uint_as_float((c & 0x7Fu) << 20) * __uint_as_float(247u << 23);
    float v = (c & 0x7Fu) == 0x7Fu ? __uint_as_float(0x7FC00000u) : mag;
    return __uint_as_float(__float_as_uint(v) | ((c & 0x80u) << 24));
}

// Many tensors in one launch, one block per chunk of a tensor (the optimizer step, the grad
// norm's first pass): block c belongs to the last tensor i with firsts[i] ≤ c, firsts holding
// each tensor's first block in order (an empty tensor shares its successor's and is never
// chosen; the host's `launch::optim::first_blocks`).
__device__ __forceinline__ int tensor_of_block(const long long* firsts, int tensors, long long c) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (firsts[mid] <= c) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// FP8 E4M3 quantisation and dequantisation. Mirrors kernels/src/fp8/quant.rs: quantize_1x128,
// quantize_128x1, quantize_128x128 and dequantize (with format.rs's decode_e4m3_arith), meant to
// be bit-identical: amax = max |x| over the group by magnitude bits, clamped ≥ 1e-4 (a NaN amax
// stays NaN, so a group with a NaN gives NaN codes throughout); scale = amax/448 (IEEE division) or, for UE8M0,
// the next power of two by the same bit trick as pow2_ceil; code = satfinite round-to-nearest-even
// E4M3 of x · (1/scale). Compiled without FMA contraction (Rust does not contract either).
// Known difference: a NaN element's code and a NaN code's decoded value may differ from the CPU
// in the NaN's sign/payload bits (the GPU writes canonical NaNs).
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.
#include <cuda_fp8.h>

#define E4M3_MAX 448.0f
#define AMAX_MIN 1e-4f
#define TILE 128

// Smallest power of two ≥ x for positive normal x; x itself otherwise (quant.rs: pow2_ceil).
__device__ __forceinline__ float pow2_ceil(float x) {
    u32 b = __float_as_uint(x);
    bool not_finite = (b & 0x7F800000u) == 0x7F800000u;
    if ((b & 0x007FFFFFu) == 0u || not_finite) return x;
    return __uint_as_float((b & 0x7F800000u) + 0x00800000u);
}

// quant.rs: scale_from_amax (ue8m0 = 0: ScaleFormat::F32, 1: ScaleFormat::Ue8m0).
__device__ __forceinline__ float scale_from_amax(float amax, int ue8m0) {
    float a = isnan(amax) ? amax : fmaxf(amax, AMAX_MIN);
    float s = a / E4M3_MAX;
    return ue8m0 ? pow2_ceil(s) : s;
}

__device__ __forceinline__ u8 encode_e4m3_sat(float v) {
    return (u8)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ u32 abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

// quant.rs: quantize_1x128_into. One warp per 1×128 tile (lane l takes columns l, l+32, l+64,
// l+96 of it); any block size that is a multiple of 32; grid = ⌈rows·⌈cols/128⌉ / warps per block⌉.
// codes [rows, cols], scales [rows, ⌈cols/128⌉], row-major.
extern "C" __global__ void fp8_quantize_1x128(const float* __restrict__ x, u8* __restrict__ codes,
                                              float* __restrict__ scales, int rows, int cols,
                                              int ue8m0) {
    const int lane = threadIdx.x & 31;
    const long long tiles_per_row = (cols + TILE - 1) / TILE;
    const long long tile = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (tile >= (long long)rows * tiles_per_row) return;  // whole warps leave together
    const long long r = tile / tiles_per_row;
    const int c0 = (int)(tile % tiles_per_row) * TILE;
    const float* xr = x + r * cols;
    float v[4];
    u32 m = 0u;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        int c = c0 + lane + 32 * k;
        v[k] = c < cols ? xr[c] : 0.0f;  // the zero padding never raises amax
        m = max(m, abs_bits(v[k]));
    }
    m = warp_max_u32(m);
    const float s = scale_from_amax(__uint_as_float(m), ue8m0);
    const float inv = 1.0f / s;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        int c = c0 + lane + 32 * k;
        if (c < cols) codes[r * cols + c] = encode_e4m3_sat(v[k] * inv);
    }
    if (lane == 0) scales[tile] = s;
}

// quant.rs: quantize_128x1 of rows r0 .. r1 (≤ 128) of column c: their amax, one scale at
// scales[band·cols + c], their codes.
__device__ __forceinline__ void quantize_band_128x1(const float* __restrict__ x,
                                                    u8* __restrict__ codes,
                                                    float* __restrict__ scales, int cols, int ue8m0,
                                                    int c, int r0, int r1, long long band) {
    // unrolled by 16: a thread's column loads issued together rather than a few at a time
    u32 m = 0u;
#pragma unroll 16
    for (int r = r0; r < r1; r++) m = max(m, abs_bits(x[(long long)r * cols + c]));
    const float s = scale_from_amax(__uint_as_float(m), ue8m0);
    const float inv = 1.0f / s;
#pragma unroll 16
    for (int r = r0; r < r1; r++) {
        long long i = (long long)r * cols + c;
        codes[i] = encode_e4m3_sat(x[i] * inv);
    }
    scales[band * cols + c] = s;
}

// quant.rs: quantize_128x1. One thread per column of a 128-row band: grid = (⌈cols/blockDim.x⌉,
// ⌈rows/128⌉), any block size. scales [⌈rows/128⌉, cols].
extern "C" __global__ void fp8_quantize_128x1(const float* __restrict__ x, u8* __restrict__ codes,
                                              float* __restrict__ scales, int rows, int cols,
                                              int ue8m0) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const int r0 = blockIdx.y * TILE, r1 = min(r0 + TILE, rows);
    quantize_band_128x1(x, codes, scales, cols, ue8m0, c, r0, r1, blockIdx.y);
}

// quantize_128x1 of each segment of rows on its own (the routed experts' rows for Wgrad), all in
// one launch: band b covers rows bands[2b] .. bands[2b + 1], 128 rows of one segment from its
// start (the last band of a segment may be shorter); codes stay in place [rows, cols], band b's
// scales at scales[b·cols ..]. grid = (⌈cols/blockDim.x⌉, bands), any block size.
extern "C" __global__ void fp8_quantize_128x1_segmented(const float* __restrict__ x,
                                                        u8* __restrict__ codes,
                                                        float* __restrict__ scales,
                                                        const int* __restrict__ bands, int cols,
                                                        int ue8m0) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long long b = blockIdx.y;
    quantize_band_128x1(x, codes, scales, cols, ue8m0, c, bands[2 * b], bands[2 * b + 1], b);
}

// quant.rs: quantize_128x128, the block (bx, by) of x [rows, cols]: amax over it, one scale at
// scales[by·gx + bx] (gx = ⌈cols/128⌉), its codes. Every thread of the block calls it;
// blockDim.x a multiple of 32 (256 intended).
__device__ __forceinline__ void quantize_block_128x128(const float* __restrict__ x,
                                                       u8* __restrict__ codes,
                                                       float* __restrict__ scales, int rows,
                                                       int cols, int ue8m0, int bx, int by,
                                                       int gx, u32* sh) {
    const int r0 = by * TILE, c0 = bx * TILE;
    const int h = min(TILE, rows - r0), w = min(TILE, cols - c0);
    u32 m = 0u;
    for (int e = threadIdx.x; e < h * TILE; e += blockDim.x) {
        int r = r0 + e / TILE, c = c0 + e % TILE;
        if (e % TILE < w) m = max(m, abs_bits(x[(long long)r * cols + c]));
    }
    m = block_max_u32(m, sh);
    const float s = scale_from_amax(__uint_as_float(m), ue8m0);
    const float inv = 1.0f / s;
    for (int e = threadIdx.x; e < h * TILE; e += blockDim.x) {
        int r = r0 + e / TILE, c = c0 + e % TILE;
        if (e % TILE < w) {
            long long i = (long long)r * cols + c;
            codes[i] = encode_e4m3_sat(x[i] * inv);
        }
    }
    if (threadIdx.x == 0) scales[(long long)by * gx + bx] = s;
}

// quant.rs: quantize_128x128. One block per 128×128 weight block: grid = (⌈cols/128⌉, ⌈rows/128⌉),
// blockDim.x a multiple of 32 (256 intended). scales [⌈rows/128⌉, ⌈cols/128⌉].
extern "C" __global__ void fp8_quantize_128x128(const float* __restrict__ x, u8* __restrict__ codes,
                                                float* __restrict__ scales, int rows, int cols,
                                                int ue8m0) {
    __shared__ u32 sh[32];
    quantize_block_128x128(x, codes, scales, rows, cols, ue8m0, blockIdx.x, blockIdx.y, gridDim.x,
                           sh);
}

// quantize_128x128 of gridDim.z matrices of one shape in one launch (the routed experts'
// weights): matrix z is read at xs[z] and written to codes + z·rows·cols and scales +
// z·⌈rows/128⌉·⌈cols/128⌉. grid = (⌈cols/128⌉, ⌈rows/128⌉, matrices).
extern "C" __global__ void fp8_quantize_128x128_batched(const u64* __restrict__ xs,
                                                        u8* __restrict__ codes,
                                                        float* __restrict__ scales, int rows,
                                                        int cols, int ue8m0) {
    __shared__ u32 sh[32];
    const long long z = blockIdx.z;
    const long long per_scales = (long long)gridDim.x * gridDim.y;
    quantize_block_128x128((const float*)xs[z], codes + z * rows * (long long)cols,
                           scales + z * per_scales, rows, cols, ue8m0, blockIdx.x, blockIdx.y,
                           gridDim.x, sh);
}

// quant.rs: dequantize, any layout: group_rows × group_cols share a scale (1×128, 128×1 or
// 128×128), scales row-major [⌈rows/group_rows⌉, ⌈cols/group_cols⌉]. Grid-stride, any launch.
extern "C" __global__ void fp8_dequantize(const u8* __restrict__ codes, const float* __restrict__ scales,
                                          float* __restrict__ y, int rows, int cols, int group_rows,
                                          int group_cols) {
    const long long n = (long long)rows * cols;
    const long long sc = (cols + group_cols - 1) / group_cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / cols, c = i % cols;
        y[i] = decode_e4m3(codes[i]) * scales[(r / group_rows) * sc + c / group_cols];
    }
}

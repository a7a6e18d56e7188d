// The FP8 GEMM operands in the layout cuBLASLt's block-scaled FP8 matmul takes: codes K-major with
// padded rows, scales K-block-major (VEC128_32F) or in 16-byte aligned block rows (BLK128x128_32F).
// Mirrors kernels/src/fp8/pack.rs: Gather::apply, one kernel per element type:
//   dst[r·ld + c] = src[r·rs + c·cs] for c < cols, 0 for cols ≤ c < ld, r < rows.
// Pure copies: the CPU's bits. Grid-stride over rows·ld, any launch shape; no atomics.
// Written for issue 12 and compile-checked for sm_90; never run on a GPU.

template <typename T>
__device__ __forceinline__ void gather(T* __restrict__ dst, const T* __restrict__ src,
                                       long long rows, long long cols, long long rs, long long cs,
                                       long long ld) {
    long long total = rows * ld;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        long long r = e / ld, c = e - (e / ld) * ld;
        dst[e] = c < cols ? src[r * rs + c * cs] : (T)0;
    }
}

extern "C" __global__ void fp8_pack_codes(u8* __restrict__ dst, const u8* __restrict__ src,
                                          long long rows, long long cols, long long rs,
                                          long long cs, long long ld) {
    gather(dst, src, rows, cols, rs, cs, ld);
}

extern "C" __global__ void fp8_pack_scales(float* __restrict__ dst, const float* __restrict__ src,
                                           long long rows, long long cols, long long rs,
                                           long long cs, long long ld) {
    gather(dst, src, rows, cols, rs, cs, ld);
}

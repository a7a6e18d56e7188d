// Host stand-in for the one part of CUDA's cuda_fp8.h the kernels use (fp8_quant.cu:
// __nv_cvt_float_to_fp8 with __NV_SATFINITE and __NV_E4M3), so that the emulation driver can run
// the FP8 quantisers (kernels/tests/cuda_emulation.rs). Written from the format's definition, not
// from CUDA's header: E4M3 "fn" (bias 7, 3 mantissa bits, no infinities, 0x7F/0xFF NaN, largest
// finite 448), round to nearest even, saturating: a finite value or an infinity beyond 448 gives
// ±448; NaN gives 0x7F. On the GPU the real intrinsic runs; that it agrees with
// kernels/src/fp8/format.rs's encode_e4m3 bit for bit was measured on an H200
// (../shared/reference/gpu-h200.md: 7.3M adversarial values). What this stand-in lets the
// emulation check is the rest of each quantiser: groups, amax, scales and indexing.
#pragma once
#include <math.h>
#include <stdlib.h>

typedef unsigned char __nv_fp8_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float v, __nv_saturation_t sat,
                                                __nv_fp8_interpretation_t kind) {
    if (sat != __NV_SATFINITE || kind != __NV_E4M3) abort();  // the only conversion used
    if (isnan(v)) return 0x7F;
    const unsigned char sign = signbit(v) ? 0x80 : 0x00;
    if (isinf(v)) return sign | 0x7E;
    const double a = fabs((double)v);
    // subnormals: multiples of 2^-9 below 2^-6 (a count of 8 is the smallest normal, code 0x08)
    if (a < 0.015625) return sign | (unsigned char)nearbyint(a * 512.0);
    int e;
    frexp(a, &e);  // a = f·2^e, f in [0.5, 1): the leading bit is 2^(e-1)
    const double step = ldexp(1.0, e - 1 - 3);
    double q = nearbyint(a / step);  // 8..16 steps of the binade (16: the next binade)
    int exp = e - 1;
    if (q == 16.0) q = 8.0, exp += 1;
    if (exp > 8 || (exp == 8 && q > 14.0)) return sign | 0x7E;  // beyond 448: saturate
    return sign | (unsigned char)(((exp + 7) << 3) | ((int)q - 8));
}

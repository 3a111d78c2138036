// Portable 8-lane SIMD helpers built on GCC/Clang vector extensions.
//
// The same source compiles to SSE2 in the default build and to AVX2/AVX-512 inside
// functions marked LORAFIT_SIMD_DISPATCH, which the loader picks at run time (ifunc),
// so one wheel runs on any x86-64 and still builds on ARM.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define LORAFIT_SIMD_DISPATCH \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORAFIT_SIMD_DISPATCH
#endif

#define LORAFIT_INLINE inline __attribute__((always_inline))

namespace lorafit {

// Logit element types: the Python side passes bf16 and fp16 as raw uint16 buffers.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

constexpr int kLanes = 8;
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));

LORAFIT_INLINE vf8 splat(float x) { return vf8{} + x; }

LORAFIT_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

LORAFIT_INLINE float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// IEEE half -> float, exact for normals, subnormals, inf and NaN (branch-free, vectorisable).
LORAFIT_INLINE vf8 half8_to_float(vh8 h16) {
  vu8 h = __builtin_convertvector(h16, vu8);
  const vu8 exp_mask = vu8{} + (0x7c00u << 13);
  vu8 o = (h & 0x7fffu) << 13;
  vu8 exponent = o & exp_mask;
  o += (127u - 15u) << 23;
  vi8 is_inf_nan = exponent == exp_mask;
  vi8 is_subnormal = exponent == 0u;
  o += (vu8)is_inf_nan & ((128u - 16u) << 23);
  o += (vu8)is_subnormal & (1u << 23);
  vf8 f = (vf8)o;
  // Subnormals were built with an implicit leading one; subtract it back (2^-14).
  f -= (vf8)((vu8)is_subnormal & (113u << 23));
  return (vf8)((vu8)f | ((h & 0x8000u) << 16));
}

LORAFIT_INLINE float half_to_float(uint16_t h) {
  vh8 v = {h, 0, 0, 0, 0, 0, 0, 0};
  return half8_to_float(v)[0];
}

LORAFIT_INLINE vf8 bf16x8_to_float(vh8 h16) {
  return (vf8)(__builtin_convertvector(h16, vu8) << 16);
}

// Converts n elements of any logit type to float (n need not be a multiple of 8).
LORAFIT_INLINE void convert_to_float(const void* src, DType dtype, int64_t n, float* dst) {
  int64_t i = 0;
  if (dtype == DType::Float32) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
  } else if (dtype == DType::Float64) {
    const double* s = static_cast<const double*>(src);
    for (; i < n; ++i) dst[i] = float(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    const bool is_bf16 = dtype == DType::BFloat16;
    for (; i + kLanes <= n; i += kLanes) {
      vh8 h;
      std::memcpy(&h, s + i, sizeof h);
      vf8 f = is_bf16 ? bf16x8_to_float(h) : half8_to_float(h);
      std::memcpy(dst + i, &f, sizeof f);
    }
    for (; i < n; ++i) dst[i] = is_bf16 ? bf16_to_float(s[i]) : half_to_float(s[i]);
  }
}

LORAFIT_INLINE double load_as_double(const void* src, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::Float32: return static_cast<const float*>(src)[i];
    case DType::Float64: return static_cast<const double*>(src)[i];
    case DType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(src)[i]);
    default: return half_to_float(static_cast<const uint16_t*>(src)[i]);
  }
}

LORAFIT_INLINE int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    default: return 2;
  }
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp). Results below ~1e-38 flush to 0,
// which is harmless here: every caller adds them to a sum that is >= 1.
LORAFIT_INLINE vf8 exp_nonpositive(vf8 x) {
  const vf8 clamped = x < -87.0f ? splat(-87.0f) : x;
  // Round to nearest by the 1.5*2^23 trick (the conversion below truncates).
  const vf8 shifter = splat(12582912.0f);
  vf8 n = (clamped * 1.44269504088896341f + shifter) - shifter;
  vf8 r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi8 pow2 = (__builtin_convertvector(n, vi8) + 127) << 23;
  vf8 result = p * (vf8)pow2;
  return x < -87.0f ? vf8{} : result;
}

// Widening all 8 lanes at once compiles to two vcvtps2pd ymm on AVX (halves do not).
LORAFIT_INLINE void add_as_double(vf8 v, vd4& low, vd4& high) {
  const vd8 wide = __builtin_convertvector(v, vd8);
  low += __builtin_shufflevector(wide, wide, 0, 1, 2, 3);
  high += __builtin_shufflevector(wide, wide, 4, 5, 6, 7);
}

constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

}  // namespace lorafit

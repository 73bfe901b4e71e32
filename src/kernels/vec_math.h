#pragma once
// Vectorisable float32 math for the hand-written CPU kernels (src/kernels/):
// branch-free, so GCC and Clang vectorise loops over them. Include only from
// files compiled with -fno-trapping-math (CMakeLists.txt's kernel flags),
// without which GCC keeps the selects as branches and the loops scalar.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cmath>
#include <cstring>

namespace vlmkit {
namespace kernels {

// exp for float32, written so that GCC and Clang vectorise loops over it
// (branch-free: round-to-nearest by the 1.5 * 2^23 trick, range reduction to
// [-ln2/2, ln2/2] and Cephes' degree-6 expf polynomial; relative error below
// 2e-7). 0 below -87.3 (where expf is denormal or 0); -inf gives 0.
inline __attribute__((always_inline)) float exp_f32(float x) {
  const float lo = -87.33654475f, hi = 88.0f, magic = 12582912.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float t = xc * 1.44269504088896341f + magic;
  const int32_t n = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, magic);
  const float fn = t - magic;
  float r = xc - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * __builtin_bit_cast(float, (n + 127) << 23);
  return x < lo ? 0.f : y;
}

// The accumulation type of the kernels: float32 for float32 and bfloat16
// inputs, float64 for float64 (the gradcheck path).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Loads and stores through float; bfloat16 by bit shifts (round to nearest
// even, NaN kept), which vectorise where c10::BFloat16's conversions do not.
inline __attribute__((always_inline)) float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline __attribute__((always_inline)) float load(const c10::BFloat16* p, int64_t i) {
  uint16_t b;
  std::memcpy(&b, p + i, 2);
  return __builtin_bit_cast(float, uint32_t(b) << 16);
}
inline __attribute__((always_inline)) void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline __attribute__((always_inline)) void store(c10::BFloat16* p, int64_t i, float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t b = uint16_t(v != v ? 0x7FC0u : rounded);
  std::memcpy(p + i, &b, 2);
}

// Abramowitz & Stegun 7.1.26: erfc(a) ~= erfc_poly(a) * exp(-a^2) for a >= 0.
inline __attribute__((always_inline)) float erfc_poly(float a) {
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  return p * t;
}

// erf for float32 (Abramowitz & Stegun 7.1.26, the formula of ATen's
// vectorised erf; absolute error below 1.5e-7).
inline __attribute__((always_inline)) float erf_f32(float x) {
  const float ax = x < 0.f ? -x : x;
  const float y = 1.0f - erfc_poly(ax) * exp_f32(-ax * ax);
  return x < 0.f ? -y : y;
}

// Phi(x) and phi(x) (the standard normal CDF and density) from one exp:
// erf by Abramowitz & Stegun 7.1.26 as in vec_math.h, with the tail written
// as 0.5 * poly * e directly, so Phi keeps its relative precision for x << 0.
inline __attribute__((always_inline)) void normal_parts(float x, float& cdf, float& pdf) {
  const float z = x * 0.70710678118654752f;
  const float az = z < 0.f ? -z : z;
  const float e = exp_f32(-z * z);
  const float tail = 0.5f * erfc_poly(az) * e;  // Phi(-|x|)
  cdf = z < 0.f ? tail : 1.0f - tail;
  pdf = e * 0.39894228040143268f;
}
inline void normal_parts(double x, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-x * 0.70710678118654752);
  pdf = std::exp(-0.5 * x * x) * 0.39894228040143268;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The widest vector ISA of this CPU the kernels have clones for: 2 AVX-512
// (F, BW, VL, DQ), 1 AVX2 + FMA, 0 the baseline.
inline int cpu_isa() {
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
                               ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                             : 0;
  return level;
}
#endif

}  // namespace kernels
}  // namespace vlmkit

// CPU helpers for csrc/cpu/*.cpp: fp32 row conversion and vectorizable exp / tanh.
//
// Design: every CPU kernel converts its rows to fp32 scratch, runs an fp32 row function, and
// converts once on store (the Liger "load, cast to fp32, compute, cast once" pattern). The fp32
// row functions are compiled twice with GCC's target_clones (AVX2 and the x86-64 baseline) and
// picked at load time, so one build is fast on AVX2 machines and still runs on older ones; the
// inference-only loops of the fused decode step (GPT2F_CLONES_AVX512) get an AVX-512F clone too, which
// halved the GELU's share of a 32-token fp32 prefill (2.6% -> 1.1%, perf on this Xeon). The training
// ops keep AVX2: with AVX-512 clones everywhere the demo's bf16 training step ran a median 1.05x the
// time over 8 paired runs (noisy, not a clear gain). std::exp / std::tanh do not vectorize without -ffast-math, so exp is a Cephes-style
// range reduction + degree-6 polynomial (relative error ~2e-7 on the fp32 range), written with
// plain arithmetic so that the loops around it vectorize (that also needs -fno-trapping-math,
// which gpt2_fast/build_ext.py passes, as torch's own build does, so that selects if-convert).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__GNUC__)
#define GPT2F_INLINE inline __attribute__((always_inline))  // inlined into the cloned loops, or they do not vectorize
#else
#define GPT2F_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// "avx2" and not "arch=haswell": GCC will not inline the default-target helpers below into an
// arch= clone, and without inlining the loops do not vectorize.
#define GPT2F_CLONES __attribute__((target_clones("avx2", "default")))
#define GPT2F_CLONES_AVX512 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GPT2F_CLONES
#define GPT2F_CLONES_AVX512
#endif

namespace gpt2_fast {
namespace cpu {

template <typename T>
inline void load_f32(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
inline void load_f32<float>(const float* __restrict src, float* __restrict dst, int64_t n) {
  std::memcpy(dst, src, sizeof(float) * n);
}
template <>
inline void load_f32<c10::BFloat16>(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  // bf16 -> fp32 is a 16-bit left shift; on raw bits so that the loop vectorizes.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

template <typename T>
inline void store_f32(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // round to nearest even
}
template <>
inline void store_f32<float>(const float* __restrict src, float* __restrict dst, int64_t n) {
  std::memcpy(dst, src, sizeof(float) * n);
}

// exp(x) for fp32, vectorizable (no calls, no branches). x <= -87.3 gives ~1e-38, not 0:
// callers that need exact zeros (masked attention scores) set them explicitly.
GPT2F_INLINE float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : x;  // selects, not fminf: vectorizable with -fno-trapping-math
  x = x > 88.7f ? 88.7f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(z) = (e - 1) / (e + 1), e = exp(2z); |z| clamped to 9 where tanh is 1 in fp32.
GPT2F_INLINE float tanh_f32(float z) {
  z = z < -9.0f ? -9.0f : z;
  z = z > 9.0f ? 9.0f : z;
  float e = exp_f32(2.0f * z);
  return (e - 1.0f) / (e + 1.0f);
}

}  // namespace cpu
}  // namespace gpt2_fast

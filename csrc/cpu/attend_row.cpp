// One query row of decode attention over its live KV-cache slots, for the fused CPU forward
// (decode_step.cpp): for one head with K, V (S, D) fp32 row-major and live slots [j0, j1)
//   p[j] = scale * q . K[j];   o = sum_j softmax(p)[j] V[j]
// in three passes (scores and their max, exp and sum, the weighted sum of V rows), fp32 throughout.
//
// Two implementations of the scores and values passes, the same math:
//  - generic: any D, vectorized by the compiler (GPT2F_CLONES_AVX512: AVX-512F, AVX2 or baseline);
//  - AVX-512 for D = 64 (every GPT-2 size): four slots at a time with independent accumulators.
//    The generic scores loop is one dependent chain of D/8 FMAs and a horizontal sum per slot (~40
//    cycles for 256 bytes: slower than memory); here four chains run side by side. The values pass
//    keeps o in 4 registers and alternates two sets of accumulators between even and odd slots.
//    Both passes prefetch the slots kPrefetchSlots ahead (K and V in the scores pass, so the values
//    pass reads V from cache; the first slots before the loop): the cache of a head was evicted by
//    the step's weight stream, and its rows are only a few KiB per head, too short for the hardware
//    prefetcher to ramp up.
// The cache holds fp32 or bf16 (uint16_t bits, widened in registers: a shift); bf16 halves the bytes
// attention reads per token (cpu_decode.py's kv_cache_dtype: a bf16 model's cache).
#include "attend_row.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GPT2F_ATTEND_X86 1
#endif

#include "cpu_math.h"

namespace gpt2_fast {
namespace cpu {

namespace {

constexpr int64_t kPrefetchSlots = 16;

GPT2F_INLINE float kv_f32(float v) { return v; }
GPT2F_INLINE float kv_f32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
GPT2F_CLONES_AVX512 float scores_generic(const float* __restrict q, const T* __restrict K, int64_t j0, int64_t j1,
                                  int64_t D, float scale, float* __restrict p) {
  float mx = -INFINITY;
  for (int64_t j = j0; j < j1; ++j) {
    const T* k = K + j * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; ++i) s += q[i] * kv_f32(k[i]);
    p[j] = s * scale;
    mx = std::max(mx, p[j]);
  }
  return mx;
}

template <typename T>
GPT2F_CLONES_AVX512 void values_generic(const float* __restrict p, float inv, const T* __restrict V, int64_t j0,
                                 int64_t j1, int64_t D, float* __restrict o) {
  for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
  for (int64_t j = j0; j < j1; ++j) {
    const float w = p[j] * inv;
    const T* v = V + j * D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) o[i] += w * kv_f32(v[i]);
  }
}

GPT2F_CLONES_AVX512 void exp_shift(float* __restrict s, int64_t n, float mx, float* sum_out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    s[i] = exp_f32(s[i] - mx);
    sum += s[i];
  }
  *sum_out = sum;
}

#ifdef GPT2F_ATTEND_X86
#pragma GCC push_options
#pragma GCC target("avx512f")

template <typename T>
GPT2F_INLINE void prefetch_row64(const T* r) {
  for (int i = 0; i < 64; i += 64 / static_cast<int>(sizeof(T)))
    _mm_prefetch(reinterpret_cast<const char*>(r + i), _MM_HINT_T0);
}

GPT2F_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
GPT2F_INLINE __m512 load16(const uint16_t* p) {  // bf16 bits -> fp32: widen, shift into the high half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <typename T>
GPT2F_INLINE __m512 dot64(const __m512 (&q)[4], const T* k) {
  __m512 a = _mm512_mul_ps(q[0], load16(k));
  __m512 b = _mm512_mul_ps(q[1], load16(k + 16));
  a = _mm512_fmadd_ps(q[2], load16(k + 32), a);
  b = _mm512_fmadd_ps(q[3], load16(k + 48), b);
  return _mm512_add_ps(a, b);
}

template <typename T>
float scores_d64(const float* q, const T* K, const T* V, int64_t j0, int64_t j1, float scale, float* p) {
  const __m512 qv[4] = {_mm512_loadu_ps(q), _mm512_loadu_ps(q + 16), _mm512_loadu_ps(q + 32), _mm512_loadu_ps(q + 48)};
  for (int64_t j = j0; j < std::min(j1, j0 + kPrefetchSlots); ++j) prefetch_row64(K + j * 64), prefetch_row64(V + j * 64);
  float mx = -INFINITY;
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    for (int64_t r = j + kPrefetchSlots; r < std::min(j1, j + 4 + kPrefetchSlots); ++r)
      prefetch_row64(K + r * 64), prefetch_row64(V + r * 64);
    const T* k = K + j * 64;
    const __m512 s0 = dot64(qv, k), s1 = dot64(qv, k + 64), s2 = dot64(qv, k + 128), s3 = dot64(qv, k + 192);
    p[j] = _mm512_reduce_add_ps(s0) * scale;
    p[j + 1] = _mm512_reduce_add_ps(s1) * scale;
    p[j + 2] = _mm512_reduce_add_ps(s2) * scale;
    p[j + 3] = _mm512_reduce_add_ps(s3) * scale;
    mx = std::max(std::max(mx, std::max(p[j], p[j + 1])), std::max(p[j + 2], p[j + 3]));
  }
  for (; j < j1; ++j) {
    p[j] = _mm512_reduce_add_ps(dot64(qv, K + j * 64)) * scale;
    mx = std::max(mx, p[j]);
  }
  return mx;
}

template <typename T>
void values_d64(const float* p, float inv, const T* V, int64_t j0, int64_t j1, float* o) {
  __m512 a[4], b[4];
  for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm512_setzero_ps();
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    const __m512 w0 = _mm512_set1_ps(p[j] * inv), w1 = _mm512_set1_ps(p[j + 1] * inv);
    const T *v0 = V + j * 64, *v1 = v0 + 64;
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm512_fmadd_ps(w0, load16(v0 + 16 * i), a[i]);
      b[i] = _mm512_fmadd_ps(w1, load16(v1 + 16 * i), b[i]);
    }
  }
  if (j < j1) {
    const __m512 w0 = _mm512_set1_ps(p[j] * inv);
    for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(w0, load16(V + j * 64 + 16 * i), a[i]);
  }
  for (int i = 0; i < 4; ++i) _mm512_storeu_ps(o + 16 * i, _mm512_add_ps(a[i], b[i]));
}

#pragma GCC pop_options
#endif

}  // namespace

template <typename T>
void attend_row(const float* q, const T* K, const T* V, int64_t j0, int64_t j1, int64_t D, float* p, float* o,
                bool avx512) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  float sum = 0.f;
#ifdef GPT2F_ATTEND_X86
  if (avx512 && D == 64) {
    const float mx = scores_d64(q, K, V, j0, j1, scale, p);
    exp_shift(p + j0, j1 - j0, mx, &sum);
    values_d64(p, 1.f / sum, V, j0, j1, o);
    return;
  }
#endif
  const float mx = scores_generic(q, K, j0, j1, D, scale, p);
  exp_shift(p + j0, j1 - j0, mx, &sum);
  values_generic(p, 1.f / sum, V, j0, j1, D, o);
}

template void attend_row<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, float*, float*,
                                bool);
template void attend_row<uint16_t>(const float*, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float*,
                                   float*, bool);

}  // namespace cpu
}  // namespace gpt2_fast

// Small-batch GEMV on CPU (fp32 / bf16 / int8 weights, fp32 activations and accumulation) and the
// cpu_linear op built on it. Math and layouts: gemv.h; inner loops: gemv_kernels.inc.
//
// Design: batch-1 decode reads every weight once per token and does 2 flops per weight, so the
// kernels are bandwidth-bound; what matters is (1) reading each weight byte once, in long
// sequential runs the hardware prefetchers follow, (2) converting int8/bf16 to fp32 in registers
// (never a dequantized copy in memory), (3) spreading the rows over the cores. The same loops are
// compiled for AVX-512, AVX2 and the baseline (one namespace each, `#pragma GCC target`) and one
// is picked at run time from __builtin_cpu_supports. More than kGemvMaxRows rows (prefill) go to
// ATen's GEMM (MKL / oneDNN) instead, on a float copy of a bf16 / int8 weight.
#include "gemv.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/addmm.h>

#include "../common.h"
#include "../ops.h"
#include "cpu_math.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only cross inlined calls

namespace gpt2_fast {
namespace cpu {

struct GemvArgs {
  const float* x;
  int64_t M, ldx;
  WeightView w;
  const float* bias;
  float* y;
  int64_t ldy;
  bool accumulate;
  int64_t pf;  // software prefetch distance in weights ((N, K) layout: prefetch_distance)
};

typedef float v16f __attribute__((vector_size(64)));

namespace portable {
GPT2F_INLINE v16f fma_v(v16f a, v16f b, v16f c) { return a * b + c; }
GPT2F_INLINE v16f load_i8(const int8_t* p) {
  v16f v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
GPT2F_INLINE v16f load_bf16(const uint16_t* p) {
  uint32_t u[16];
  for (int i = 0; i < 16; ++i) u[i] = static_cast<uint32_t>(p[i]) << 16;
  v16f v;
  std::memcpy(&v, u, 64);
  return v;
}
GPT2F_INLINE float hsum(v16f v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
#include "gemv_kernels.inc"
}  // namespace portable

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {  // a v16f is two ymm halves
GPT2F_INLINE __m256 lo(const v16f& v) { __m256 r; std::memcpy(&r, &v, 32); return r; }
GPT2F_INLINE __m256 hi(const v16f& v) { __m256 r; std::memcpy(&r, reinterpret_cast<const char*>(&v) + 32, 32); return r; }
GPT2F_INLINE v16f join(__m256 a, __m256 b) {
  v16f r;
  std::memcpy(&r, &a, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &b, 32);
  return r;
}
GPT2F_INLINE v16f fma_v(v16f a, v16f b, v16f c) {
  return join(_mm256_fmadd_ps(lo(a), lo(b), lo(c)), _mm256_fmadd_ps(hi(a), hi(b), hi(c)));
}
GPT2F_INLINE v16f load_i8(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return join(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b))));
}
GPT2F_INLINE v16f load_bf16(const uint16_t* p) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
  return join(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16)),
              _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)));
}
GPT2F_INLINE float hsum(v16f v) {
  const __m256 s = _mm256_add_ps(lo(v), hi(v));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#include "gemv_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
GPT2F_INLINE v16f fma_v(v16f a, v16f b, v16f c) { return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
GPT2F_INLINE v16f load_i8(const int8_t* p) {
  return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
GPT2F_INLINE v16f load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (v16f)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
GPT2F_INLINE float hsum(v16f v) { return _mm512_reduce_add_ps((__m512)v); }
#include "gemv_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options
// Low-precision activations (lowp_act): the x rows are rounded to the weight's type so that one
// instruction does 64 (int8: AVX512-VNNI vpdpbusd) or 32 (bf16: AVX512-BF16 vdpbf16ps) multiply-adds,
// instead of converting every weight to fp32 first (3 instructions per 16 weights). int8 (W8A8):
// vpdpbusd multiplies unsigned by signed bytes, so x is split by sign: x[m] ~= xs[m] (p - n) with
// p = round(max(x, 0) / xs), n = round(max(-x, 0) / xs) in [0, 255], xs = max|x[m]| / 255, and
// sum_k x w = xs (sum_k p w + sum_k n (-w)): two vpdpbusd per weight vector into one int32
// accumulator, y = that * xs[m] * scale[n] + bias[n]. Design choice: vs the usual u8 = q + 128
// with a zero-point compensation (sum_k w, a second vpdpbusd against ones: the same instruction
// count), each sign gets all 255 levels, halving the rounding step of the activations (the
// logits' error then stays near weight-only int8's). Needs weights in [-127, 127] (symmetric
// quantization's range: -w must fit in int8).
// bf16: x rounded to nearest-even bf16, fp32 accumulation. (N, K) layout only.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx512bf16,fma")
namespace lowp {
using Rows = LowpRows;  // the rounded x rows (gemv.h)

// The 4 weight rows of the group starting at output n0 (nr < 4 at the tail: the last one repeats).
template <typename T>
GPT2F_INLINE void group_rows(const GemvArgs& a, int64_t n0, int nr, const T* (&wr)[4]) {
  for (int i = 0; i < 4; ++i) wr[i] = static_cast<const T*>(a.w.data) + (n0 + (i < nr ? i : nr - 1)) * a.w.ld;
}

template <int MR>
GPT2F_INLINE void w8a8_group(const GemvArgs& a, const Rows& x, int64_t n0, int nr, int64_t m0) {
  const int64_t K = a.w.K, K64 = K / 64 * 64;
  const int8_t* wr[4];
  group_rows(a, n0, nr, wr);
  __m512i acc[MR][4];
  const __m512i zero = _mm512_setzero_si512();
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = zero;
  for (int64_t k = 0; k < K64; k += 64) {
    __m512i w[4], wn[4];
    for (int i = 0; i < 4; ++i) {
      __builtin_prefetch(wr[i] + k + a.pf);
      w[i] = _mm512_loadu_si512(wr[i] + k);
      wn[i] = _mm512_sub_epi8(zero, w[i]);
    }
    for (int r = 0; r < MR; ++r) {
      const uint8_t* xr = x.q + (m0 + r) * 2 * K + k;
      const __m512i xp = _mm512_loadu_si512(xr), xn = _mm512_loadu_si512(xr + K);
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][i], xp, w[i]), xn, wn[i]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < nr; ++i) {
      int32_t s = _mm512_reduce_add_epi32(acc[r][i]);
      const uint8_t* xr = x.q + (m0 + r) * 2 * K;
      for (int64_t k = K64; k < K; ++k) s += (static_cast<int32_t>(xr[k]) - xr[K + k]) * wr[i][k];
      portable::store_out(a, m0 + r, n0 + i, static_cast<float>(s) * x.xs[m0 + r]);
    }
}

// W8A8 with one row of x (decode): rows n0, n0 + 1 of W (nr = 1 at an odd tail), x's positive and
// negative halves in separate accumulators (no per-weight negation as in w8a8_group), prefetched
// into L2 (prefetcht1) a.pf ahead. Two rows rather than four, and T1 rather than T0: the W8A8 GEMV
// went from 0.81-0.91x to 0.90-0.96x the speed of a plain read loop over as many bytes (in place,
// 116 MB, one thread, interleaved reps), an int8 decode step 0.94-0.95x the time at one and two
// threads (paired reps, 9/10 and 10/12 faster). T1 alone on the 4-row kernel gained less, and the
// same change for the bf16 kernel gained nothing (1.00x).
GPT2F_INLINE void w8a8_pair(const GemvArgs& a, const Rows& x, int64_t n0, int nr) {
  const int64_t K = a.w.K, K64 = K / 64 * 64;
  const int8_t* w0 = static_cast<const int8_t*>(a.w.data) + n0 * a.w.ld;
  const int8_t* w1 = nr > 1 ? w0 + a.w.ld : w0;
  const uint8_t* xr = x.q;
  __m512i p0 = _mm512_setzero_si512(), m0 = p0, p1 = p0, m1 = p0;
  for (int64_t k = 0; k < K64; k += 64) {
    __builtin_prefetch(w0 + k + a.pf, 0, 2);  // locality 2: prefetcht1 (into L2)
    __builtin_prefetch(w1 + k + a.pf, 0, 2);
    const __m512i xp = _mm512_loadu_si512(xr + k), xn = _mm512_loadu_si512(xr + K + k);
    const __m512i a0 = _mm512_loadu_si512(w0 + k), a1 = _mm512_loadu_si512(w1 + k);
    p0 = _mm512_dpbusd_epi32(p0, xp, a0);
    m0 = _mm512_dpbusd_epi32(m0, xn, a0);
    p1 = _mm512_dpbusd_epi32(p1, xp, a1);
    m1 = _mm512_dpbusd_epi32(m1, xn, a1);
  }
  int32_t s[2] = {_mm512_reduce_add_epi32(_mm512_sub_epi32(p0, m0)), _mm512_reduce_add_epi32(_mm512_sub_epi32(p1, m1))};
  for (int i = 0; i < nr; ++i) {
    const int8_t* wr = i ? w1 : w0;
    for (int64_t k = K64; k < K; ++k) s[i] += (static_cast<int32_t>(xr[k]) - xr[K + k]) * wr[k];
    portable::store_out(a, 0, n0 + i, static_cast<float>(s[i]) * x.xs[0]);
  }
}

template <int MR>
GPT2F_INLINE void bf16_group(const GemvArgs& a, const Rows& x, int64_t n0, int nr, int64_t m0) {
  const int64_t K = a.w.K, K32 = K / 32 * 32;
  const uint16_t* wr[4];
  group_rows(a, n0, nr, wr);
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh w[4];
    for (int i = 0; i < 4; ++i) {
      __builtin_prefetch(wr[i] + k + a.pf);
      w[i] = (__m512bh)_mm512_loadu_si512(wr[i] + k);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x.b + (m0 + r) * K + k);
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xv, w[i]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < nr; ++i) {
      float s = _mm512_reduce_add_ps(acc[r][i]);
      for (int64_t k = K32; k < K; ++k) s += portable::to_f32(x.b[(m0 + r) * K + k]) * portable::to_f32(wr[i][k]);
      portable::store_out(a, m0 + r, n0 + i, s);
    }
}

// round_rows' two loops with AVX-512, the same values (cvtps rounds to nearest even as nearbyint
// does in the default rounding mode; the max and the bf16 rounding are exact integer / max ops).
// The scalar loops (a libm call per element) cost ~8% of an int8 decode step and most of a W8A8
// prefill's rounding.
// the lanes of a 16-float step that lie before the row's end (left = K - k)
GPT2F_INLINE __mmask16 row_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

void round_rows_int8(const float* x, int64_t M, int64_t ldx, int64_t K, uint8_t* q, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 in = row_mask(K - k);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(in, xr + k)));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const float s = amax > 0.f ? amax / 255.f : 1.f, inv = 1.f / s;
    const __m512 vinv = _mm512_set1_ps(inv), zero = _mm512_setzero_ps();
    uint8_t *p = q + m * 2 * K, *n = p + K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 in = row_mask(K - k);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, xr + k), vinv);
      _mm512_mask_cvtusepi32_storeu_epi8(p + k, in, _mm512_cvtps_epi32(_mm512_max_ps(v, zero)));
      _mm512_mask_cvtusepi32_storeu_epi8(n + k, in, _mm512_cvtps_epi32(_mm512_max_ps(_mm512_sub_ps(zero, v), zero)));
    }
    xs[m] = s;
  }
}

void round_rows_bf16(const float* x, int64_t M, int64_t ldx, int64_t K, uint16_t* b) {
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 in = row_mask(K - k);
      const __m512i u = _mm512_maskz_loadu_epi32(in, x + m * ldx + k);
      const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
      _mm512_mask_cvtepi32_storeu_epi16(b + m * K + k, in, _mm512_srli_epi32(r, 16));
    }
}

__attribute__((noinline)) void range(const GemvArgs& a, const Rows& x, bool int8, int64_t g0, int64_t g1) {
  if (int8 && a.M == 1) {  // decode: pairs of rows (w8a8_pair)
    for (int64_t n = 4 * g0; n < std::min(4 * g1, a.w.N); n += 2)
      w8a8_pair(a, x, n, static_cast<int>(std::min<int64_t>(2, a.w.N - n)));
    return;
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n0 = 4 * g;
    const int nr = static_cast<int>(std::min<int64_t>(4, a.w.N - n0));
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, a.M - m0));
#define GPT2F_LOWP(MR) (int8 ? w8a8_group<MR>(a, x, n0, nr, m0) : bf16_group<MR>(a, x, n0, nr, m0))
      switch (mr) {
        case 1: GPT2F_LOWP(1); break;
        case 2: GPT2F_LOWP(2); break;
        case 3: GPT2F_LOWP(3); break;
        default: GPT2F_LOWP(4); break;
      }
#undef GPT2F_LOWP
    }
  }
}
}  // namespace lowp
#pragma GCC pop_options
#define GPT2F_HAVE_X86 1
#endif

// ------------------------------------------------------------------------------------------
// instruction-set choice
// ------------------------------------------------------------------------------------------

// whether this CPU has the lowp path's instructions for int8 (VNNI) / bf16 (AVX512-BF16), probed once
static bool cpu_has_lowp(bool int8) {
#ifdef GPT2F_HAVE_X86
  static const bool vnni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  }();
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  }();
  return int8 ? vnni : bf16;
#else
  return false;
#endif
}

static bool cpu_runs(Isa isa) {
#ifdef GPT2F_HAVE_X86
  __builtin_cpu_init();
  if (isa == Isa::Avx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (isa == Isa::Avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::Portable;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Portable: return "portable";
    default: return "auto";
  }
}

Isa best_isa() {
  static const Isa best = [] {
    Isa cap = Isa::Avx512;
    if (const char* v = std::getenv("GPT2_FAST_CPU_ISA")) {
      const std::string s(v);
      if (s == "portable") cap = Isa::Portable;
      else if (s == "avx2") cap = Isa::Avx2;
      else TORCH_CHECK(s == "avx512" || s.empty(), "GPT2_FAST_CPU_ISA must be portable, avx2 or avx512, got '", s, "'");
    }
    for (Isa i : {Isa::Avx512, Isa::Avx2})
      if (static_cast<int>(i) <= static_cast<int>(cap) && cpu_runs(i)) return i;
    return Isa::Portable;
  }();
  return best;
}

Isa resolve_isa(int64_t isa) {
  if (isa < 0) return best_isa();
  TORCH_CHECK(isa <= 2, "isa must be -1 (auto), 0 (portable), 1 (avx2) or 2 (avx512), got ", isa);
  const Isa i = static_cast<Isa>(isa);
  TORCH_CHECK(cpu_runs(i), "this CPU cannot run the ", isa_name(i), " kernels");
  return i;
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------

static int weight_kind(c10::ScalarType t) {
  if (t == at::kFloat) return 0;
  if (t == at::kBFloat16) return 1;
  TORCH_CHECK(t == at::kChar, "GEMV weights must be float32, bfloat16 or int8, got ", t);
  return 2;
}

void round_rows(const float* x, int64_t M, int64_t ldx, int64_t K, bool int8, uint8_t* q, float* xs, uint16_t* b) {
#ifdef GPT2F_HAVE_X86
  if (cpu_has_lowp(int8)) return int8 ? lowp::round_rows_int8(x, M, ldx, K, q, xs) : lowp::round_rows_bf16(x, M, ldx, K, b);
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    if (int8) {  // the sign split of the lowp namespace: p then n, K bytes each, per row
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float s = amax > 0.f ? amax / 255.f : 1.f, inv = 1.f / s;
      uint8_t *p = q + m * 2 * K, *n = p + K;
      for (int64_t k = 0; k < K; ++k) {
        const float v = xr[k] * inv;
        p[k] = static_cast<uint8_t>(std::nearbyint(v > 0.f ? v : 0.f));
        n[k] = static_cast<uint8_t>(std::nearbyint(v < 0.f ? -v : 0.f));
      }
      xs[m] = s;
    } else {
      for (int64_t k = 0; k < K; ++k) {
        uint32_t u;
        std::memcpy(&u, xr + k, 4);
        b[m * K + k] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
      }
    }
  }
}

bool lowp_applies(const WeightView& w, Isa isa, bool lowp_act) {
  const int kind = weight_kind(w.dtype);
  if (!lowp_act || kind == 0 || isa != Isa::Avx512 || w.kn) return false;
  return cpu_has_lowp(kind == 2);
}

int64_t gemv_unit(const WeightView& w) { return w.kn ? 16 : 4; }

static int64_t weight_esize(const WeightView& w) {  // bytes per stored weight
  static constexpr int64_t kBytes[] = {4, 2, 1};    // by weight_kind: fp32, bf16, int8
  return kBytes[weight_kind(w.dtype)];
}

static int64_t unit_bytes(const WeightView& w) {  // weight bytes of one gemv_unit of output columns
  return gemv_unit(w) * std::max<int64_t>(w.K, 1) * weight_esize(w);
}

int64_t gemv_chunk_cols(const WeightView& w) {
  return std::max<int64_t>(1, (int64_t{64} << 10) / unit_bytes(w)) * gemv_unit(w);
}

// Software prefetch distance, in weights, of the (N, K) kernels: the same line of the rows ~8 KiB
// ahead (whole groups of 4 rows, at least the next group). A fixed count of rows ahead was
// too short for int8 (4 rows of K = 768: 3 KiB): an int8 step at 8 KiB ran 8.1 vs 10.5 ms/token,
// fp32 and bf16 within noise of it (one thread, engines interleaved in one process). T0 hints, but
// the one-row W8A8 kernel's go to L2 (w8a8_pair). GPT2_FAST_CPU_PREFETCH=<bytes ahead> (0: off) for A/B runs.
static int64_t prefetch_distance(const WeightView& w) {
  static const int64_t bytes = [] {
    const char* v = std::getenv("GPT2_FAST_CPU_PREFETCH");
    return v && *v ? std::atoll(v) : int64_t{8192};
  }();
  if (w.kn || bytes <= 0) return 0;
  const int64_t rows = std::max<int64_t>(4, CEIL_DIV(CEIL_DIV(bytes, w.ld * weight_esize(w)), 4) * 4);
  return rows * w.ld;
}

void gemv_cols(const Gemv& g, int64_t n0, int64_t n1) {
  if (g.M == 0 || n1 <= n0) return;
  const GemvArgs a{g.x, g.M, g.ldx, g.w, g.bias, g.y, g.ldy, g.accumulate, prefetch_distance(g.w)};
  const int kind = weight_kind(g.w.dtype);
#ifdef GPT2F_HAVE_X86
  if (g.lowp) {
    lowp::range(a, *g.lowp, kind == 2, n0 / 4, CEIL_DIV(n1, 4));
    return;
  }
#endif
  using Entry = void (*)(const GemvArgs&, int, int64_t, int64_t);
  using Tail = void (*)(const GemvArgs&, int, int64_t);
  Entry nk = portable::nk_entry, kn = portable::kn_entry;
  Tail tail = portable::kn_tail_entry;
#ifdef GPT2F_HAVE_X86
  if (g.isa == Isa::Avx512) nk = avx512::nk_entry, kn = avx512::kn_entry, tail = avx512::kn_tail_entry;
  if (g.isa == Isa::Avx2) nk = avx2::nk_entry, kn = avx2::kn_entry, tail = avx2::kn_tail_entry;
#endif
  if (!g.w.kn) {
    nk(a, kind, n0 / 4, CEIL_DIV(n1, 4));
    return;
  }
  const int64_t v1 = n1 / 16;  // full 16-column vectors; the columns past the last are kn_tail's
  kn(a, kind, n0 / 16, v1);
  if (16 * v1 < n1) tail(a, kind, 16 * v1);
}

void gemv(const float* x, int64_t M, int64_t ldx, const WeightView& w, const float* bias, float* y,
          int64_t ldy, bool accumulate, Isa isa, bool lowp_act) {
  if (M == 0 || w.N == 0) return;
  Gemv g{x, M, ldx, w, bias, y, ldy, accumulate, isa, nullptr};
  const int kind = weight_kind(w.dtype);
  std::vector<uint8_t> q;
  std::vector<float> xs;
  std::vector<uint16_t> b;
  LowpRows rows;
  if (lowp_applies(w, isa, lowp_act)) {
    q.resize(kind == 2 ? 2 * M * w.K : 0);
    xs.assign(M, 1.f);
    b.resize(kind == 1 ? M * w.K : 0);
    round_rows(x, M, ldx, w.K, kind == 2, q.data(), xs.data(), b.data());
    rows = LowpRows{q.data(), xs.data(), b.data()};
    g.lowp = &rows;
  }
  const int64_t unit = gemv_unit(w);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / unit_bytes(w));  // >= 128 KiB a task
  at::parallel_for(0, CEIL_DIV(w.N, unit), grain, [&](int64_t b0, int64_t e0) {
    gemv_cols(g, b0 * unit, std::min(w.N, e0 * unit));
  });
}

WeightView weight_view(const Tensor& weight, const OptTensor& scale) {
  CHECK_CPU(weight);
  CHECK_DIM(weight, 2);
  WeightView v;
  v.dtype = weight.scalar_type();
  weight_kind(v.dtype);
  v.data = weight.data_ptr();
  v.N = weight.size(0);
  v.K = weight.size(1);
  if (weight.stride(1) == 1 || v.K == 1) {
    v.kn = false;
    v.ld = v.N > 1 ? weight.stride(0) : v.K;
  } else {
    TORCH_CHECK(weight.stride(0) == 1, "weight (N, K) must be stored row-major (N, K) or (K, N), got strides ",
                weight.strides());
    v.kn = true;
    v.ld = weight.stride(1);
  }
  if (v.dtype == at::kChar) {
    TORCH_CHECK(scale.has_value(), "an int8 weight needs its per-channel scale");
    CHECK_CPU(*scale);
    CHECK_DTYPE(*scale, at::kFloat);
    CHECK_CONTIGUOUS(*scale);
    CHECK_SHAPE(*scale, v.N);
    v.scale = scale->data_ptr<float>();
  } else {
    TORCH_CHECK(!scale.has_value() || scale->numel() == 0, "a scale is only for int8 weights, got a ",
                v.dtype, " weight");
  }
  return v;
}

void linear(const float* x, int64_t M, int64_t ldx, const Tensor& weight, const WeightView& w,
            const float* bias, float* y, int64_t ldy, bool accumulate, Isa isa, bool lowp_act) {
  if (M <= kGemvMaxRows) {
    gemv(x, M, ldx, w, bias, y, ldy, accumulate, isa, lowp_act);
    return;
  }
  // prefill: ATen GEMM on a float weight (a temporary copy for int8), epilogue here. The GEMMs run in
  // the precision chosen below, also inside a caller's torch.autocast (which would otherwise turn the
  // fp32 at::mm into a bf16 one and its result into a type this epilogue does not read)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor xt = at::from_blob(const_cast<float*>(x), {M, w.K}, {ldx, 1}, f32);
  Tensor out;
  bool nk = !w.kn;
  if (weight.scalar_type() == at::kBFloat16 && lowp_applies(w, isa, lowp_act)) {
    // bf16 activations (as the decode kernels round them) x bf16 weight in oneDNN's bf16 GEMM (AMX /
    // AVX512-BF16, fp32 accumulation, a bf16 result): 32 rows x 768 x 768..3072 ran ~2.6x faster than
    // the fp32 GEMM; a 32-token bf16 prefill 36-38 ms vs 89-103 with the GEMV kernels (one thread)
    out = at::mm(xt.to(at::kBFloat16), weight.t()).to(at::kFloat);  // (M, N)
    nk = false;
  } else if (weight.scalar_type() == at::kChar && lowp_applies(w, isa, lowp_act)) {
    // W8A8 in ATen's int8 GEMM (oneDNN; AMX-INT8 here): x rounded to int8 per row, symmetric (scale
    // amax / 127: 8 bits with the sign, as ONNX Runtime's and CTranslate2's int8 prefill; the decode
    // kernels keep 8 bits per sign), exact int32 sums, the row scale here, the weight's in the epilogue
    const Tensor xs = xt.abs().amax(1, true).clamp_min(1e-30).div(127.0);
    const Tensor xq = xt.div(xs).round().clamp(-127, 127).to(at::kChar);
    out = at::_int_mm(xq, weight.t()).to(at::kFloat).mul(xs);  // (M, N)
    nk = false;
  } else {
    Tensor wf = weight.scalar_type() == at::kFloat ? weight : weight.to(at::kFloat);
    // A weight stored (N, K) goes in as the GEMM's left operand, (W x^T)^T: MKL ran x W^T with the
    // transposed (N, K) weight ~1.4x slower (32 rows x 768 x 768..3072, one thread: 84-102 vs
    // 128-131 GFLOP/s), the prefill's whole GEMM time. (K, N) storage keeps x W^T.
    out = nk ? at::mm(wf, xt.t()) : at::mm(xt, wf.t());  // (N, M) or (M, N), contiguous
  }
  // epilogue over blocks of 64 output columns: an (N, M) result is read through in L1-sized
  // pieces (by row of y it was a stride-M read per element: ~3% of a 32-token prefill)
  const float* o = out.data_ptr<float>();
  const int64_t step_m = nk ? 1 : w.N, step_n = nk ? M : 1;
  constexpr int64_t kCols = 64;
  at::parallel_for(0, CEIL_DIV(w.N, kCols), 1, [&](int64_t b, int64_t e) {
    for (int64_t n0 = b * kCols; n0 < std::min(w.N, e * kCols); n0 += kCols) {
      const int64_t n1 = std::min(w.N, n0 + kCols);
      for (int64_t m = 0; m < M; ++m) {
        float* yr = y + m * ldy;
        const float* orow = o + m * step_m;
        for (int64_t n = n0; n < n1; ++n) {
          const float v = orow[n * step_n] * (w.scale ? w.scale[n] : 1.f) + (bias ? bias[n] : 0.f);
          yr[n] = accumulate ? yr[n] + v : v;
        }
      }
    }
  });
}

}  // namespace cpu

// y (M, N) fp32 = x (M, K) @ W^T * scale + bias; see gemv.h for the layouts accepted
Tensor cpu_linear(const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& bias,
                  int64_t isa, bool lowp_act) {
  CHECK_CPU(x);
  CHECK_DIM(x, 2);
  CHECK_DTYPE(x, at::kFloat);
  CHECK_LASTDIM_CONTIGUOUS(x);
  const cpu::WeightView w = cpu::weight_view(weight, scale);
  TORCH_CHECK(x.size(1) == w.K, "x must have ", w.K, " columns (the weight's in_features), got ", x.size(1));
  const float* b = nullptr;
  if (bias.has_value()) {
    CHECK_CPU(*bias);
    CHECK_DTYPE(*bias, at::kFloat);
    CHECK_CONTIGUOUS(*bias);
    CHECK_SHAPE(*bias, w.N);
    b = bias->data_ptr<float>();
  }
  const cpu::Isa i = cpu::resolve_isa(isa);
  Tensor y = empty_out({x.size(0), w.N}, x.options());
  cpu::linear(x.data_ptr<float>(), x.size(0), x.size(0) > 1 ? x.stride(0) : w.K, weight, w, b,
              y.data_ptr<float>(), w.N, false, i, lowp_act);
  return y;
}

std::string cpu_isa(int64_t isa) { return cpu::isa_name(cpu::resolve_isa(isa)); }

}  // namespace gpt2_fast

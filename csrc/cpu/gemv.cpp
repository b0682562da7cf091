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

#include <ATen/Parallel.h>
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
#define GPT2F_HAVE_X86 1
#endif

// ------------------------------------------------------------------------------------------
// instruction-set choice
// ------------------------------------------------------------------------------------------

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

void gemv(const float* x, int64_t M, int64_t ldx, const WeightView& w, const float* bias, float* y,
          int64_t ldy, bool accumulate, Isa isa) {
  if (M == 0 || w.N == 0) return;
  const GemvArgs a{x, M, ldx, w, bias, y, ldy, accumulate};
  const int kind = weight_kind(w.dtype);
  const int64_t esize = kind == 0 ? 4 : kind == 1 ? 2 : 1;
  using Entry = void (*)(const GemvArgs&, int, int64_t, int64_t);
  using Tail = void (*)(const GemvArgs&, int, int64_t);
  Entry nk = portable::nk_entry, kn = portable::kn_entry;
  Tail tail = portable::kn_tail_entry;
#ifdef GPT2F_HAVE_X86
  if (isa == Isa::Avx512) nk = avx512::nk_entry, kn = avx512::kn_entry, tail = avx512::kn_tail_entry;
  if (isa == Isa::Avx2) nk = avx2::nk_entry, kn = avx2::kn_entry, tail = avx2::kn_tail_entry;
#endif
  const int64_t unit_bytes = (w.kn ? 16 : 4) * std::max<int64_t>(w.K, 1) * esize;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / unit_bytes);  // >= 128 KiB a task
  if (!w.kn) {
    at::parallel_for(0, CEIL_DIV(w.N, 4), grain, [&](int64_t b, int64_t e) { nk(a, kind, b, e); });
    return;
  }
  const int64_t nv = w.N / 16;
  at::parallel_for(0, nv, grain, [&](int64_t b, int64_t e) { kn(a, kind, b, e); });
  if (16 * nv < w.N) tail(a, kind, 16 * nv);
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
            const float* bias, float* y, int64_t ldy, bool accumulate, Isa isa) {
  if (M <= kGemvMaxRows) {
    gemv(x, M, ldx, w, bias, y, ldy, accumulate, isa);
    return;
  }
  // prefill: ATen GEMM on a float weight (a temporary copy for bf16 / int8), epilogue here
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor xt = at::from_blob(const_cast<float*>(x), {M, w.K}, {ldx, 1}, f32);
  Tensor wf = weight.scalar_type() == at::kFloat ? weight : weight.to(at::kFloat);
  Tensor out = at::mm(xt, wf.t());  // (M, N)
  const float* o = out.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      float* yr = y + m * ldy;
      const float* orow = o + m * w.N;
      for (int64_t n = 0; n < w.N; ++n) {
        float v = orow[n] * (w.scale ? w.scale[n] : 1.f) + (bias ? bias[n] : 0.f);
        yr[n] = accumulate ? yr[n] + v : v;
      }
    }
  });
}

}  // namespace cpu

// y (M, N) fp32 = x (M, K) @ W^T * scale + bias; see gemv.h for the layouts accepted
Tensor cpu_linear(const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& bias,
                  int64_t isa) {
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
              y.data_ptr<float>(), w.N, false, i);
  return y;
}

std::string cpu_isa(int64_t isa) { return cpu::isa_name(cpu::resolve_isa(isa)); }

}  // namespace gpt2_fast

// The end of a greedy CPU decode step in one call: per row b of the step's logits (Bb, V)
//   nxt = done[b] ? filler : argmax_v logits[b, v]
//   seq[b, pos + 1] = nxt;  done[b] |= (nxt == eot) & stop (one flag, or one per row);  then pos += 1
// (gpt2_fast/engine.py's _step after the forward, for greedy sampling).
//
// Why an op for five tensor ops: a decode step streams every weight (124 MB for int8 gpt2) through
// the caches, so the small ATen ops that follow the forward run cold. There they cost ~300 us per token
// together (argmax alone ~150 us: ATen's AVX2 kernel on 50257 logits), 3% of a ~10 ms int8 step;
// one call with an AVX-512 argmax costs a few us.
//
// argmax has torch.argmax's rules: the first index of the maximum; a NaN counts as the maximum (the
// first NaN wins). The AVX-512 loop keeps per lane the first index of the lane's maximum (strict >),
// then takes the smallest index among the lanes holding the overall maximum; any NaN sends the row to
// the scalar loop, which returns the first NaN.
#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GPT2F_ARGMAX_X86 1
#endif

#include "../common.h"
#include "../ops.h"
#include "gemv.h"

namespace gpt2_fast {
namespace cpu {

static int64_t argmax_scalar(const float* x, int64_t n, int64_t begin, int64_t best) {
  float bv = x[best];
  if (std::isnan(bv)) return best;
  for (int64_t i = begin; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > bv) bv = x[i], best = i;
  }
  return best;
}

#ifdef GPT2F_ARGMAX_X86
__attribute__((target("avx512f"))) static int64_t argmax_avx512(const float* x, int64_t n) {
  __m512 best = _mm512_loadu_ps(x);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), idx = at;
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
  int64_t i = 16;
  for (; i + 16 <= n; i += 16) {
    idx = _mm512_add_epi32(idx, step);
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, gt, v);
    at = _mm512_mask_mov_epi32(at, gt, idx);
  }
  if (nan) return argmax_scalar(x, n, 1, 0);
  const float m = _mm512_reduce_max_ps(best);
  const __mmask16 holds = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
  return argmax_scalar(x, n, i, _mm512_mask_reduce_min_epi32(holds, at));  // then the tail
}
#endif

static int64_t argmax_row(const float* x, int64_t n) {
#ifdef GPT2F_ARGMAX_X86
  static const bool avx512 = best_isa() == Isa::Avx512;  // gemv.h: the CPU's, capped by GPT2_FAST_CPU_ISA
  if (avx512 && n >= 16 && n < (int64_t{1} << 31)) return argmax_avx512(x, n);
#endif
  return argmax_scalar(x, n, 1, 0);
}

}  // namespace cpu

void cpu_greedy_advance(const Tensor& logits, const Tensor& seq, const Tensor& pos, const Tensor& done,
                        const Tensor& stop, int64_t filler, int64_t eot) {
  CHECK_CPU(logits);
  CHECK_CPU(seq);
  CHECK_CPU(pos);
  CHECK_CPU(done);
  CHECK_CPU(stop);
  CHECK_DIM(logits, 2);
  CHECK_DTYPE(logits, at::kFloat);
  CHECK_CONTIGUOUS(logits);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "logits must have at least one column");
  CHECK_DIM(seq, 2);
  CHECK_DTYPE(seq, at::kLong);
  TORCH_CHECK(seq.size(0) == B, "seq must have the logits' ", B, " rows, got ", seq.size(0));
  CHECK_SHAPE(pos, 1);
  CHECK_DTYPE(pos, at::kLong);
  CHECK_SHAPE(done, B);
  CHECK_DTYPE(done, at::kBool);
  TORCH_CHECK(stop.dim() == 1 && (stop.size(0) == 1 || stop.size(0) == B),
              "stop must have shape (1) or (", B, "), got ", stop.sizes());
  CHECK_DTYPE(stop, at::kBool);
  int64_t* p = pos.data_ptr<int64_t>();
  TORCH_CHECK(*p >= 0 && *p + 1 < seq.size(1), "pos + 1 = ", *p + 1, " is outside seq's ", seq.size(1), " slots");
  int64_t* s = seq.data_ptr<int64_t>();
  bool* d = done.data_ptr<bool>();
  const bool* st = stop.data_ptr<bool>();
  const float* x = logits.data_ptr<float>();
  const int64_t sb = seq.stride(0), sp = seq.stride(1) * (*p + 1), db = done.stride(0),
                tb = stop.size(0) == 1 ? 0 : stop.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nxt = d[b * db] ? filler : cpu::argmax_row(x + b * V, V);
    s[b * sb + sp] = nxt;
    d[b * db] = d[b * db] || (nxt == eot && st[b * tb]);
  }
  *p += 1;
}

}  // namespace gpt2_fast

// The LM head fused with cross-entropy for CPU training: the loss, dL/dh and dL/dW in one call,
// without the (N, V) logits ever being written to memory.
//
//   z = h W[:V]^T (N, V)         lse_n = log sum_v exp(z_nv)     (N valid rows: target != ignore)
//   loss = sum_{n valid} (lse_n - z_{n, t_n}) / n_valid
//   g_nv = (exp(z_nv - lse_n) - [v == t_n]) / n_valid   (0 on ignored rows)
//   dh = g W[:V]  (N, C),  dW[:V] = g^T h  (V, C), dW rows >= V (a padded vocabulary) stay 0
//
// Design: the vocabulary is cut into blocks of `vb` rows of W such that a block's logits for a
// chunk of rows (at most 1024) take ~2 MB (L2; of 0.5 / 1 / 2 / 4 / 8 MB tiles, 2 MB ran the
// 1024 x 50257 bf16 case fastest here), and each thread owns a contiguous range of
// blocks (one parallel region per pass, so the op does not fork/join per block). Pass 1 computes
// a block's logits with at::mm (oneDNN: AMX / AVX512-BF16 for bf16, MKL for fp32; it runs on the
// calling thread inside the region) and folds them into per-thread running (max, sum) per row;
// the per-thread statistics merge into lse. Pass 2 recomputes the block (a GEMM with K = C is
// cheaper here than writing N x V logits and reading them back at ~10 GB/s), turns it into g in
// place and runs dW[block] = g^T h and dh_thread += g W[block]. The unfused path (logits, then
// log_softmax forward and backward) makes ~6 passes over N x V values in memory.
// Precision matches the reference under autocast: GEMMs in h's dtype with fp32 accumulation
// inside, logits rounded to that dtype, softmax and loss in fp32, dW (over row chunks) and dh
// (over vocabulary blocks: one rounding of each block's partial) summed in fp32.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "../common.h"
#include "../ops.h"
#include "cpu_math.h"

namespace gpt2_fast {
namespace cpu {
namespace {

constexpr int64_t kRowChunk = 1024;
constexpr int64_t kTileBytes = 1 << 21;

// Element access for the tile loops: fp32, or bf16 as raw bits (a shift to load; round to nearest
// even to store; no NaN can reach it), inlined into the cloned loops so that they vectorize.
GPT2F_INLINE float ld(const float* p, int64_t i) { return p[i]; }
GPT2F_INLINE float ld(const uint16_t* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
GPT2F_INLINE void st(float* p, int64_t i, float v) { p[i] = v; }
GPT2F_INLINE void st(uint16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  p[i] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Fold the logits tile z (R, n) into the running per-row (max m, sum s of exp(z - m)).
template <typename S>
GPT2F_INLINE void fold_tile(const S* __restrict z, int64_t R, int64_t n, float* m, float* s) {
  for (int64_t r = 0; r < R; ++r, z += n) {
    float mx = m[r];
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, ld(z, i));
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += exp_f32(ld(z, i) - mx);
    s[r] = (m[r] == -std::numeric_limits<float>::infinity() ? 0.f : s[r] * exp_f32(m[r] - mx)) + sum;
    m[r] = mx;
  }
}

// z (R, n) <- exp(z - lse_r) * scale_r in place: the softmax part of g (the target's -scale_r is
// applied by the caller).
template <typename S>
GPT2F_INLINE void softmax_tile(S* __restrict z, int64_t R, int64_t n, const float* lse, const float* scale) {
  for (int64_t r = 0; r < R; ++r, z += n) {
    const float l = lse[r], c = scale[r];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) st(z, i, exp_f32(ld(z, i) - l) * c);
  }
}

// The row loops are the op's only non-GEMM work: AVX-512 clones as well (16-wide exp).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GPT2F_CLONES_512 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GPT2F_CLONES_512
#endif
GPT2F_CLONES_512 void fold_tile_f32(const float* z, int64_t R, int64_t n, float* m, float* s) { fold_tile(z, R, n, m, s); }
GPT2F_CLONES_512 void fold_tile_bf16(const uint16_t* z, int64_t R, int64_t n, float* m, float* s) { fold_tile(z, R, n, m, s); }
GPT2F_CLONES_512 void softmax_tile_f32(float* z, int64_t R, int64_t n, const float* lse, const float* c) {
  softmax_tile(z, R, n, lse, c);
}
GPT2F_CLONES_512 void softmax_tile_bf16(uint16_t* z, int64_t R, int64_t n, const float* lse, const float* c) {
  softmax_tile(z, R, n, lse, c);
}

// The tile loops on an at::Tensor tile (R, n) of the compute dtype (fp16: through an fp32 copy).
void fold(const at::Tensor& z, float* m, float* s) {
  const int64_t R = z.size(0), n = z.size(1);
  if (z.scalar_type() == at::kFloat) return fold_tile_f32(z.data_ptr<float>(), R, n, m, s);
  if (z.scalar_type() == at::kBFloat16) return fold_tile_bf16(reinterpret_cast<const uint16_t*>(z.data_ptr()), R, n, m, s);
  const at::Tensor f = z.to(at::kFloat);
  fold_tile_f32(f.data_ptr<float>(), R, n, m, s);
}
void softmax(at::Tensor& z, const float* lse, const float* c) {
  const int64_t R = z.size(0), n = z.size(1);
  if (z.scalar_type() == at::kFloat) return softmax_tile_f32(z.data_ptr<float>(), R, n, lse, c);
  if (z.scalar_type() == at::kBFloat16) return softmax_tile_bf16(reinterpret_cast<uint16_t*>(z.data_ptr()), R, n, lse, c);
  at::Tensor f = z.to(at::kFloat);
  softmax_tile_f32(f.data_ptr<float>(), R, n, lse, c);
  z.copy_(f);
}

struct Problem {
  at::Tensor h, w, tgt;     // h (N, C) in the compute dtype, w (Vp, C), tgt (N,) int64
  int64_t V, vb, ignore;
  float scale;              // 1 / n_valid (0 when no row is valid)
};

// W rows [v0, v0 + n) in the compute dtype: a view when W has it, else converted into buf
// (vb, C). Every GEMM writes into a per-thread buffer: a fresh 1 MB output per block would
// page-fault on every call.
at::Tensor weight_block(const Problem& p, int64_t v0, int64_t n, at::Tensor& buf) {
  at::Tensor blk = p.w.narrow(0, v0, n);
  if (blk.scalar_type() == p.h.scalar_type()) return blk;
  return buf.narrow(0, 0, n).copy_(blk);
}

// Per-thread scratch: the logits / g tile (R, vb), the converted weight block (vb, C) and, for
// pass 2 (grads), the two gradient GEMM outputs (vb, C) and (R, C), all in the compute dtype.
struct Scratch {
  at::Tensor z, wblk, dwb, dhb;
  Scratch(const Problem& p, int64_t R, bool grads) {
    const auto o = p.h.options();
    const int64_t C = p.h.size(1);
    z = at::empty({R * p.vb}, o);
    wblk = at::empty({p.vb, C}, o);
    if (grads) {
      dwb = at::empty({p.vb, C}, o);
      dhb = at::empty({R, C}, o);
    }
  }
  at::Tensor logits(const at::Tensor& hc, const at::Tensor& wb) {  // (R, n) = hc wb^T
    at::Tensor out = z.narrow(0, 0, hc.size(0) * wb.size(0)).view({hc.size(0), wb.size(0)});
    return at::mm_out(out, hc, wb.t());
  }
};

// Pass 1 over rows [r0, r0 + R): per-thread (max, sum) per row, merged into lse; zt = z[n, t_n].
template <typename T>
void row_stats(const Problem& p, int64_t r0, int64_t R, float* lse, float* zt) {
  const int nt = at::get_num_threads();
  const int64_t nb = CEIL_DIV(p.V, p.vb);
  std::vector<float> m(static_cast<size_t>(nt) * R, -std::numeric_limits<float>::infinity());
  std::vector<float> s(static_cast<size_t>(nt) * R, 0.f);
  const at::Tensor hc = p.h.narrow(0, r0, R);
  const int64_t* tgt = p.tgt.data_ptr<int64_t>() + r0;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // scratch only: no autograd here
    Scratch sc(p, R, false);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * p.vb, n = std::min(p.vb, p.V - v0);
      const at::Tensor z = sc.logits(hc, weight_block(p, v0, n, sc.wblk));  // (R, n), contiguous
      fold(z, &m[tid * R], &s[tid * R]);
      const T* zp = z.data_ptr<T>();
      for (int64_t r = 0; r < R; ++r)
        if (tgt[r] >= v0 && tgt[r] < v0 + n) zt[r] = static_cast<float>(zp[r * n + tgt[r] - v0]);
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    float M = -std::numeric_limits<float>::infinity();
    for (int t = 0; t < nt; ++t) M = std::max(M, m[t * R + r]);
    float sum = 0.f;
    for (int t = 0; t < nt; ++t)
      if (m[t * R + r] != -std::numeric_limits<float>::infinity()) sum += s[t * R + r] * std::exp(m[t * R + r] - M);
    lse[r] = M + std::log(sum);
  }
}

// Pass 2 over rows [r0, r0 + R): dW[:V] (+)= g^T h (first chunk writes), dh[r0:r0+R] = g W.
template <typename T>
void row_grads(const Problem& p, int64_t r0, int64_t R, const float* lse, const float* zt, at::Tensor& dh,
               at::Tensor& dw, bool first_chunk) {
  const int nt = at::get_num_threads();
  const int64_t nb = CEIL_DIV(p.V, p.vb), C = p.h.size(1);
  const at::Tensor hc = p.h.narrow(0, r0, R);
  const int64_t* tgt = p.tgt.data_ptr<int64_t>() + r0;
  std::vector<float> scale(R);  // 1 / n_valid, 0 on ignored rows
  for (int64_t r = 0; r < R; ++r) scale[r] = tgt[r] != p.ignore ? p.scale : 0.f;
  at::Tensor dh_t = at::zeros({nt, R, C}, p.h.options().dtype(at::kFloat));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // scratch only: no autograd here
    Scratch sc(p, R, true);
    at::Tensor acc = dh_t.select(0, tid);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * p.vb, n = std::min(p.vb, p.V - v0);
      const at::Tensor wb = weight_block(p, v0, n, sc.wblk);
      at::Tensor g = sc.logits(hc, wb);  // (R, n) logits, becoming g in place
      softmax(g, lse, scale.data());
      T* gp = g.data_ptr<T>();
      for (int64_t r = 0; r < R; ++r)  // g[r, t_r] = (softmax - 1) * scale_r, from the pass-1 logit
        if (tgt[r] >= v0 && tgt[r] < v0 + n)
          gp[r * n + tgt[r] - v0] = static_cast<T>((std::exp(zt[r] - lse[r]) - 1.f) * scale[r]);
      at::Tensor dwb = dw.narrow(0, v0, n);
      at::Tensor part = sc.dwb.narrow(0, 0, n);
      at::mm_out(part, g.t(), hc);
      if (first_chunk) dwb.copy_(part);
      else dwb.add_(part);
      acc.add_(at::mm_out(sc.dhb, g, wb));
    }
  });
  dh.narrow(0, r0, R).copy_(dh_t.sum(0));
}

}  // namespace
}  // namespace cpu

std::tuple<Tensor, Tensor, Tensor> lm_head_ce_fwd_cpu(const Tensor& h, const Tensor& weight, const Tensor& targets,
                                                      int64_t ignore_index, int64_t vocab_size, bool need_grad) {
  CHECK_CPU(h);
  CHECK_DIM(h, 2);
  CHECK_DIM(weight, 2);
  CHECK_DIM(targets, 1);
  CHECK_FLOAT_INPUT(h);
  CHECK_FLOAT_INPUT(weight);
  CHECK_DTYPE(targets, at::kLong);
  const int64_t N = h.size(0), C = h.size(1), V = vocab_size;
  TORCH_CHECK(weight.size(1) == C, "weight must be (V, ", C, "), got ", weight.sizes());
  TORCH_CHECK(targets.size(0) == N, "targets must have ", N, " rows, got ", targets.size(0));
  TORCH_CHECK(V >= 1 && V <= weight.size(0), "vocab_size must be in [1, ", weight.size(0), "], got ", V);
  // detached: the ATen calls below run in OpenMP threads, where grad mode is the default (on)
  cpu::Problem p{h.detach().contiguous(), weight.detach().contiguous(), targets.contiguous(), V, 64, ignore_index, 0.f};
  const int64_t* tp = p.tgt.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(tp[n] == ignore_index || (tp[n] >= 0 && tp[n] < V), "target ", tp[n], " at row ", n,
                " is outside [0, ", V, ") and is not ignore_index ", ignore_index);
    n_valid += tp[n] != ignore_index;
  }
  p.scale = n_valid ? 1.f / static_cast<float>(n_valid) : 0.f;
  const int64_t R_max = std::min(N, cpu::kRowChunk);
  p.vb = std::clamp<int64_t>(cpu::kTileBytes / (R_max * static_cast<int64_t>(h.element_size())) / 64 * 64, 64, 4096);

  std::vector<float> lse(R_max), zt(R_max);
  Tensor dh = need_grad ? at::empty({N, C}, h.options().dtype(at::kFloat)) : at::empty({0}, h.options().dtype(at::kFloat));
  // rows < V are written by the first row chunk; only a padded vocabulary's rows need zeros
  Tensor dw = at::empty(need_grad ? weight.sizes() : at::IntArrayRef({0}), weight.options().dtype(at::kFloat));
  if (need_grad && V < weight.size(0)) dw.narrow(0, V, weight.size(0) - V).zero_();
  double total = 0.0;
  for (int64_t r0 = 0; r0 < N; r0 += cpu::kRowChunk) {
    const int64_t R = std::min(cpu::kRowChunk, N - r0);
    GPT2F_DISPATCH_FLOAT(p.h.scalar_type(), "lm_head_ce_fwd_cpu", [&] {
      cpu::row_stats<scalar_t>(p, r0, R, lse.data(), zt.data());
      if (need_grad) cpu::row_grads<scalar_t>(p, r0, R, lse.data(), zt.data(), dh, dw, r0 == 0);
    });
    for (int64_t r = 0; r < R; ++r)
      if (tp[r0 + r] != ignore_index) total += static_cast<double>(lse[r]) - zt[r];
  }
  const float loss = n_valid ? static_cast<float>(total / static_cast<double>(n_valid))
                             : std::numeric_limits<float>::quiet_NaN();
  return {at::full({}, loss, h.options().dtype(at::kFloat)), dh, dw};
}

}  // namespace gpt2_fast

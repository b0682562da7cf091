// The whole GPT-2 forward for CPU inference in one call: prefill (T > 1) and the decode step
// (T == 1) of gpt2_fast/cpu_decode.py, so Python runs once per token instead of issuing ~1,100 ops.
//
//   x = wte[idx] + wpe[pos]                                  pos = slot - kv_start[b] (>= 0)
//   per layer:  h = LN1(x);  qkv = h Wqkv^T + b              (gemv.h; or ATen GEMM: region_max_rows)
//               K, V caches[b, head, slot] = k, v            slot = start + t
//               a = softmax(q K^T / sqrt(D)) V over slots [kv_start[b], slot]   (causal)
//               x += a Wo^T + bo;  h = LN2(x);  f = gelu_tanh(h Wfc^T + bfc);  x += f Wp^T + bp
//   logits[b] = LN_f(x[b, T-1]) Wlm^T                        the last position of each row (all
//                                                            positions with all_logits: perplexity)
//
// Weights are read where the model keeps them (fp32 / bf16 / int8 + per-channel scale, either
// layout of gemv.h); activations, LayerNorm and softmax are fp32, the KV cache fp32 or bf16. Tensors arrive as
// two flat lists (cpu_decode.py builds them once): globals = [wte, wpe, lnf_w, lnf_b, lm_w, lm_s]
// (wte int8: the LM head's own rows, scaled by lm_s)
// and kLayerTensors per layer (order below); an empty tensor stands for "none" (no bias, no
// scale). Design choice: one op for the whole model rather than one per layer, because per-token
// dispatch overhead, not arithmetic, is what separates a Python step from the bandwidth floor.
//
// Threads. Up to region_max_rows() rows (decode; short prompts) the whole forward is ONE OpenMP parallel
// region: a sequence of phases (work_phase.h), 4 per layer: [LN1, then per head: its q, k, v
// columns, cache write and attention] [attn proj + residual] [LN2, fc + GELU] [mlp proj +
// residual], then [LN_f, LM head]. A phase's chunks (a head, or ~64 KiB of a weight's output
// rows) go to whichever thread claims them, each thread first from its own contiguous slice;
// each thread does its own LayerNorm (and activation rounding) of the phase's input, so only a
// finished phase is waited for. A token thus costs one
// fork/join instead of ~61 (one per parallel op), a descheduled thread holds up no phase it has
// not started, and the logits do not depend on the thread count. A contention guard (below
// forward_small) drops to one thread for a while when the others were mostly waited for. Longer
// prefills run op by op with ATen's GEMM (at::parallel_for inside).
#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"
#include "attend_row.h"
#include "cpu_math.h"
#include "gemv.h"
#include "work_phase.h"

namespace gpt2_fast {
namespace cpu {
constexpr int kLayerTensors = 16;
enum LayerSlot { LN1_W, LN1_B, QKV_W, QKV_S, QKV_B, AO_W, AO_S, AO_B, LN2_W, LN2_B, FC_W, FC_S, FC_B, MP_W, MP_S, MP_B };
constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;

// ------------------------------------------------------------------------------------------
// kernels (fp32 rows)
// ------------------------------------------------------------------------------------------

GPT2F_CLONES_AVX512 static void ln_row(const float* __restrict x, const float* __restrict w, const float* __restrict b,
                                float* __restrict y, int64_t C, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < C; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(C);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < C; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(C) + eps);
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) y[i] = (x[i] - mean) * rstd * (w ? w[i] : 1.f) + (b ? b[i] : 0.f);
}

GPT2F_CLONES_AVX512 static void gelu_inplace(float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = y[i];
    y[i] = 0.5f * u * (1.f + tanh_f32(kGeluK0 * (u + kGeluK1 * u * u * u)));
  }
}

// ------------------------------------------------------------------------------------------
// the pieces of a forward
// ------------------------------------------------------------------------------------------

struct Shape {
  int64_t B, T, C, H, D, S, start;
  std::vector<int64_t> ks;  // kv_start per row
};

struct Linear {             // one projection: the view the GEMV reads + the tensor (GEMM path)
  Tensor weight;
  WeightView w;
  const float* bias = nullptr;
};

struct LayerPlan {
  const float *l1w, *l1b, *l2w, *l2b;
  Linear qkv, ao, fc, mp;
  void *kc, *vc;  // fp32 or bf16 (kv_bf16) caches (B_max, H, S, D)
  bool kv_bf16;
};

static const float* opt_f32(const Tensor& t, int64_t n, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what,
              " must be a contiguous float32 tensor of ", n, " elements, got ", t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

static OptTensor opt(const Tensor& t) { return t.numel() ? OptTensor(t) : std::nullopt; }

// x[m] = wte[id] (* scale[id]: an int8 table, the LM head's rows) + wpe[pos]
template <typename E>
static void embed_rows(const Tensor& wte, const float* scale, const int64_t* ids, const float* wpe, const Shape& s,
                       float* x) {
  const E* w = wte.data_ptr<E>();
  const int64_t s0 = wte.stride(0), s1 = wte.stride(1);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t m = b * s.T + t, id = ids[m];
      const int64_t pos = std::max<int64_t>(s.start + t - s.ks[b], 0);
      const float sc = scale ? scale[id] : 1.f;
      for (int64_t c = 0; c < s.C; ++c)
        x[m * s.C + c] = static_cast<float>(w[id * s0 + c * s1]) * sc + wpe[pos * s.C + c];
    }
}

// row b, head h: write k, v of its T new positions into the caches, then attend each of them over
// the live slots [kv_start[b], slot] (causal). p: scratch of S floats.
GPT2F_INLINE void store_kv(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
GPT2F_INLINE void store_kv(const float* src, uint16_t* dst, int64_t n) {  // round to nearest even, as torch
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]).x;
}

template <typename KV>
static void attend_pair_t(const float* qkv, float* out, KV* kc, KV* vc, const Shape& s, int64_t b, int64_t h, float* p,
                          bool avx512) {
  const int64_t C = s.C, D = s.D, T = s.T;
  KV* K = kc + (b * s.H + h) * s.S * D;
  KV* V = vc + (b * s.H + h) * s.S * D;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = qkv + (b * T + t) * 3 * C;
    store_kv(row + C + h * D, K + (s.start + t) * D, D);
    store_kv(row + 2 * C + h * D, V + (s.start + t) * D, D);
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t j0 = std::min(s.ks[b], s.start + t), j1 = s.start + t + 1;  // live slots
    attend_row<KV>(qkv + (b * T + t) * 3 * C + h * D, K, V, j0, j1, D, p, out + (b * T + t) * C + h * D, avx512);
  }
}

// the cache is fp32 or bf16 (LayerPlan::kv_bf16)
static void attend_pair(const float* qkv, float* out, const LayerPlan& P, const Shape& s, int64_t b, int64_t h,
                        float* p, bool avx512) {
  if (P.kv_bf16)
    attend_pair_t(qkv, out, static_cast<uint16_t*>(P.kc), static_cast<uint16_t*>(P.vc), s, b, h, p, avx512);
  else
    attend_pair_t(qkv, out, static_cast<float*>(P.kc), static_cast<float*>(P.vc), s, b, h, p, avx512);
}

// the final LayerNorm of the rows the LM head reads: the last position of each batch row, or every
// row (all_logits), into out (R, C)
static void final_ln_rows(const float* x, const Shape& s, bool all_logits, const float* w, const float* b, float eps,
                          float* out) {
  const int64_t R = all_logits ? s.B * s.T : s.B;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t m = all_logits ? r : (r + 1) * s.T - 1;
    ln_row(x + m * s.C, w, b, out + r * s.C, s.C, eps);
  }
}

static Linear make_linear(at::TensorList L, int w, int sc, int b, int64_t N, int64_t K, const char* what) {
  Linear l{L[w], weight_view(L[w], opt(L[sc])), nullptr};
  TORCH_CHECK(l.w.N == N && l.w.K == K, what, " weight must be (", N, ", ", K, "), got (", l.w.N, ", ", l.w.K, ")");
  l.bias = opt_f32(L[b], N, what);
  return l;
}

static LayerPlan make_plan(at::TensorList L, const Tensor& kc, const Tensor& vc, int64_t C) {
  LayerPlan P;
  P.l1w = opt_f32(L[LN1_W], C, "ln_1.weight");
  P.l1b = opt_f32(L[LN1_B], C, "ln_1.bias");
  P.l2w = opt_f32(L[LN2_W], C, "ln_2.weight");
  P.l2b = opt_f32(L[LN2_B], C, "ln_2.bias");
  P.qkv = make_linear(L, QKV_W, QKV_S, QKV_B, 3 * C, C, "c_attn");
  P.ao = make_linear(L, AO_W, AO_S, AO_B, C, C, "attn.c_proj");
  const int64_t F = L[FC_W].size(0);
  P.fc = make_linear(L, FC_W, FC_S, FC_B, F, C, "c_fc");
  P.mp = make_linear(L, MP_W, MP_S, MP_B, C, F, "mlp.c_proj");
  P.kc = kc.data_ptr();
  P.vc = vc.data_ptr();
  P.kv_bf16 = kc.scalar_type() == at::kBFloat16;
  return P;
}

// Up to this many rows (B * T) the forward runs in one parallel region with the GEMV kernels, whose
// (N, K) loop keeps a group of 4 weight rows in L1 while it goes over every row of x: the weights
// are read from memory once per call and int8 / bf16 need no float copy (int8 prefill of 32
// tokens ~70 vs ~95 ms with a dequantized copy + GEMM, one thread, here). Beyond kGemvMaxRows,
// ATen's GEMM (gemv.cpp's linear) where it beats the region: fp32 weights (MKL's sgemm, ~86 vs
// ~100 ms) and low-precision activations (oneDNN's bf16 / int8 GEMM on AMX: 32-token prefill
// bf16 36-38 vs 89-103 ms, W8A8 23-28 vs 43-50, one thread). int8 / bf16 weights with fp32
// activations stay in the region up to 64 rows (ATen has no such GEMM).
// GPT2_FAST_CPU_REGION_ROWS overrides the limit (A/B runs).
static int64_t region_max_rows(const WeightView& w, Isa isa, bool lowp) {
  static const int64_t env = [] {
    const char* v = std::getenv("GPT2_FAST_CPU_REGION_ROWS");
    return v && *v ? std::atoll(v) : int64_t{-1};
  }();
  if (env >= 0) return env;
  const bool gemm = w.dtype == at::kFloat || lowp_applies(w, isa, lowp);
  return gemm ? kGemvMaxRows : 64;
}

// ---- more than region_max_rows() rows (prefill): op by op, ATen GEMM, parallel inside each op ----

static void lin(const Linear& l, const float* x, int64_t M, float* y, bool accumulate, Isa isa, bool lowp) {
  linear(x, M, l.w.K, l.weight, l.w, l.bias, y, l.w.N, accumulate, isa, lowp);
}

static void run_layer_gemm(const LayerPlan& P, float* x, float* h, float* qkv, float* att, float* f, const Shape& s,
                           float eps, Isa isa, bool lowp) {
  const int64_t M = s.B * s.T, C = s.C, F = P.fc.w.N;
  for (int64_t m = 0; m < M; ++m) ln_row(x + m * C, P.l1w, P.l1b, h + m * C, C, eps);
  lin(P.qkv, h, M, qkv, false, isa, lowp);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(s.S);
    for (int64_t i = i0; i < i1; ++i) attend_pair(qkv, att, P, s, i / s.H, i % s.H, p.data(), isa == Isa::Avx512);
  });
  lin(P.ao, att, M, x, true, isa, lowp);
  for (int64_t m = 0; m < M; ++m) ln_row(x + m * C, P.l2w, P.l2b, h + m * C, C, eps);
  lin(P.fc, h, M, f, false, isa, lowp);
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) { gelu_inplace(f + b * F, (e - b) * F); });
  lin(P.mp, f, M, x, true, isa, lowp);
}

// ---- up to kGemvMaxRows rows (decode): the whole forward in one parallel region ----

struct ThreadCtx {  // one thread's private scratch in the region
  Isa isa;
  bool lowp;
  std::vector<float> h, xs, p;
  std::vector<uint8_t> q8;
  std::vector<uint16_t> q16;
  LowpRows rows;
  Claimer who;  // home slice; the calling thread's time spent waiting for other threads' chunks

  // the GEMV y (+)= in W^T + b of projection l, with `in` rounded into this thread's scratch when
  // the lowp path applies (every thread rounds the whole input itself: same values, no wait)
  Gemv gemv(const Linear& l, const float* in, int64_t M, float* y, bool accumulate) {
    Gemv g{in, M, l.w.K, l.w, l.bias, y, l.w.N, accumulate, isa, nullptr};
    if (lowp_applies(l.w, isa, lowp)) {
      round_rows(in, M, l.w.K, l.w.K, l.w.dtype == at::kChar, q8.data(), xs.data(), q16.data());
      rows = LowpRows{q8.data(), xs.data(), q16.data()};
      g.lowp = &rows;
    }
    return g;
  }
};

// g's columns as a phase of chunks; prep() (this thread's input) fills g before its first chunk,
// then(n0, n1) runs on each chunk's columns after the GEMV (the GELU of c_fc)
template <typename Prep, typename Then>
static void gemv_phase(WorkPhase& ph, const ThreadCtx& c, const WeightView& w, Gemv& g, Prep&& prep, Then&& then) {
  const int64_t cols = gemv_chunk_cols(w);
  ph.run(static_cast<int32_t>(CEIL_DIV(w.N, cols)), c.who, prep, [&](int32_t c) {
    const int64_t n0 = c * cols, n1 = std::min(w.N, n0 + cols);
    gemv_cols(g, n0, n1);
    then(n0, n1);
  });
}

static void layer_small(const LayerPlan& P, float* x, float* qkv, float* att, float* f, const Shape& s, float eps,
                        ThreadCtx& c, WorkPhase* ph) {
  const int64_t M = s.B * s.T, C = s.C, H = s.H, D = s.D, F = P.fc.w.N;
  float* h = c.h.data();
  auto none = [](int64_t, int64_t) {};
  Gemv g;
  auto ln1 = [&] {
    for (int64_t m = 0; m < M; ++m) ln_row(x + m * C, P.l1w, P.l1b, h + m * C, C, eps);
    g = c.gemv(P.qkv, h, M, qkv, false);
  };
  if (D % gemv_unit(P.qkv.w) == 0) {  // a chunk = a head: its q, k, v columns, cache write, attention
    ph[0].run(static_cast<int32_t>(H), c.who, ln1, [&](int32_t hh) {
      for (int64_t sec = 0; sec < 3; ++sec) gemv_cols(g, sec * C + hh * D, sec * C + (hh + 1) * D);
      for (int64_t b = 0; b < s.B; ++b) attend_pair(qkv, att, P, s, b, hh, c.p.data(), c.isa == Isa::Avx512);
    });
  } else {  // QKV columns, then (row, head) pairs
    gemv_phase(ph[0], c, P.qkv.w, g, ln1, none);
    ph[4].run(static_cast<int32_t>(s.B * H), c.who, [] {},
              [&](int32_t i) { attend_pair(qkv, att, P, s, i / H, i % H, c.p.data(), c.isa == Isa::Avx512); });
  }
  gemv_phase(ph[1], c, P.ao.w, g, [&] { g = c.gemv(P.ao, att, M, x, true); }, none);
  auto ln2 = [&] {
    for (int64_t m = 0; m < M; ++m) ln_row(x + m * C, P.l2w, P.l2b, h + m * C, C, eps);
    g = c.gemv(P.fc, h, M, f, false);
  };
  gemv_phase(ph[2], c, P.fc.w, g, ln2, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) gelu_inplace(f + m * F + n0, n1 - n0);
  });
  gemv_phase(ph[3], c, P.mp.w, g, [&] { g = c.gemv(P.mp, f, M, x, true); }, none);
}

// Contention guard: when the calling thread spent more than a quarter of a multi-threaded forward
// waiting for the others (their chunks, or the end of the region), another process holds their
// cores (a busy or oversubscribed machine, or a previous program's threads still spinning): the
// next forwards run on this thread alone, then the full count is tried again. The one-thread
// stretch doubles (4, 8, ... 256 calls) while the contention lasts and is back to 4 after a good
// multi-threaded call, so a passing disturbance costs a few tokens and a lasting one a probe now
// and then. Results are the same bits either way. GPT2_FAST_CPU_DEMOTE=0 turns the guard off.
static std::atomic<int> g_demoted{0}, g_backoff{0};

static void forward_small(const std::vector<LayerPlan>& plans, const Linear& lm, const float* lnf_w,
                          const float* lnf_b, float* x, const Shape& s, float eps, Isa isa, bool lowp, float* logits,
                          bool all_logits) {
  const int64_t M = s.B * s.T, C = s.C, R = all_logits ? M : s.B;
  int64_t F = 0;
  for (const LayerPlan& P : plans) F = std::max(F, P.fc.w.N);
  const int64_t K = std::max(C, F);
  std::vector<float> qkv(M * 3 * C), att(M * C), f(M * F);
  const size_t n_phases = 5 * plans.size() + 1;
  std::unique_ptr<WorkPhase[]> phases(new WorkPhase[n_phases]);
  int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  const char* guard = std::getenv("GPT2_FAST_CPU_DEMOTE");  // "0": no contention guard (tests, A/B)
  const bool demote = !(guard && guard[0] == '0');
  if (nt > 1 && demote && g_demoted.load(std::memory_order_relaxed) > 0) {
    g_demoted.fetch_sub(1, std::memory_order_relaxed);
    nt = 1;
  }
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  Clock::time_point main_done;
  int64_t main_wait_ns = 0;
#pragma omp parallel num_threads(nt)
  {
    const bool main = omp_get_thread_num() == 0;
    ThreadCtx c{isa, lowp, std::vector<float>(M * C), std::vector<float>(M, 1.f), std::vector<float>(s.S),
                std::vector<uint8_t>(lowp ? 2 * M * K : 0), std::vector<uint16_t>(lowp ? M * K : 0), LowpRows{},
                Claimer{omp_get_thread_num(), omp_get_num_threads(), main && nt > 1 ? &main_wait_ns : nullptr}};
    for (size_t l = 0; l < plans.size(); ++l)
      layer_small(plans[l], x, qkv.data(), att.data(), f.data(), s, eps, c, &phases[5 * l]);
    Gemv g;
    auto lnf = [&] {
      final_ln_rows(x, s, all_logits, lnf_w, lnf_b, eps, c.h.data());
      g = c.gemv(lm, c.h.data(), R, logits, false);
    };
    gemv_phase(phases[n_phases - 1], c, lm.w, g, lnf, [](int64_t, int64_t) {});
    if (main) main_done = Clock::now();
  }
  if (nt > 1) {
    const auto end = Clock::now();
    const int64_t idle = main_wait_ns + (end - main_done).count(), total = (end - start).count();
    if (demote && 4 * idle > total) {
      const int n = std::min(256, std::max(4, 2 * g_backoff.load(std::memory_order_relaxed)));
      g_backoff.store(n, std::memory_order_relaxed);
      g_demoted.store(n, std::memory_order_relaxed);
    } else {
      g_backoff.store(0, std::memory_order_relaxed);
    }
  }
}

static Shape check_shape(const Tensor& idx, int64_t start, const OptTensor& kv_start, const Tensor& wte,
                         at::TensorList k_caches, int64_t n_head) {
  CHECK_CPU(idx);
  CHECK_DIM(idx, 2);
  CHECK_DTYPE(idx, at::kLong);
  CHECK_CONTIGUOUS(idx);
  CHECK_DIM(wte, 2);
  TORCH_CHECK(wte.scalar_type() == at::kFloat || wte.scalar_type() == at::kBFloat16 || wte.scalar_type() == at::kChar,
              "wte must be float32, bfloat16 or int8 (the LM head's rows, with its scale), got ", wte.scalar_type());
  Shape s{idx.size(0), idx.size(1), wte.size(1), n_head, wte.size(1) / n_head, 0, start, {}};
  TORCH_CHECK(n_head > 0 && s.C % n_head == 0, "n_embd ", s.C, " is not a multiple of n_head ", n_head);
  TORCH_CHECK(!k_caches.empty(), "expected one KV cache per layer");
  const Tensor& kc = k_caches[0];
  TORCH_CHECK(kc.dim() == 4 && kc.size(0) >= s.B && kc.size(1) == s.H && kc.size(3) == s.D,
              "k cache must be (B_max >= ", s.B, ", ", s.H, ", S, ", s.D, "), got ", kc.sizes());
  s.S = kc.size(2);
  TORCH_CHECK(start >= 0 && start + s.T <= s.S, "slots [", start, ", ", start + s.T, ") do not fit the cache of ",
              s.S, " slots");
  s.ks.assign(s.B, 0);
  if (kv_start.has_value()) {
    CHECK_SHAPE(*kv_start, s.B);
    Tensor k64 = kv_start->to(at::kLong).contiguous();
    for (int64_t b = 0; b < s.B; ++b) s.ks[b] = k64.data_ptr<int64_t>()[b];
  }
  const int64_t V = wte.size(0);
  const int64_t* ids = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < V, "token id ", ids[i], " is outside [0, ", V, ")");
  return s;
}

}  // namespace cpu

Tensor cpu_gpt2_forward(const Tensor& idx, int64_t start, const OptTensor& kv_start, at::TensorList globals,
                        at::TensorList layers, at::TensorList k_caches, at::TensorList v_caches, int64_t n_head,
                        int64_t n_vocab, double eps, bool all_logits, int64_t isa, bool lowp_act) {
  using namespace cpu;
  TORCH_CHECK(globals.size() == 6, "globals must be [wte, wpe, ln_f.weight, ln_f.bias, lm_head weight, scale]");
  const int64_t n_layer = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layer * kLayerTensors &&
                  static_cast<int64_t>(v_caches.size()) == n_layer,
              "expected ", kLayerTensors, " tensors and a k and v cache per layer");
  const Tensor& wte = globals[0];
  Shape s = check_shape(idx, start, kv_start, wte, k_caches, n_head);
  const Isa is = resolve_isa(isa);
  const int64_t M = s.B * s.T, C = s.C;
  const float e = static_cast<float>(eps);
  const float* wpe = opt_f32(globals[1], globals[1].numel(), "wpe");
  TORCH_CHECK(wpe && globals[1].numel() >= (start + s.T) * C, "wpe is too short for the positions");
  std::vector<LayerPlan> plans;
  int64_t F = 0;
  for (int64_t l = 0; l < n_layer; ++l) {
    const Tensor &kc = k_caches[l], &vc = v_caches[l];
    for (const Tensor* c : {&kc, &vc})
      TORCH_CHECK((c->scalar_type() == at::kFloat || c->scalar_type() == at::kBFloat16) && c->is_contiguous() &&
                      c->sizes() == k_caches[0].sizes() && c->scalar_type() == k_caches[0].scalar_type(),
                  "KV caches must be contiguous float32 or bfloat16 tensors of one shape and dtype");
    plans.push_back(make_plan(layers.slice(l * kLayerTensors, kLayerTensors), kc, vc, C));
    F = std::max(F, plans.back().fc.w.N);
  }
  const float *lw = opt_f32(globals[2], C, "ln_f.weight"), *lb = opt_f32(globals[3], C, "ln_f.bias");
  TORCH_CHECK(n_vocab > 0 && n_vocab <= globals[4].size(0), "n_vocab must be in [1, ", globals[4].size(0), "]");
  Linear lm;
  lm.weight = globals[4].narrow(0, 0, n_vocab);
  lm.w = weight_view(lm.weight, globals[5].numel() ? OptTensor(globals[5].narrow(0, 0, n_vocab)) : std::nullopt);
  TORCH_CHECK(lm.w.K == C, "lm_head must have ", C, " input features, got ", lm.w.K);
  const int64_t R = all_logits ? M : s.B;
  Tensor logits = empty_out({R, n_vocab}, idx.options().dtype(at::kFloat));

  std::vector<float> x(M * C);
  const int64_t* ids = idx.data_ptr<int64_t>();
  if (wte.scalar_type() == at::kChar) {  // rows of the int8 LM head: its per-row scale (globals[5])
    TORCH_CHECK(globals[5].scalar_type() == at::kFloat && globals[5].is_contiguous() &&
                    globals[5].numel() == wte.size(0),
                "an int8 wte needs the LM head's float32 scale of ", wte.size(0), " rows as globals[5]");
    embed_rows<int8_t>(wte, globals[5].data_ptr<float>(), ids, wpe, s, x.data());
  } else if (wte.scalar_type() == at::kFloat) {
    embed_rows<float>(wte, nullptr, ids, wpe, s, x.data());
  } else {
    embed_rows<c10::BFloat16>(wte, nullptr, ids, wpe, s, x.data());
  }
  if (M <= region_max_rows(plans.empty() ? lm.w : plans[0].qkv.w, is, lowp_act)) {
    forward_small(plans, lm, lw, lb, x.data(), s, e, is, lowp_act, logits.data_ptr<float>(), all_logits);
  } else {
    std::vector<float> h(M * C), qkv(M * 3 * C), att(M * C), f(M * F);
    for (const LayerPlan& P : plans) run_layer_gemm(P, x.data(), h.data(), qkv.data(), att.data(), f.data(), s, e, is, lowp_act);
    std::vector<float> last(R * C);
    final_ln_rows(x.data(), s, all_logits, lw, lb, e, last.data());
    lin(lm, last.data(), R, logits.data_ptr<float>(), false, is, lowp_act);
  }
  return all_logits ? logits.view({s.B, s.T, n_vocab}) : logits;
}

}  // namespace gpt2_fast

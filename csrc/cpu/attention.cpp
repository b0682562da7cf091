// Causal attention and decode attention over the KV cache on CPU (forward only; the backward
// recomputes through the reference math in gpt2_fast/extension.py).
//
// Design: flash-attention's tiling without its online softmax. Work items are
// (batch, head, block of BQ query rows), run in parallel by at::parallel_for. An item only
// touches the keys its rows can see: [jlo, jhi] = the union of the rows' windows (the causal
// diagonal, or kv_start .. kv_len - Tq + i for the cache), so the causal forward does half the
// work of the dense reference and decode reads only the live part of the cache. Per item:
//   S = Q_blk K[jlo:jhi]^T           (at::mm: MKL/OpenBLAS sgemm, one thread inside the item)
//   P = softmax(scale * S) per row over the row's window, exact zeros outside it; lse = log sum exp
//   O_blk = P V[jlo:jhi]
// in fp32 whatever the input dtype (bf16/fp16 tiles are converted once per item) and rounded
// once on store. A query row whose window is empty gets zeros and lse = -inf (the reference
// gives zeros for the cache; for attention that only happens with Tq > Tk, where it gives NaN).
#include <algorithm>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include "../common.h"
#include "../ops.h"
#include "cpu_math.h"

namespace gpt2_fast {
namespace cpu {

constexpr int64_t kBlockQ = 64;

// ------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------

// s[0, m): raw scores q.k of one query row. Keeps [lo, hi] (inclusive), scales, and overwrites s
// with the normalized probabilities (exact zeros outside the window). Returns the row's lse.
GPT2F_CLONES static float softmax_row(float* __restrict s, int64_t m, int64_t lo, int64_t hi, float scale) {
  if (hi < lo) {
    std::fill(s, s + m, 0.f);
    return -std::numeric_limits<float>::infinity();
  }
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = lo; j <= hi; ++j) {
    s[j] *= scale;
    mx = std::max(mx, s[j]);
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = lo; j <= hi; ++j) {
    const float e = exp_f32(s[j] - mx);
    s[j] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = lo; j <= hi; ++j) s[j] *= inv;
  std::fill(s, s + lo, 0.f);
  std::fill(s + hi + 1, s + m, 0.f);
  return mx + std::log(sum);
}

// One work item: rows of Qf (n, D) fp32 against Kf, Vf (m, D) fp32 = keys jlo .. jlo + m - 1;
// row r sees keys [lo[r], hi[r]] relative to jlo. Writes Of (n, D) fp32 and lse[0, n).
static void attend_block(const Tensor& Qf, const Tensor& Kf, const Tensor& Vf, const int64_t* lo,
                         const int64_t* hi, float scale, std::vector<float>& sbuf, Tensor& Of, float* lse) {
  const int64_t n = Qf.size(0), m = Kf.size(0);
  sbuf.resize(static_cast<size_t>(n * m));
  Tensor S = at::from_blob(sbuf.data(), {n, m}, at::TensorOptions().dtype(at::kFloat));
  at::mm_out(S, Qf, Kf.t());
  for (int64_t r = 0; r < n; ++r) lse[r] = softmax_row(sbuf.data() + r * m, m, lo[r], hi[r], scale);
  at::mm_out(Of, S, Vf);
}

// Of (n, D) fp32 -> n rows of the output, `row_stride` elements apart.
template <typename scalar_t>
static void store_rows(const Tensor& Of, scalar_t* dst, int64_t n, int64_t D, int64_t row_stride) {
  const float* src = Of.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) store_f32(src + r * D, dst + r * row_stride, D);
}

// The output (B, H, T, D) as a view of (B, T, H, D) memory: what the model's
// y.transpose(1, 2).reshape(B, T, C) reads without a copy (the Triton kernels do the same).
static Tensor bthd_out(const Tensor& q) {
  return empty_out({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------

static void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const char* name) {
  for (const Tensor* t : {&q, &k, &v}) {
    CHECK_CPU(*t);
    CHECK_FLOAT_INPUT(*t);
    TORCH_CHECK(t->dim() == 4, name, ": q, k, v must be 4-D (B, H, T, D), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": q, k, v must share a dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
  }
  TORCH_CHECK(k.sizes() == v.sizes(), name, ": k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), name,
              ": q ", q.sizes(), " and k ", k.sizes(), " must agree in B, H and D");
}

// fp32 view or copy of t, detached: the OpenMP workers run with grad mode on (it is thread-local),
// and at::mm_out refuses inputs that require grad.
static Tensor as_f32(const Tensor& t) {
  Tensor f = t.scalar_type() == at::kFloat ? t.detach() : t.detach().to(at::kFloat);
  return f.stride(-1) == 1 ? f : f.contiguous();
}

}  // namespace cpu

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                             double scale) {
  cpu::check_qkv(q, k, v, "attention_fwd");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner at::mm are kernel internals
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2);
  Tensor o = cpu::bthd_out(q);
  Tensor lse = empty_out({B, H, Tq}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  const Tensor qf = cpu::as_f32(q), kf = cpu::as_f32(k), vf = cpu::as_f32(v);
  const int64_t nqb = CEIL_DIV(Tq, cpu::kBlockQ);
  const float sc = static_cast<float>(scale);
  float* lsep = lse.data_ptr<float>();
  GPT2F_DISPATCH_FLOAT(q.scalar_type(), "attention_fwd_cpu", [&] {
    scalar_t* op = o.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sbuf;
      std::vector<int64_t> lo(cpu::kBlockQ, 0), hi(cpu::kBlockQ);
      Tensor obuf = at::empty({cpu::kBlockQ, D}, at::TensorOptions().dtype(at::kFloat));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / nqb, i0 = (item % nqb) * cpu::kBlockQ;
        const int64_t b = bh / H, h = bh % H, n = std::min(cpu::kBlockQ, Tq - i0);
        int64_t m = Tk;  // keys this block can see: [0, m)
        for (int64_t r = 0; r < n; ++r) hi[r] = causal ? std::min(Tk - 1, i0 + r + Tk - Tq) : Tk - 1;
        if (causal) m = std::max<int64_t>(0, hi[n - 1] + 1);
        Tensor Of = obuf.narrow(0, 0, n);
        float* lse_row = lsep + (bh * Tq + i0);
        if (m == 0) {
          Of.zero_();
          std::fill(lse_row, lse_row + n, -std::numeric_limits<float>::infinity());
        } else {
          cpu::attend_block(qf[b][h].narrow(0, i0, n), kf[b][h].narrow(0, 0, m), vf[b][h].narrow(0, 0, m),
                            lo.data(), hi.data(), sc, sbuf, Of, lse_row);
        }
        cpu::store_rows(Of, op + b * o.stride(0) + h * o.stride(1) + i0 * o.stride(2), n, D, o.stride(2));
      }
    });
  });
  return {o, lse};
}

Tensor decode_attention_fwd_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                const Tensor& kv_len, const OptTensor& kv_start, double scale) {
  cpu::check_qkv(q, k_cache, v_cache, "decode_attention_fwd");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), S = k_cache.size(2);
  for (const Tensor* t : {&kv_len, kv_start.has_value() ? &kv_start.value() : &kv_len}) {
    CHECK_CPU(*t);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && !at::isFloatingType(t->scalar_type()),
                "decode_attention_fwd: kv_len / kv_start must be integer tensors of shape (", B, ",), got ",
                t->sizes(), " ", t->scalar_type());
  }
  Tensor o = cpu::bthd_out(q);
  if (o.numel() == 0) return o;
  const Tensor len64 = kv_len.to(at::kLong).contiguous();
  const Tensor start64 = kv_start.has_value() ? kv_start->to(at::kLong).contiguous() : at::zeros({B}, at::kLong);
  const int64_t* lenp = len64.data_ptr<int64_t>();
  const int64_t* startp = start64.data_ptr<int64_t>();
  const Tensor qf = cpu::as_f32(q);
  const float sc = static_cast<float>(scale);
  const int64_t nqb = CEIL_DIV(Tq, cpu::kBlockQ);
  GPT2F_DISPATCH_FLOAT(q.scalar_type(), "decode_attention_fwd_cpu", [&] {
    scalar_t* op = o.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sbuf, lse(cpu::kBlockQ);
      const Tensor kd = k_cache.detach(), vd = v_cache.detach();
      std::vector<int64_t> lo(cpu::kBlockQ), hi(cpu::kBlockQ);
      Tensor obuf = at::empty({cpu::kBlockQ, D}, at::TensorOptions().dtype(at::kFloat));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / nqb, i0 = (item % nqb) * cpu::kBlockQ;
        const int64_t b = bh / H, h = bh % H, n = std::min(cpu::kBlockQ, Tq - i0);
        // Row r (query i0 + r) sees slots kv_start .. kv_len - Tq + i0 + r, clipped to the cache.
        const int64_t start = std::max<int64_t>(0, startp[b]);
        int64_t jlo = S, jhi = -1;
        for (int64_t r = 0; r < n; ++r) {
          lo[r] = start;
          hi[r] = std::min(S - 1, lenp[b] - Tq + i0 + r);
          if (hi[r] >= lo[r]) {
            jlo = std::min(jlo, lo[r]);
            jhi = std::max(jhi, hi[r]);
          }
        }
        Tensor Of = obuf.narrow(0, 0, n);
        if (jhi < jlo) {
          Of.zero_();
        } else {
          for (int64_t r = 0; r < n; ++r) lo[r] -= jlo, hi[r] -= jlo;
          const int64_t m = jhi - jlo + 1;
          cpu::attend_block(qf[b][h].narrow(0, i0, n), cpu::as_f32(kd[b][h].narrow(0, jlo, m)),
                            cpu::as_f32(vd[b][h].narrow(0, jlo, m)), lo.data(), hi.data(), sc, sbuf, Of,
                            lse.data());
        }
        cpu::store_rows(Of, op + b * o.stride(0) + h * o.stride(1) + i0 * o.stride(2), n, D, o.stride(2));
      }
    });
  });
  return o;
}

}  // namespace gpt2_fast

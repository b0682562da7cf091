// LayerNorm (optionally fused with the residual add) on CPU: forward and backward.
//
// Math, per row x of length C (fp32 throughout, rounded once on store):
//   forward   mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
//             xhat = (x - mean) * rstd,  y = xhat * w + b
//   backward  g = dy * w,  c1 = sum(g * xhat) / C,  c2 = sum(g) / C
//             dx = (g - xhat * c1 - c2) * rstd  (+ dresidual: the add_layer_norm's ds flows through)
//             dw = sum_rows(dy * xhat),  db = sum_rows(dy)
// dw/db: one fp32 partial per row chunk, summed afterwards (no atomics; deterministic for a
// given thread count). Rows run in parallel with at::parallel_for (OpenMP).
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"
#include "cpu_math.h"

namespace gpt2_fast {
namespace cpu {

// ------------------------------------------------------------------------------------------
// kernels (fp32 rows)
// ------------------------------------------------------------------------------------------

GPT2F_CLONES static void ln_fwd_row(const float* __restrict x, const float* __restrict w,
                                    const float* __restrict b, float* __restrict y, int64_t C,
                                    float eps, float* mean_out, float* rstd_out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < C; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(C);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < C; ++i) {
    const float d = x[i] - mean;
    sq += d * d;
  }
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(C) + eps);
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
  *mean_out = mean;
  *rstd_out = rstd;
}

GPT2F_CLONES static void ln_bwd_row(const float* __restrict dy, const float* __restrict x,
                                    const float* __restrict w, float mean, float rstd,
                                    float* __restrict dx, float* __restrict dw_acc,
                                    float* __restrict db_acc, int64_t C) {
  float c1 = 0.f, c2 = 0.f;
#pragma omp simd reduction(+ : c1, c2)
  for (int64_t i = 0; i < C; ++i) {
    const float xhat = (x[i] - mean) * rstd;
    const float g = dy[i] * w[i];
    c1 += g * xhat;
    c2 += g;
  }
  c1 /= static_cast<float>(C);
  c2 /= static_cast<float>(C);
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const float xhat = (x[i] - mean) * rstd;
    dx[i] = (dy[i] * w[i] - xhat * c1 - c2) * rstd;
    dw_acc[i] += dy[i] * xhat;
    db_acc[i] += dy[i];
  }
}

GPT2F_CLONES static void add_rows(const float* __restrict a, float* __restrict b, int64_t C) {
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) b[i] += a[i];
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------

static void check_rows(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const char* name) {
  CHECK_CPU(x);
  CHECK_DIM(x, 2);
  CHECK_CONTIGUOUS(x);
  CHECK_FLOAT_INPUT(x);
  const int64_t C = x.size(1);
  TORCH_CHECK(C > 0, name, ": the normalized dimension must be non-empty");
  for (const OptTensor* p : {&weight, &bias}) {
    if (p->has_value()) {
      CHECK_CPU(p->value());
      TORCH_CHECK(p->value().dim() == 1 && p->value().size(0) == C, name, ": weight/bias must have shape (",
                  C, ",), got ", p->value().sizes());
    }
  }
}

// weight / bias as contiguous fp32 (C,), ones / zeros when absent: the row kernels never branch.
static Tensor param_f32(const OptTensor& p, int64_t C, float fill) {
  if (p.has_value()) return p->to(at::kFloat).contiguous();
  return at::full({C}, fill, at::TensorOptions().dtype(at::kFloat));
}

template <typename scalar_t>
static void ln_fwd_impl(const scalar_t* x, const scalar_t* res, scalar_t* s_out, const float* w,
                        const float* b, scalar_t* y, float* mean, float* rstd, int64_t N, int64_t C,
                        float eps) {
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
    std::vector<float> xf(C), tmp(C);
    for (int64_t r = begin; r < end; ++r) {
      load_f32(x + r * C, xf.data(), C);
      if (res != nullptr) {
        load_f32(res + r * C, tmp.data(), C);
        add_rows(tmp.data(), xf.data(), C);
        store_f32(xf.data(), s_out + r * C, C);
        if (!std::is_same<scalar_t, float>::value) load_f32(s_out + r * C, xf.data(), C);  // LN of the stored s
      }
      ln_fwd_row(xf.data(), w, b, tmp.data(), C, eps, mean + r, rstd + r);
      store_f32(tmp.data(), y + r * C, C);
    }
  });
}

static std::tuple<Tensor, Tensor, Tensor, Tensor> ln_fwd(const Tensor& x, const Tensor* residual,
                                                         const OptTensor& weight, const OptTensor& bias,
                                                         double eps) {
  const int64_t N = x.size(0), C = x.size(1);
  Tensor w = param_f32(weight, C, 1.f), b = param_f32(bias, C, 0.f);
  Tensor y = empty_out({N, C}, x.options());
  Tensor s = residual ? empty_out({N, C}, x.options()) : Tensor();
  Tensor mean = empty_out({N}, x.options().dtype(at::kFloat));
  Tensor rstd = empty_out({N}, x.options().dtype(at::kFloat));
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    ln_fwd_impl<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                          residual ? s.data_ptr<scalar_t>() : nullptr, w.data_ptr<float>(), b.data_ptr<float>(),
                          y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), N, C,
                          static_cast<float>(eps));
  });
  return {y, mean, rstd, s};
}

}  // namespace cpu

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps) {
  cpu::check_rows(x, weight, bias, "layer_norm_fwd");
  auto [y, mean, rstd, s] = cpu::ln_fwd(x, nullptr, weight, bias, eps);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cpu(const Tensor& x, const Tensor& residual,
                                                                  const OptTensor& weight,
                                                                  const OptTensor& bias, double eps) {
  cpu::check_rows(x, weight, bias, "add_layer_norm_fwd");
  CHECK_CPU(residual);
  CHECK_CONTIGUOUS(residual);
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_layer_norm_fwd: residual must have x's shape ", x.sizes(),
              ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "add_layer_norm_fwd: residual must be ",
              x.scalar_type(), ", got ", residual.scalar_type());
  auto [y, mean, rstd, s] = cpu::ln_fwd(x, &residual, weight, bias, eps);
  return {s, y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                      const Tensor& mean, const Tensor& rstd,
                                                      const OptTensor& dresidual) {
  cpu::check_rows(x, weight, std::nullopt, "layer_norm_bwd");
  const int64_t N = x.size(0), C = x.size(1);
  CHECK_CPU(dy);
  CHECK_CONTIGUOUS(dy);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "layer_norm_bwd: dy must match x (", x.sizes(), ", ", x.scalar_type(), "), got ", dy.sizes(), ", ",
              dy.scalar_type());
  for (const Tensor* t : {&mean, &rstd}) {
    CHECK_CPU(*t);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "layer_norm_bwd: mean/rstd must be contiguous float32 (", N, ",), got ", t->sizes(), " ",
                t->scalar_type());
  }
  if (dresidual.has_value()) {
    CHECK_CPU(*dresidual);
    CHECK_CONTIGUOUS(*dresidual);
    TORCH_CHECK(dresidual->sizes() == x.sizes() && dresidual->scalar_type() == x.scalar_type(),
                "layer_norm_bwd: dresidual must match x");
  }
  Tensor w = cpu::param_f32(weight, C, 1.f);
  Tensor dx = empty_out({N, C}, x.options());
  // One fp32 partial row of dw and db per chunk of rows; chunks are fixed before the parallel loop.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  Tensor dw_part = at::zeros({chunks, C}, x.options().dtype(at::kFloat));
  Tensor db_part = at::zeros({chunks, C}, x.options().dtype(at::kFloat));
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* drp = dresidual.has_value() ? dresidual->data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const float* mp = mean.data_ptr<float>();
    const float* rp = rstd.data_ptr<float>();
    float* dwp = dw_part.data_ptr<float>();
    float* dbp = db_part.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
      std::vector<float> xf(C), dyf(C), dxf(C), tmp(C);
      for (int64_t c = cbegin; c < cend; ++c) {
        const int64_t r0 = c * N / chunks, r1 = (c + 1) * N / chunks;
        for (int64_t r = r0; r < r1; ++r) {
          cpu::load_f32(xp + r * C, xf.data(), C);
          cpu::load_f32(dyp + r * C, dyf.data(), C);
          cpu::ln_bwd_row(dyf.data(), xf.data(), wp, mp[r], rp[r], dxf.data(), dwp + c * C, dbp + c * C, C);
          if (drp != nullptr) {
            cpu::load_f32(drp + r * C, tmp.data(), C);
            cpu::add_rows(tmp.data(), dxf.data(), C);
          }
          cpu::store_f32(dxf.data(), dxp + r * C, C);
        }
      }
    });
  });
  return {dx, dw_part.sum(0), db_part.sum(0)};
}

}  // namespace gpt2_fast

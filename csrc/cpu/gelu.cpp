// bias + tanh-GELU (GPT-2's MLP activation) on CPU: forward and backward.
//
// Math (fp32, rounded once on store), u = x + bias, z = k0 (u + k1 u^3), t = tanh(z),
// k0 = sqrt(2/pi), k1 = 0.044715:
//   forward   y = 0.5 u (1 + t)
//   backward  du = dy * (0.5 (1 + t) + 0.5 u (1 - t^2) k0 (1 + 3 k1 u^2)),  dx = du,
//             dbias = sum_rows(du) as fp32 per-chunk partials summed afterwards.
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"
#include "cpu_math.h"

namespace gpt2_fast {
namespace cpu {

constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;

// ------------------------------------------------------------------------------------------
// kernels (fp32 rows)
// ------------------------------------------------------------------------------------------

GPT2F_CLONES static void gelu_fwd_row(const float* __restrict x, const float* __restrict b,
                                      float* __restrict y, int64_t C) {
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const float u = x[i] + b[i];
    const float t = tanh_f32(kGeluK0 * (u + kGeluK1 * u * u * u));
    y[i] = 0.5f * u * (1.f + t);
  }
}

GPT2F_CLONES static void gelu_bwd_row(const float* __restrict dy, const float* __restrict x,
                                      const float* __restrict b, float* __restrict dx,
                                      float* __restrict db_acc, int64_t C) {
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const float u = x[i] + b[i];
    const float t = tanh_f32(kGeluK0 * (u + kGeluK1 * u * u * u));
    const float d = 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * kGeluK0 * (1.f + 3.f * kGeluK1 * u * u);
    const float g = dy[i] * d;
    dx[i] = g;
    db_acc[i] += g;
  }
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------

static void check_gelu(const Tensor& x, const OptTensor& bias, const char* name) {
  CHECK_CPU(x);
  CHECK_DIM(x, 2);
  CHECK_CONTIGUOUS(x);
  CHECK_FLOAT_INPUT(x);
  if (bias.has_value()) {
    CHECK_CPU(*bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), name, ": bias must have shape (", x.size(1),
                ",), got ", bias->sizes());
  }
}

static Tensor bias_f32(const OptTensor& bias, int64_t C) {
  if (bias.has_value()) return bias->to(at::kFloat).contiguous();
  return at::zeros({C}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace cpu

Tensor bias_gelu_fwd_cpu(const Tensor& x, const OptTensor& bias) {
  cpu::check_gelu(x, bias, "bias_gelu_fwd");
  const int64_t N = x.size(0), C = x.size(1);
  Tensor b = cpu::bias_f32(bias, C);
  Tensor y = empty_out({N, C}, x.options());
  if (C == 0) return y;
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* bp = b.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      std::vector<float> xf(C), yf(C);
      for (int64_t r = begin; r < end; ++r) {
        cpu::load_f32(xp + r * C, xf.data(), C);
        cpu::gelu_fwd_row(xf.data(), bp, yf.data(), C);
        cpu::store_f32(yf.data(), yp + r * C, C);
      }
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cpu(const Tensor& dy, const Tensor& x, const OptTensor& bias) {
  cpu::check_gelu(x, bias, "bias_gelu_bwd");
  CHECK_CPU(dy);
  CHECK_CONTIGUOUS(dy);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "bias_gelu_bwd: dy must match x (",
              x.sizes(), ", ", x.scalar_type(), "), got ", dy.sizes(), ", ", dy.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  Tensor b = cpu::bias_f32(bias, C);
  Tensor dx = empty_out({N, C}, x.options());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  Tensor db_part = at::zeros({chunks, C}, x.options().dtype(at::kFloat));
  if (C == 0 || N == 0) return {dx, db_part.sum(0)};
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_bwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const float* bp = b.data_ptr<float>();
    float* dbp = db_part.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
      std::vector<float> xf(C), dyf(C), dxf(C);
      for (int64_t c = cbegin; c < cend; ++c) {
        for (int64_t r = c * N / chunks; r < (c + 1) * N / chunks; ++r) {
          cpu::load_f32(xp + r * C, xf.data(), C);
          cpu::load_f32(dyp + r * C, dyf.data(), C);
          cpu::gelu_bwd_row(dyf.data(), xf.data(), bp, dxf.data(), dbp + c * C, C);
          cpu::store_f32(dxf.data(), dxp + r * C, C);
        }
      }
    });
  });
  return {dx, db_part.sum(0)};
}

}  // namespace gpt2_fast

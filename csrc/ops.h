// The entry points of gpt2_fast._C, one CPU and one CUDA implementation per registered op
// (bindings.cpp registers them as torch.ops.gpt2_fast.<op>). Shapes, as the Python wrapper
// (gpt2_fast/extension.py) passes them:
//   x, residual, dy (N, C) row-major; weight, bias (C,) or None; mean, rstd (N,) fp32
//   q (B, H, Tq, D), k, v (B, H, Tk, D), last dim contiguous; lse (B, H, Tq) fp32
//   k_cache, v_cache (B, H, S, D); kv_len, kv_start (B,) int32/int64
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace gpt2_fast {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// CPU (csrc/cpu/*.cpp)
std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cpu(const Tensor& x, const Tensor& residual,
                                                                  const OptTensor& weight,
                                                                  const OptTensor& bias, double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                      const Tensor& mean, const Tensor& rstd,
                                                      const OptTensor& dresidual);
Tensor bias_gelu_fwd_cpu(const Tensor& x, const OptTensor& bias);
std::tuple<Tensor, Tensor> bias_gelu_bwd_cpu(const Tensor& dy, const Tensor& x, const OptTensor& bias);
std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                             double scale);
Tensor decode_attention_fwd_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                const Tensor& kv_len, const OptTensor& kv_start, double scale);

#ifdef GPT2_FAST_WITH_CUDA
// CUDA (csrc/*.cu)
std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x, const OptTensor& weight,
                                                       const OptTensor& bias, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cuda(const Tensor& x, const Tensor& residual,
                                                                   const OptTensor& weight,
                                                                   const OptTensor& bias, double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                       const Tensor& mean, const Tensor& rstd,
                                                       const OptTensor& dresidual);
Tensor bias_gelu_fwd_cuda(const Tensor& x, const OptTensor& bias);
std::tuple<Tensor, Tensor> bias_gelu_bwd_cuda(const Tensor& dy, const Tensor& x, const OptTensor& bias);
std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                              double scale);
Tensor decode_attention_fwd_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                 const Tensor& kv_len, const OptTensor& kv_start, double scale);
#endif

}  // namespace gpt2_fast

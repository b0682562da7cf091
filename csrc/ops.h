// The entry points of gpt2_fast._C, one CPU and one CUDA implementation per registered op
// (bindings.cpp registers them as torch.ops.gpt2_fast.<op>). Shapes, as the Python wrapper
// (gpt2_fast/extension.py) passes them:
//   x, residual, dy (N, C) row-major; weight, bias (C,) or None; mean, rstd (N,) fp32
//   q (B, H, Tq, D), k, v (B, H, Tk, D), last dim contiguous; lse (B, H, Tq) fp32
//   k_cache, v_cache (B, H, S, D); kv_len, kv_start (B,) int32/int64
#pragma once

#include <optional>
#include <string>
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
// CPU inference (csrc/cpu/gemv.cpp, csrc/cpu/decode_step.cpp): x (M, K) fp32, weight (N, K) fp32 /
// bf16 / int8 stored (N, K) or (K, N) row-major, scale (N,) fp32 for int8, bias (N,) fp32;
// isa -1 auto, 0 portable, 1 avx2, 2 avx512; lowp_act: int8 / bf16 activations (VNNI / AVX512-BF16)
Tensor cpu_linear(const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& bias,
                  int64_t isa, bool lowp_act);
std::string cpu_isa(int64_t isa);
// the whole forward for CPU inference (prefill T > 1, decode T == 1): idx (B, T) int64 at cache slots
// [start, start + T) -> last-position logits (B, n_vocab) fp32 (all_logits: (B, T, n_vocab)); writes the (B_max, H, S, D) fp32 caches
Tensor cpu_gpt2_forward(const Tensor& idx, int64_t start, const OptTensor& kv_start, at::TensorList globals,
                        at::TensorList layers, at::TensorList k_caches, at::TensorList v_caches, int64_t n_head,
                        int64_t n_vocab, double eps, bool all_logits, int64_t isa, bool lowp_act);
// the end of a greedy CPU decode step (csrc/cpu/greedy_advance.cpp): per row, nxt = done ? filler :
// argmax(logits (B, V) fp32); seq[b, pos + 1] = nxt; done |= nxt == eot & stop ((1,) or (B,)); pos += 1
void cpu_greedy_advance(const Tensor& logits, const Tensor& seq, const Tensor& pos, const Tensor& done,
                        const Tensor& stop, int64_t filler, int64_t eot);
// CPU training (csrc/cpu/lm_head_loss.cpp): the LM head + cross-entropy of h (N, C) and the tied
// weight (Vp, C) over vocab [0, vocab_size) -> (mean loss fp32 scalar, dL/dh (N, C) fp32,
// dL/dW (Vp, C) fp32); the gradients only with need_grad (else empty)
std::tuple<Tensor, Tensor, Tensor> lm_head_ce_fwd_cpu(const Tensor& h, const Tensor& weight, const Tensor& targets,
                                                      int64_t ignore_index, int64_t vocab_size, bool need_grad);

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

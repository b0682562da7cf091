// The one registration point of gpt2_fast._C: the torch.library namespace `gpt2_fast` (schemas,
// CPU and CUDA implementations) and a small pybind11 module for build information.
// Fake (meta) implementations and autograd live in Python: gpt2_fast/extension.py.
#include <pybind11/pybind11.h>  // PYBIND11_MODULE; lighter than <torch/extension.h>
#include <torch/library.h>

#include "common.h"
#include "ops.h"

TORCH_LIBRARY(gpt2_fast, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dresidual)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias) -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("decode_attention_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_len, Tensor? kv_start,"
        " float scale) -> Tensor");
  m.def("cpu_linear(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, int isa=-1, bool lowp_act=False) -> Tensor");
  m.def("cpu_isa(int isa=-1) -> str", &gpt2_fast::cpu_isa);  // no tensors: a catch-all kernel
  m.def("cpu_gpt2_forward(Tensor idx, int start, Tensor? kv_start, Tensor[] globals, Tensor[] layers,"
        " Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int n_head, int n_vocab, float eps, bool all_logits=False,"
        " int isa=-1, bool lowp_act=False) -> Tensor");
  m.def("cpu_greedy_advance(Tensor logits, Tensor(a!) seq, Tensor(b!) pos, Tensor(c!) done, Tensor stop, int filler,"
        " int eot) -> ()");
  m.def("lm_head_ce_fwd(Tensor h, Tensor weight, Tensor targets, int ignore_index, int vocab_size, bool need_grad)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gpt2_fast, CPU, m) {
  m.impl("layer_norm_fwd", &gpt2_fast::layer_norm_fwd_cpu);
  m.impl("add_layer_norm_fwd", &gpt2_fast::add_layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &gpt2_fast::layer_norm_bwd_cpu);
  m.impl("bias_gelu_fwd", &gpt2_fast::bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &gpt2_fast::bias_gelu_bwd_cpu);
  m.impl("attention_fwd", &gpt2_fast::attention_fwd_cpu);
  m.impl("decode_attention_fwd", &gpt2_fast::decode_attention_fwd_cpu);
  m.impl("cpu_linear", &gpt2_fast::cpu_linear);
  m.impl("cpu_gpt2_forward", &gpt2_fast::cpu_gpt2_forward);
  m.impl("cpu_greedy_advance", &gpt2_fast::cpu_greedy_advance);
  m.impl("lm_head_ce_fwd", &gpt2_fast::lm_head_ce_fwd_cpu);
}

#ifdef GPT2_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(gpt2_fast, CUDA, m) {
  m.impl("layer_norm_fwd", &gpt2_fast::layer_norm_fwd_cuda);
  m.impl("add_layer_norm_fwd", &gpt2_fast::add_layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &gpt2_fast::layer_norm_bwd_cuda);
  m.impl("bias_gelu_fwd", &gpt2_fast::bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &gpt2_fast::bias_gelu_bwd_cuda);
  m.impl("attention_fwd", &gpt2_fast::attention_fwd_cuda);
  m.impl("decode_attention_fwd", &gpt2_fast::decode_attention_fwd_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gpt2_fast compiled kernels; the ops are torch.ops.gpt2_fast.*";
#ifdef GPT2_FAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
#ifdef _OPENMP
  m.attr("WITH_OPENMP") = true;
#else
  m.attr("WITH_OPENMP") = false;
#endif
}

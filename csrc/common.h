// Shared by every translation unit of gpt2_fast._C (C++ and CUDA): input checks, CEIL_DIV,
// dtype dispatch, cudaCheck, and the poisoned output allocation the tests rely on.
#pragma once

#include <cstdlib>
#include <limits>

// Only the ATen pieces used, not <ATen/ATen.h> / <torch/extension.h>: that halves the compile
// time of each translation unit (and nvcc parses the headers twice).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

#define CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define CHECK_CPU(x) TORCH_CHECK((x).is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_LASTDIM_CONTIGUOUS(x) \
  TORCH_CHECK((x).stride(-1) == 1, #x " must have a contiguous last dimension, got stride ", (x).stride(-1))
#define CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must be ", (d), "-D, got ", (x).dim(), "-D")
#define CHECK_SHAPE(x, ...)                                                                     \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())
#define CHECK_FLOAT_INPUT(x)                                                                   \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||             \
                  (x).scalar_type() == at::kBFloat16,                                          \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

// The three floating types every kernel takes; statistics and accumulation are always fp32.
#define GPT2F_DISPATCH_FLOAT(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define cudaCheck(err)                                                                     \
  do {                                                                                     \
    cudaError_t err_ = (err);                                                              \
    TORCH_CHECK(err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(err_), " at ",     \
                __FILE__, ":", __LINE__);                                                  \
  } while (0)
#endif

namespace gpt2_fast {

// GPT2_FAST_POISON=1 (set by tests/conftest.py): outputs start as NaN, so an element a kernel
// forgets to write fails the test instead of passing on stale memory.
inline bool poison_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("GPT2_FAST_POISON");
    return v != nullptr && v[0] == '1' && v[1] == '\0';
  }();
  return on;
}

inline at::Tensor empty_out(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_enabled() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

}  // namespace gpt2_fast

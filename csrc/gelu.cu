// bias + tanh-GELU forward/backward on CUDA.
//
// Math: as csrc/cpu/gelu.cpp (u = x + b, t = tanh(k0 (u + k1 u^3)), y = 0.5 u (1 + t),
// du = dy (0.5 (1 + t) + 0.5 u (1 - t^2) k0 (1 + 3 k1 u^2))), fp32 inside, rounded once on store.
// Layout: a 2-D grid of (32 x 8)-thread blocks; threadIdx.x walks 16-byte column vectors
// (8 bf16/fp16 or 4 fp32), threadIdx.y and blockIdx.y stride over rows, so the bias vector is
// loaded once per thread and every access is a coalesced 16-byte load/store. Backward: each
// thread keeps fp32 dbias sums for its columns in registers, the 8 row-threads of a block are
// reduced in shared memory, and one partial row per blockIdx.y is written and summed by the
// launcher (no atomics, deterministic). Bytes: fwd 1R+1W, bwd 2R+1W of N*C.
// tanh: tanhf (accurate, max 2 ulp; the hardware tanh.approx, MUFU.TANH, would miss the fp32
// tolerance). The extension is built without --use_fast_math (gpt2_fast/build_ext.py), which would
// silently turn tanhf into tanh.approx; .ci/cuda_compile_check.sh fails on MUFU.TANH in the SASS.
// The op is memory-bound, so the extra instructions (MUFU.EX2 + MUFU.RCP + FMAs) hide behind the loads.
#include <algorithm>

#include "common.h"
#include "cuda_common.cuh"
#include "ops.h"

namespace gpt2_fast {
namespace cuda {

constexpr float kGeluK0 = 0.7978845608028654f;
constexpr float kGeluK1 = 0.044715f;
constexpr int kRowsPerBlock = 8;

// ------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ X, const float* __restrict__ Bias, T* __restrict__ Y,
                                     int64_t N, int64_t C) {
  const int64_t v = blockIdx.x * 32 + threadIdx.x;  // column vector
  if (v * VEC >= C) return;
  float b[VEC];
  load_vec<float, VEC>(Bias + v * VEC, b);
  for (int64_t row = blockIdx.y * kRowsPerBlock + threadIdx.y; row < N; row += gridDim.y * kRowsPerBlock) {
    float a[VEC];
    load_vec<T, VEC>(X + row * C + v * VEC, a);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float u = a[i] + b[i];
      a[i] = 0.5f * u * (1.f + tanhf(kGeluK0 * (u + kGeluK1 * u * u * u)));
    }
    store_vec<T, VEC>(Y + row * C + v * VEC, a);
  }
}

template <typename T, int VEC>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ DY, const T* __restrict__ X,
                                     const float* __restrict__ Bias, T* __restrict__ DX,
                                     float* __restrict__ DBPart, int64_t N, int64_t C) {
  __shared__ float red[kRowsPerBlock][32 * VEC + 1];
  const int64_t v = blockIdx.x * 32 + threadIdx.x;
  const bool active = v * VEC < C;
  float db[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) db[i] = 0.f;
  if (active) {
    float b[VEC];
    load_vec<float, VEC>(Bias + v * VEC, b);
    for (int64_t row = blockIdx.y * kRowsPerBlock + threadIdx.y; row < N; row += gridDim.y * kRowsPerBlock) {
      float a[VEC], g[VEC];
      load_vec<T, VEC>(X + row * C + v * VEC, a);
      load_vec<T, VEC>(DY + row * C + v * VEC, g);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float u = a[i] + b[i];
        const float t = tanhf(kGeluK0 * (u + kGeluK1 * u * u * u));
        const float d = 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * kGeluK0 * (1.f + 3.f * kGeluK1 * u * u);
        a[i] = g[i] * d;
        db[i] += a[i];
      }
      store_vec<T, VEC>(DX + row * C + v * VEC, a);
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) red[threadIdx.y][threadIdx.x * VEC + i] = db[i];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float s = 0.f;
      for (int r = 0; r < kRowsPerBlock; ++r) s += red[r][threadIdx.x * VEC + i];
      DBPart[blockIdx.y * C + v * VEC + i] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------

static void check_gelu(const Tensor& x, const OptTensor& bias, const char* name) {
  CHECK_CUDA(x);
  CHECK_DIM(x, 2);
  CHECK_CONTIGUOUS(x);
  CHECK_FLOAT_INPUT(x);
  if (bias.has_value()) {
    CHECK_DEVICE(*bias, x.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), name, ": bias must have shape (", x.size(1),
                ",), got ", bias->sizes());
  }
}

static Tensor bias_f32(const OptTensor& bias, int64_t C, const Tensor& like) {
  if (!bias.has_value()) return at::zeros({C}, like.options().dtype(at::kFloat));
  Tensor t = bias->to(at::kFloat).contiguous();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 32 == 0 ? t : t.clone();
}

// (column-vector blocks, row blocks): enough blocks for ~8 waves of 256 threads per SM.
static dim3 gelu_grid(int64_t N, int64_t C, int vec) {
  const int64_t gx = CEIL_DIV(CEIL_DIV(C, vec), 32);
  const int64_t want = std::max<int64_t>(1, 8 * sm_count() / std::max<int64_t>(1, gx));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({CEIL_DIV(N, kRowsPerBlock), want, 65535}));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

}  // namespace cuda

Tensor bias_gelu_fwd_cuda(const Tensor& x, const OptTensor& bias) {
  cuda::check_gelu(x, bias, "bias_gelu_fwd");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  Tensor b = cuda::bias_f32(bias, C, x);
  Tensor y = empty_out({N, C}, x.options());
  if (N == 0 || C == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_fwd_cuda", [&] {
    using NT = typename cuda::native<scalar_t>::type;
    constexpr int V = 16 / sizeof(scalar_t);
    auto* X = reinterpret_cast<const NT*>(x.data_ptr<scalar_t>());
    auto* Y = reinterpret_cast<NT*>(y.data_ptr<scalar_t>());
    if (cuda::vec_width<scalar_t>(C, {X, Y}) == V)
      cuda::bias_gelu_fwd_kernel<NT, V><<<cuda::gelu_grid(N, C, V), dim3(32, cuda::kRowsPerBlock), 0, stream>>>(
          X, b.data_ptr<float>(), Y, N, C);
    else
      cuda::bias_gelu_fwd_kernel<NT, 1><<<cuda::gelu_grid(N, C, 1), dim3(32, cuda::kRowsPerBlock), 0, stream>>>(
          X, b.data_ptr<float>(), Y, N, C);
    cudaCheck(cudaGetLastError());
  });
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cuda(const Tensor& dy, const Tensor& x, const OptTensor& bias) {
  cuda::check_gelu(x, bias, "bias_gelu_bwd");
  const at::cuda::CUDAGuard guard(x.device());
  CHECK_DEVICE(dy, x.device());
  CHECK_CONTIGUOUS(dy);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "bias_gelu_bwd: dy must match x");
  const int64_t N = x.size(0), C = x.size(1);
  Tensor b = cuda::bias_f32(bias, C, x);
  Tensor dx = empty_out({N, C}, x.options());
  if (N == 0 || C == 0) return {dx, at::zeros({C}, b.options())};
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor db;
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_bwd_cuda", [&] {
    using NT = typename cuda::native<scalar_t>::type;
    constexpr int V = 16 / sizeof(scalar_t);
    auto* X = reinterpret_cast<const NT*>(x.data_ptr<scalar_t>());
    auto* DY = reinterpret_cast<const NT*>(dy.data_ptr<scalar_t>());
    auto* DX = reinterpret_cast<NT*>(dx.data_ptr<scalar_t>());
    const bool vec = cuda::vec_width<scalar_t>(C, {X, DY, DX}) == V;
    const dim3 grid = cuda::gelu_grid(N, C, vec ? V : 1);
    Tensor part = at::empty({static_cast<int64_t>(grid.y), C}, b.options());
    if (vec)
      cuda::bias_gelu_bwd_kernel<NT, V><<<grid, dim3(32, cuda::kRowsPerBlock), 0, stream>>>(
          DY, X, b.data_ptr<float>(), DX, part.data_ptr<float>(), N, C);
    else
      cuda::bias_gelu_bwd_kernel<NT, 1><<<grid, dim3(32, cuda::kRowsPerBlock), 0, stream>>>(
          DY, X, b.data_ptr<float>(), DX, part.data_ptr<float>(), N, C);
    cudaCheck(cudaGetLastError());
    db = part.sum(0);
  });
  return {dx, db};
}

}  // namespace gpt2_fast

// LayerNorm forward/backward on CUDA, with the residual add fused (add_layer_norm).
//
// Math: as csrc/cpu/layer_norm.cpp (fp32 statistics; y = (x - mean) * rstd * w + b;
// dx = (g - xhat * c1 - c2) * rstd with g = dy * w, c1 = mean(g * xhat), c2 = mean(g)).
// Layout: one block per row (forward) / per chunk of rows (backward); thread t owns the
// 16-byte vectors t, t + blockDim, ... of a row (8 bf16/fp16 or 4 fp32), so loads and stores are
// 16-byte and coalesced, and block sizes follow C (C = 768 bf16: 96 vectors, 96 threads).
// Statistics: two block reductions per row (mean, then the centred sum of squares), the
// re-reads hit L1. Residual: s = x + r is rounded to the input dtype, stored, and normalized as
// stored (matches the reference, which normalizes the stored s).
// dw/db: each backward block accumulates its rows into fp32 shared-memory partials at the
// columns its threads own (no atomics, deterministic), writes one partial row per block, and the
// launcher sums the (blocks, C) partials. Bytes: fwd 2 reads+1 write of N*C (add: 3R+2W),
// bwd 2R+1W (+1R with the residual grad).
#include <algorithm>

#include "common.h"
#include "cuda_common.cuh"
#include "ops.h"

namespace gpt2_fast {
namespace cuda {

// ------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------

template <typename T, int VEC, bool ADD>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ X, const T* __restrict__ R, T* __restrict__ S,
                                      const float* __restrict__ W, const float* __restrict__ B,
                                      T* __restrict__ Y, float* __restrict__ Mean, float* __restrict__ Rstd,
                                      int64_t C, float eps) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int64_t nvec = C / VEC;
  const T* x = X + row * C;
  const T* src = ADD ? S + row * C : x;  // what gets normalized: s (as stored) or x
  float sum = 0.f;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float a[VEC];
    load_vec<T, VEC>(x + v * VEC, a);
    if (ADD) {
      float r[VEC];
      load_vec<T, VEC>(R + row * C + v * VEC, r);
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] = to_f32(from_f32<T>(a[i] + r[i]));  // rounded, as stored
      store_vec<T, VEC>(S + row * C + v * VEC, a);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += a[i];
  }
  const float mean = block_sum(sum, red) / static_cast<float>(C);
  float sq = 0.f;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float a[VEC];
    load_vec<T, VEC>(src + v * VEC, a);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sq += (a[i] - mean) * (a[i] - mean);
  }
  const float rstd = rsqrtf(block_sum(sq, red) / static_cast<float>(C) + eps);
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float a[VEC], w[VEC], b[VEC];
    load_vec<T, VEC>(src + v * VEC, a);
    load_vec<float, VEC>(W + v * VEC, w);
    load_vec<float, VEC>(B + v * VEC, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = (a[i] - mean) * rstd * w[i] + b[i];
    store_vec<T, VEC>(Y + row * C + v * VEC, a);
  }
  if (threadIdx.x == 0) {
    Mean[row] = mean;
    Rstd[row] = rstd;
  }
}

template <typename T, int VEC, bool HAS_DRES>
__global__ void layer_norm_bwd_kernel(const T* __restrict__ DY, const T* __restrict__ X,
                                      const float* __restrict__ W, const float* __restrict__ Mean,
                                      const float* __restrict__ Rstd, const T* __restrict__ DRes,
                                      T* __restrict__ DX, float* __restrict__ DWPart, float* __restrict__ DBPart,
                                      int64_t N, int64_t C) {
  extern __shared__ float smem[];  // [C] dw partial, [C] db partial
  __shared__ float red[32];
  float* dw_s = smem;
  float* db_s = smem + C;
  const int64_t nvec = C / VEC;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x)
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw_s[v * VEC + i] = db_s[v * VEC + i] = 0.f;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float mean = Mean[row], rstd = Rstd[row];
    const T* x = X + row * C;
    const T* dy = DY + row * C;
    float c1 = 0.f, c2 = 0.f;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float a[VEC], g[VEC], w[VEC];
      load_vec<T, VEC>(x + v * VEC, a);
      load_vec<T, VEC>(dy + v * VEC, g);
      load_vec<float, VEC>(W + v * VEC, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        c1 += g[i] * w[i] * (a[i] - mean) * rstd;
        c2 += g[i] * w[i];
      }
    }
    c1 = block_sum(c1, red) / static_cast<float>(C);
    c2 = block_sum(c2, red) / static_cast<float>(C);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float a[VEC], g[VEC], w[VEC], d[VEC];
      load_vec<T, VEC>(x + v * VEC, a);
      load_vec<T, VEC>(dy + v * VEC, g);
      load_vec<float, VEC>(W + v * VEC, w);
      if (HAS_DRES) load_vec<T, VEC>(DRes + row * C + v * VEC, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat = (a[i] - mean) * rstd;
        dw_s[v * VEC + i] += g[i] * xhat;
        db_s[v * VEC + i] += g[i];
        a[i] = (g[i] * w[i] - xhat * c1 - c2) * rstd + (HAS_DRES ? d[i] : 0.f);
      }
      store_vec<T, VEC>(DX + row * C + v * VEC, a);
    }
  }
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x)  // each thread: its own columns only
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      DWPart[blockIdx.x * C + v * VEC + i] = dw_s[v * VEC + i];
      DBPart[blockIdx.x * C + v * VEC + i] = db_s[v * VEC + i];
    }
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------

static int threads_for(int64_t nvec) {
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, CEIL_DIV(nvec, 32) * 32)));
}

// weight / bias as fp32 (C,), ones / zeros when absent, 32-byte aligned for the vector loads.
static Tensor param_f32(const OptTensor& p, int64_t C, float fill, const Tensor& like) {
  if (!p.has_value()) return at::full({C}, fill, like.options().dtype(at::kFloat));
  Tensor t = p->to(at::kFloat).contiguous();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 32 == 0 ? t : t.clone();
}

static void check_rows(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const char* name) {
  CHECK_CUDA(x);
  CHECK_DIM(x, 2);
  CHECK_CONTIGUOUS(x);
  CHECK_FLOAT_INPUT(x);
  TORCH_CHECK(x.size(1) > 0, name, ": the normalized dimension must be non-empty");
  for (const OptTensor* p : {&weight, &bias})
    if (p->has_value()) {
      CHECK_DEVICE(p->value(), x.device());
      TORCH_CHECK(p->value().dim() == 1 && p->value().size(0) == x.size(1), name, ": weight/bias must have shape (",
                  x.size(1), ",), got ", p->value().sizes());
    }
}

template <typename T, int VEC>
static void launch_fwd(const Tensor& x, const Tensor* r, Tensor& s, const Tensor& w, const Tensor& b, Tensor& y,
                       Tensor& mean, Tensor& rstd, float eps) {
  const int64_t N = x.size(0), C = x.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = threads_for(C / VEC);
  using NT = typename native<T>::type;
  auto* X = reinterpret_cast<const NT*>(x.data_ptr<T>());
  auto* Y = reinterpret_cast<NT*>(y.data_ptr<T>());
  if (r != nullptr) {
    layer_norm_fwd_kernel<NT, VEC, true><<<N, threads, 0, stream>>>(
        X, reinterpret_cast<const NT*>(r->data_ptr<T>()), reinterpret_cast<NT*>(s.data_ptr<T>()),
        w.data_ptr<float>(), b.data_ptr<float>(), Y, mean.data_ptr<float>(), rstd.data_ptr<float>(), C, eps);
  } else {
    layer_norm_fwd_kernel<NT, VEC, false><<<N, threads, 0, stream>>>(
        X, nullptr, nullptr, w.data_ptr<float>(), b.data_ptr<float>(), Y, mean.data_ptr<float>(),
        rstd.data_ptr<float>(), C, eps);
  }
  cudaCheck(cudaGetLastError());
}

static std::tuple<Tensor, Tensor, Tensor, Tensor> ln_fwd(const Tensor& x, const Tensor* r, const OptTensor& weight,
                                                         const OptTensor& bias, double eps) {
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  Tensor w = param_f32(weight, C, 1.f, x), b = param_f32(bias, C, 0.f, x);
  Tensor y = empty_out({N, C}, x.options());
  Tensor s = r ? empty_out({N, C}, x.options()) : Tensor();
  Tensor mean = empty_out({N}, x.options().dtype(at::kFloat));
  Tensor rstd = empty_out({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {y, mean, rstd, s};
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    const int vec = vec_width<scalar_t>(C, {x.data_ptr(), r ? r->data_ptr() : nullptr, r ? s.data_ptr() : nullptr,
                                            y.data_ptr()});
    if (vec == 16 / static_cast<int>(sizeof(scalar_t)))
      launch_fwd<scalar_t, 16 / sizeof(scalar_t)>(x, r, s, w, b, y, mean, rstd, static_cast<float>(eps));
    else
      launch_fwd<scalar_t, 1>(x, r, s, w, b, y, mean, rstd, static_cast<float>(eps));
  });
  return {y, mean, rstd, s};
}

template <typename T, int VEC>
static void launch_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                       const OptTensor& dres, Tensor& dx, Tensor& dw_part, Tensor& db_part) {
  const int64_t N = x.size(0), C = x.size(1);
  const int blocks = static_cast<int>(dw_part.size(0));
  const int threads = threads_for(C / VEC);
  const size_t smem = 2 * C * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  using NT = typename native<T>::type;
  auto* DY = reinterpret_cast<const NT*>(dy.data_ptr<T>());
  auto* X = reinterpret_cast<const NT*>(x.data_ptr<T>());
  auto* DX = reinterpret_cast<NT*>(dx.data_ptr<T>());
  if (dres.has_value())
    layer_norm_bwd_kernel<NT, VEC, true><<<blocks, threads, smem, stream>>>(
        DY, X, w.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
        reinterpret_cast<const NT*>(dres->data_ptr<T>()), DX, dw_part.data_ptr<float>(), db_part.data_ptr<float>(), N,
        C);
  else
    layer_norm_bwd_kernel<NT, VEC, false><<<blocks, threads, smem, stream>>>(
        DY, X, w.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), nullptr, DX,
        dw_part.data_ptr<float>(), db_part.data_ptr<float>(), N, C);
  cudaCheck(cudaGetLastError());
}

}  // namespace cuda

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x, const OptTensor& weight,
                                                       const OptTensor& bias, double eps) {
  cuda::check_rows(x, weight, bias, "layer_norm_fwd");
  auto [y, mean, rstd, s] = cuda::ln_fwd(x, nullptr, weight, bias, eps);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cuda(const Tensor& x, const Tensor& residual,
                                                                   const OptTensor& weight,
                                                                   const OptTensor& bias, double eps) {
  cuda::check_rows(x, weight, bias, "add_layer_norm_fwd");
  CHECK_DEVICE(residual, x.device());
  CHECK_CONTIGUOUS(residual);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_layer_norm_fwd: residual must match x (", x.sizes(), ", ", x.scalar_type(), "), got ",
              residual.sizes(), ", ", residual.scalar_type());
  auto [y, mean, rstd, s] = cuda::ln_fwd(x, &residual, weight, bias, eps);
  return {s, y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                       const Tensor& mean, const Tensor& rstd,
                                                       const OptTensor& dresidual) {
  cuda::check_rows(x, weight, std::nullopt, "layer_norm_bwd");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(C <= 8192, "layer_norm_bwd (cuda): C must be <= 8192 (shared-memory dw/db partials), got ", C);
  CHECK_DEVICE(dy, x.device());
  CHECK_CONTIGUOUS(dy);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "layer_norm_bwd: dy must match x");
  for (const Tensor* t : {&mean, &rstd}) {
    CHECK_DEVICE(*t, x.device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "layer_norm_bwd: mean/rstd must be contiguous float32 (", N, ",)");
  }
  if (dresidual.has_value()) {
    CHECK_DEVICE(*dresidual, x.device());
    CHECK_CONTIGUOUS(*dresidual);
    TORCH_CHECK(dresidual->sizes() == x.sizes() && dresidual->scalar_type() == x.scalar_type(),
                "layer_norm_bwd: dresidual must match x");
  }
  Tensor w = cuda::param_f32(weight, C, 1.f, x);
  Tensor dx = empty_out({N, C}, x.options());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(N, 4 * cuda::sm_count()));
  Tensor dw_part = at::empty({blocks, C}, x.options().dtype(at::kFloat));
  Tensor db_part = at::empty({blocks, C}, x.options().dtype(at::kFloat));
  if (N == 0) return {dx, at::zeros({C}, w.options()), at::zeros({C}, w.options())};
  if (2 * C * sizeof(float) > 48 * 1024) {
    GPT2F_DISPATCH_FLOAT(x.scalar_type(), "layer_norm_bwd_smem", [&] {
      using NT = typename cuda::native<scalar_t>::type;
      const int smem = static_cast<int>(2 * C * sizeof(float));
      cudaCheck(cudaFuncSetAttribute(cuda::layer_norm_bwd_kernel<NT, 1, false>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      cudaCheck(cudaFuncSetAttribute(cuda::layer_norm_bwd_kernel<NT, 1, true>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      cudaCheck(cudaFuncSetAttribute(cuda::layer_norm_bwd_kernel<NT, 16 / sizeof(scalar_t), false>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      cudaCheck(cudaFuncSetAttribute(cuda::layer_norm_bwd_kernel<NT, 16 / sizeof(scalar_t), true>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    });
  }
  GPT2F_DISPATCH_FLOAT(x.scalar_type(), "layer_norm_bwd_cuda", [&] {
    const int vec = cuda::vec_width<scalar_t>(
        C, {x.data_ptr(), dy.data_ptr(), dx.data_ptr(), dresidual.has_value() ? dresidual->data_ptr() : nullptr});
    if (vec == 16 / static_cast<int>(sizeof(scalar_t)))
      cuda::launch_bwd<scalar_t, 16 / sizeof(scalar_t)>(dy, x, w, mean, rstd, dresidual, dx, dw_part, db_part);
    else
      cuda::launch_bwd<scalar_t, 1>(dy, x, w, mean, rstd, dresidual, dx, dw_part, db_part);
  });
  return {dx, dw_part.sum(0), db_part.sum(0)};
}

}  // namespace gpt2_fast

// Causal flash-attention forward and split-K decode attention over the KV cache, on CUDA.
//
// attention_fwd, bf16/fp16, D = 64 (every GPT-2 size): FlashAttention-2's forward with WMMA
// tensor cores (16x16x16, fp32 accumulate). A block = 4 warps = 64 query rows; K/V tiles of 64
// keys are staged in shared memory (16-byte loads); each warp computes its 16x64 S = Q K^T with
// WMMA, spills it to shared memory, where two lanes per row run the online softmax in fp32 (base
// 2, scale * log2 e folded in), write P (rounded to the input dtype, as flash-attn does) and
// rescale the fp32 O rows by alpha = exp2(m_old - m_new); O += P V is then WMMA on the O tile
// reloaded from shared memory. Causal blocks stop at the diagonal (half the work); masking is
// bottom-right aligned (key j visible to query i iff j <= i + Tk - Tq). Epilogue: O / l,
// lse = (m + log2 l) ln 2 (natural log, what the Triton backward takes), empty rows -> 0, -inf.
// Honest status: WMMA on sm_90 runs the legacy mma.sync path, no TMA, no wgmma, no warp
// specialisation, S/P/O round-trip through shared memory: expect well under cuDNN's ~300
// TFLOP/s on H100 (a design like this reaches roughly 100-150 TFLOP/s); beating cuDNN needs a
// wgmma + TMA kernel (FlashAttention-3 style), not attempted here. Not measured: no GPU was lent.
// Other dtypes / head dims / unaligned strides: a simple one-warp-per-query-row kernel (fp32
// math, correct, slow).
//
// decode_attention_fwd (any float dtype, D <= 256): split-K. Grid (splits, Tq, B*H); a block
// reads one chunk of the live cache window [kv_start, kv_len - Tq + i] of one query row with
// groups of G lanes per key (G = D / VEC: D = 64 bf16 -> 8 lanes, one 16-byte load each), an
// online softmax per group, the groups merged in shared memory, and (m, l, o) per split written
// to fp32 workspaces; a second kernel merges the splits. Chunks outside the window exit at
// once, so only the live part of the cache is read (bytes ~ 2 * live * D * sizeof(T) per head).
// Split count comes from shapes only (no host sync: CUDA-graph safe).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include <mma.h>

#include "common.h"
#include "cuda_common.cuh"
#include "ops.h"

namespace gpt2_fast {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

// ------------------------------------------------------------------------------------------
// kernels: flash forward (WMMA)
// ------------------------------------------------------------------------------------------

constexpr int kBM = 64, kBN = 64, kHD = 64;  // query rows, keys per tile, head dim
constexpr int kLDH = kHD + 8;                // 16-bit tiles: row pitch (elements), breaks bank conflicts
constexpr int kLDF = kBN + 4;                // fp32 tiles
constexpr int kFlashThreads = 128;
constexpr size_t kFlashSmem = 4 * kBM * kLDH * 2 + 2 * kBM * kLDF * 4;  // Q K V P (16-bit), S O (fp32)

template <typename T>
__global__ void __launch_bounds__(kFlashThreads)
flash_fwd_wmma_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, T* __restrict__ O,
                      float* __restrict__ LSE, int64_t sqb, int64_t sqh, int64_t sqt, int64_t skb, int64_t skh,
                      int64_t skt, int64_t svb, int64_t svh, int64_t svt, int64_t sob, int64_t soh, int64_t sot,
                      int H, int Tq, int Tk, float scale_log2, bool causal) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * kLDH;
  T* sV = sK + kBN * kLDH;
  T* sP = sV + kBN * kLDH;
  float* sS = reinterpret_cast<float*>(sP + kBM * kLDH);
  float* sO = sS + kBM * kLDF;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int q0 = blockIdx.x * kBM;
  Q += b * sqb + h * sqh;
  K += b * skb + h * skh;
  V += b * svb + h * svh;
  O += b * sob + h * soh;

  for (int i = tid; i < kBM * kHD / 8; i += kFlashThreads) {
    const int r = i / (kHD / 8), c = (i % (kHD / 8)) * 8;
    int4 val = make_int4(0, 0, 0, 0);
    if (q0 + r < Tq) val = *reinterpret_cast<const int4*>(Q + (q0 + r) * sqt + c);
    *reinterpret_cast<int4*>(sQ + r * kLDH + c) = val;
  }
  for (int i = tid; i < kBM * kLDF; i += kFlashThreads) sO[i] = 0.f;

  // Two lanes per query row: row my_row, columns [col0, col0 + 32) of S, P and O.
  const int my_row = warp * 16 + (lane >> 1), col0 = (lane & 1) * 32;
  const int qi = q0 + my_row;
  const int limit = causal ? qi + (Tk - Tq) : Tk - 1;  // last visible key of this row
  float m_i = kNegInf, l_i = 0.f;
  const int kend = causal ? min(Tk, q0 + kBM + (Tk - Tq)) : Tk;
  __syncthreads();

  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fk;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fv;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;

  for (int n0 = 0; n0 < kend; n0 += kBN) {
    for (int i = tid; i < kBN * kHD / 8; i += kFlashThreads) {
      const int r = i / (kHD / 8), c = (i % (kHD / 8)) * 8;
      int4 kv = make_int4(0, 0, 0, 0), vv = make_int4(0, 0, 0, 0);
      if (n0 + r < Tk) {
        kv = *reinterpret_cast<const int4*>(K + (n0 + r) * skt + c);
        vv = *reinterpret_cast<const int4*>(V + (n0 + r) * svt + c);
      }
      *reinterpret_cast<int4*>(sK + r * kLDH + c) = kv;
      *reinterpret_cast<int4*>(sV + r * kLDH + c) = vv;
    }
    __syncthreads();

    // S (16 x 64 per warp) = Q_w K^T
#pragma unroll
    for (int nn = 0; nn < kBN / 16; ++nn) {
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kHD / 16; ++kk) {
        wmma::load_matrix_sync(fa, sQ + warp * 16 * kLDH + kk * 16, kLDH);
        wmma::load_matrix_sync(fk, sK + nn * 16 * kLDH + kk * 16, kLDH);
        wmma::mma_sync(acc, fa, fk, acc);
      }
      wmma::store_matrix_sync(sS + warp * 16 * kLDF + nn * 16, acc, kLDF, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax on this lane's half row
    const float* srow = sS + my_row * kLDF + col0;
    float sv[32];
    float mx = kNegInf;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int kj = n0 + col0 + j;
      sv[j] = (kj <= limit && kj < Tk) ? srow[j] * scale_log2 : kNegInf;
      mx = fmaxf(mx, sv[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float m_use = m_new == kNegInf ? 0.f : m_new;
    const float alpha = exp2f(m_i - m_use);
    float rs = 0.f;
    T* prow = sP + my_row * kLDH + col0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float p = exp2f(sv[j] - m_use);
      rs += p;
      prow[j] = from_f32<T>(p);
    }
    rs += __shfl_xor_sync(0xffffffffu, rs, 1);
    l_i = l_i * alpha + rs;
    m_i = m_new;
    float* orow = sO + my_row * kLDF + col0;
#pragma unroll
    for (int j = 0; j < 32; ++j) orow[j] *= alpha;
    __syncwarp();

    // O_w += P_w V
#pragma unroll
    for (int dd = 0; dd < kHD / 16; ++dd) {
      wmma::load_matrix_sync(acc, sO + warp * 16 * kLDF + dd * 16, kLDF, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        wmma::load_matrix_sync(fa, sP + warp * 16 * kLDH + kk * 16, kLDH);
        wmma::load_matrix_sync(fv, sV + kk * 16 * kLDH + dd * 16, kLDH);
        wmma::mma_sync(acc, fa, fv, acc);
      }
      wmma::store_matrix_sync(sO + warp * 16 * kLDF + dd * 16, acc, kLDF, wmma::mem_row_major);
    }
    __syncthreads();
  }

  if (qi < Tq) {
    const float inv = l_i > 0.f ? 1.f / l_i : 0.f;
    const float* orow = sO + my_row * kLDF + col0;
#pragma unroll
    for (int j = 0; j < 32; j += 8) {
      Vec<T, 8> out;
#pragma unroll
      for (int e = 0; e < 8; ++e) out.v[e] = from_f32<T>(orow[j + e] * inv);
      *reinterpret_cast<Vec<T, 8>*>(O + qi * sot + col0 + j) = out;
    }
    if ((lane & 1) == 0) LSE[static_cast<int64_t>(bh) * Tq + qi] = l_i > 0.f ? (m_i + log2f(l_i)) * kLn2 : kNegInf;
  }
#endif
}

// ------------------------------------------------------------------------------------------
// kernels: generic forward (any dtype, D <= 256): one warp per query row
// ------------------------------------------------------------------------------------------

constexpr int kMaxPerLane = 8;  // D <= 32 * 8

template <typename T>
__global__ void attention_fwd_rowwise_kernel(const T* __restrict__ Q, const T* __restrict__ K,
                                             const T* __restrict__ V, T* __restrict__ O, float* __restrict__ LSE,
                                             int64_t sqb, int64_t sqh, int64_t sqt, int64_t skb, int64_t skh,
                                             int64_t skt, int64_t svb, int64_t svh, int64_t svt, int64_t sob,
                                             int64_t soh, int64_t sot, int H, int Tq, int Tk, int D,
                                             float scale_log2, bool causal) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int qi = blockIdx.x * (blockDim.x >> 5) + warp;
  if (qi >= Tq) return;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  Q += b * sqb + h * sqh + qi * sqt;
  K += b * skb + h * skh;
  V += b * svb + h * svh;
  float q[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = e * 32 + lane;
    q[e] = d < D ? to_f32(Q[d]) * scale_log2 : 0.f;
    acc[e] = 0.f;
  }
  const int last = causal ? min(Tk - 1, qi + (Tk - Tq)) : Tk - 1;
  float m = kNegInf, l = 0.f;
  for (int j = 0; j <= last; ++j) {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int d = e * 32 + lane;
      if (d < D) s += q[e] * to_f32(K[j * skt + d]);
    }
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new), p = exp2f(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int d = e * 32 + lane;
      acc[e] = acc[e] * alpha + (d < D ? p * to_f32(V[j * svt + d]) : 0.f);
    }
    m = m_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* o = O + b * sob + h * soh + qi * sot;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = e * 32 + lane;
    if (d < D) o[d] = from_f32<T>(acc[e] * inv);
  }
  if (lane == 0) LSE[static_cast<int64_t>(bh) * Tq + qi] = l > 0.f ? (m + log2f(l)) * kLn2 : kNegInf;
}

// ------------------------------------------------------------------------------------------
// kernels: split-K decode attention
// ------------------------------------------------------------------------------------------

constexpr int kDecodeThreads = 128;

// Lane gl of group g handles elements (e * G + gl) * VEC + [0, VEC) for e < E (masked to D).
template <typename T, int VEC, int G, int E>
__global__ void __launch_bounds__(kDecodeThreads)
decode_split_kernel(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                    const int64_t* __restrict__ Len, const int64_t* __restrict__ Start, float* __restrict__ PartO,
                    float* __restrict__ PartML, int64_t sqb, int64_t sqh, int64_t sqt, int64_t skb, int64_t skh,
                    int64_t skt, int64_t svb, int64_t svh, int64_t svt, int H, int Tq, int S, int D,
                    float scale_log2, int chunk) {
  extern __shared__ float dsm[];
  constexpr int NG = kDecodeThreads / G;
  float* sm_m = dsm;            // [NG]
  float* sm_l = dsm + NG;       // [NG]
  float* sm_o = dsm + 2 * NG;   // [NG][D]
  const int split = blockIdx.x, splits = gridDim.x, i = blockIdx.y, bh = blockIdx.z;
  const int b = bh / H, h = bh % H;
  const int g = threadIdx.x / G, gl = threadIdx.x % G;
  const int64_t lo = max(static_cast<int64_t>(0), Start ? Start[b] : 0);
  const int64_t hi = min(static_cast<int64_t>(S) - 1, Len[b] - Tq + i);
  const int64_t j0 = max(lo, static_cast<int64_t>(split) * chunk);
  const int64_t j1 = min(hi + 1, static_cast<int64_t>(split + 1) * chunk);
  const int64_t part = (static_cast<int64_t>(bh) * Tq + i) * splits + split;

  float m = kNegInf, l = 0.f;
  float acc[E][VEC];
  float q[E][VEC];
  const T* qp = Q + b * sqb + h * sqh + i * sqt;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d0 = (e * G + gl) * VEC;
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[e][v] = 0.f;
    if (d0 < D) {
      load_vec<T, VEC>(qp + d0, q[e]);
#pragma unroll
      for (int v = 0; v < VEC; ++v) q[e][v] *= scale_log2;
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) q[e][v] = 0.f;
    }
  }
  const T* kb = K + b * skb + h * skh;
  const T* vb = V + b * svb + h * svh;
  // The trip count is uniform over the block (groups of one warp must all reach the shuffles).
  for (int64_t jb = j0; jb < j1; jb += NG) {
    const int64_t j = jb + g;
    const bool valid = j < j1;
    float s = 0.f;
    float kv[E][VEC];
    if (valid) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int d0 = (e * G + gl) * VEC;
        if (d0 < D) {
          load_vec<T, VEC>(kb + j * skt + d0, kv[e]);
#pragma unroll
          for (int v = 0; v < VEC; ++v) s += q[e][v] * kv[e][v];
        }
      }
    }
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (!valid) continue;
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new), p = exp2f(s - m_new);
    l = l * alpha + p;
    m = m_new;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d0 = (e * G + gl) * VEC;
      if (d0 < D) {
        load_vec<T, VEC>(vb + j * svt + d0, kv[e]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[e][v] = acc[e][v] * alpha + p * kv[e][v];
      }
    }
  }
  if (gl == 0) {
    sm_m[g] = m;
    sm_l[g] = l;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d0 = (e * G + gl) * VEC;
    if (d0 < D)
#pragma unroll
      for (int v = 0; v < VEC; ++v) sm_o[g * D + d0 + v] = acc[e][v];
  }
  __syncthreads();
  float M = kNegInf;
  for (int k = 0; k < NG; ++k) M = fmaxf(M, sm_m[k]);
  for (int d = threadIdx.x; d < D; d += kDecodeThreads) {
    float o = 0.f;
    if (M != kNegInf)
      for (int k = 0; k < NG; ++k) o += sm_o[k * D + d] * exp2f(sm_m[k] - M);
    PartO[part * D + d] = o;
  }
  if (threadIdx.x == 0) {
    float L = 0.f;
    if (M != kNegInf)
      for (int k = 0; k < NG; ++k) L += sm_l[k] * exp2f(sm_m[k] - M);
    PartML[part * 2] = M;
    PartML[part * 2 + 1] = L;
  }
}

template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ PartO, const float* __restrict__ PartML,
                                      T* __restrict__ O, int64_t sob, int64_t soh, int64_t sot, int H, int Tq, int D,
                                      int splits) {
  const int i = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t base = (static_cast<int64_t>(bh) * Tq + i) * splits;
  float M = kNegInf;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, PartML[(base + s) * 2]);
  float L = 0.f;
  if (M != kNegInf)
    for (int s = 0; s < splits; ++s) L += PartML[(base + s) * 2 + 1] * exp2f(PartML[(base + s) * 2] - M);
  const float inv = L > 0.f ? 1.f / L : 0.f;
  T* o = O + b * sob + h * soh + i * sot;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    if (M != kNegInf)
      for (int s = 0; s < splits; ++s) acc += PartO[(base + s) * D + d] * exp2f(PartML[(base + s) * 2] - M);
    o[d] = from_f32<T>(acc * inv);
  }
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------

static void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const char* name) {
  for (const Tensor* t : {&q, &k, &v}) {
    CHECK_CUDA(*t);
    CHECK_DEVICE(*t, q.device());
    CHECK_FLOAT_INPUT(*t);
    CHECK_LASTDIM_CONTIGUOUS(*t);
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == q.scalar_type(), name,
                ": q, k, v must be 4-D (B, H, T, D) of one dtype, got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              name, ": q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " must agree in B, H, D");
  TORCH_CHECK(q.size(3) <= 32 * kMaxPerLane, name, ": head dim must be <= ", 32 * kMaxPerLane, ", got ", q.size(3));
  TORCH_CHECK(q.size(2) < (1LL << 31) && k.size(2) < (1LL << 31), name, ": sequence too long");
}

static bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

static Tensor bthd_out(const Tensor& q) {
  return empty_out({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

}  // namespace cuda

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                              double scale) {
  cuda::check_qkv(q, k, v, "attention_fwd");
  const at::cuda::CUDAGuard guard(q.device());
  const int B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2);
  Tensor o = cuda::bthd_out(q);
  Tensor lse = empty_out({B, H, Tq}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  auto stream = at::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale) * cuda::kLog2e;
  const bool tensor_cores = q.scalar_type() != at::kFloat && D == cuda::kHD && cuda::aligned16(q) &&
                            cuda::aligned16(k) && cuda::aligned16(v) && cuda::aligned16(o) &&
                            at::cuda::getCurrentDeviceProperties()->major >= 8;
  GPT2F_DISPATCH_FLOAT(q.scalar_type(), "attention_fwd_cuda", [&] {
    using NT = typename cuda::native<scalar_t>::type;
    auto* Q = reinterpret_cast<const NT*>(q.data_ptr<scalar_t>());
    auto* K = reinterpret_cast<const NT*>(k.data_ptr<scalar_t>());
    auto* V = reinterpret_cast<const NT*>(v.data_ptr<scalar_t>());
    auto* O = reinterpret_cast<NT*>(o.data_ptr<scalar_t>());
    if constexpr (!std::is_same<NT, float>::value) {
      if (tensor_cores) {
        auto kernel = cuda::flash_fwd_wmma_kernel<NT>;
        cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(cuda::kFlashSmem)));
        const dim3 grid(CEIL_DIV(Tq, cuda::kBM), B * H);
        kernel<<<grid, cuda::kFlashThreads, cuda::kFlashSmem, stream>>>(
            Q, K, V, O, lse.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), H, Tq, Tk,
            scale_log2, causal);
        cudaCheck(cudaGetLastError());
        return;
      }
    }
    const dim3 grid(CEIL_DIV(Tq, 4), B * H);
    cuda::attention_fwd_rowwise_kernel<NT><<<grid, 128, 0, stream>>>(
        Q, K, V, O, lse.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), H, Tq, Tk, D,
        scale_log2, causal);
    cudaCheck(cudaGetLastError());
  });
  return {o, lse};
}

Tensor decode_attention_fwd_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                 const Tensor& kv_len, const OptTensor& kv_start, double scale) {
  cuda::check_qkv(q, k_cache, v_cache, "decode_attention_fwd");
  const at::cuda::CUDAGuard guard(q.device());
  const int B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), S = k_cache.size(2);
  for (const Tensor* t : {&kv_len, kv_start.has_value() ? &kv_start.value() : &kv_len}) {
    CHECK_DEVICE(*t, q.device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && !at::isFloatingType(t->scalar_type()),
                "decode_attention_fwd: kv_len / kv_start must be integer tensors of shape (", B, ",)");
  }
  Tensor o = cuda::bthd_out(q);
  if (o.numel() == 0) return o;
  const Tensor len64 = kv_len.to(at::kLong).contiguous();
  const Tensor start64 = kv_start.has_value() ? kv_start->to(at::kLong).contiguous() : Tensor();
  // splits: enough blocks for ~2 waves, chunks of >= 64 keys; from shapes only (graph-safe)
  const int rows = B * H * Tq;
  const int want = std::max(1, CEIL_DIV(2 * cuda::sm_count(), rows));
  const int splits = std::max(1, std::min(want, CEIL_DIV(S, 64)));
  const int chunk = CEIL_DIV(S, splits);
  Tensor part_o = at::empty({static_cast<int64_t>(rows) * splits * D}, q.options().dtype(at::kFloat));
  Tensor part_ml = at::empty({static_cast<int64_t>(rows) * splits * 2}, q.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale) * cuda::kLog2e;
  const int64_t* startp = kv_start.has_value() ? start64.data_ptr<int64_t>() : nullptr;
  GPT2F_DISPATCH_FLOAT(q.scalar_type(), "decode_attention_fwd_cuda", [&] {
    using NT = typename cuda::native<scalar_t>::type;
    auto* Q = reinterpret_cast<const NT*>(q.data_ptr<scalar_t>());
    auto* K = reinterpret_cast<const NT*>(k_cache.data_ptr<scalar_t>());
    auto* V = reinterpret_cast<const NT*>(v_cache.data_ptr<scalar_t>());
    const dim3 grid(splits, Tq, B * H);
    constexpr int VEC = 16 / sizeof(scalar_t);
    const bool vec_ok = cuda::aligned16(q) && cuda::aligned16(k_cache) && cuda::aligned16(v_cache);
    auto launch = [&](auto kernel, int ng) {
      const size_t smem = static_cast<size_t>(ng) * (D + 2) * sizeof(float);
      kernel<<<grid, cuda::kDecodeThreads, smem, stream>>>(
          Q, K, V, len64.data_ptr<int64_t>(), startp, part_o.data_ptr<float>(), part_ml.data_ptr<float>(),
          q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
          v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), H, Tq, S, D, scale_log2, chunk);
    };
    if (vec_ok && D == 8 * VEC)
      launch(cuda::decode_split_kernel<NT, VEC, 8, 1>, cuda::kDecodeThreads / 8);
    else if (vec_ok && D == 16 * VEC)
      launch(cuda::decode_split_kernel<NT, VEC, 16, 1>, cuda::kDecodeThreads / 16);
    else if (vec_ok && D == 32 * VEC)
      launch(cuda::decode_split_kernel<NT, VEC, 32, 1>, cuda::kDecodeThreads / 32);
    else
      launch(cuda::decode_split_kernel<NT, 1, 32, cuda::kMaxPerLane>, cuda::kDecodeThreads / 32);
    cudaCheck(cudaGetLastError());
    const int threads = std::min(256, std::max(32, CEIL_DIV(D, 32) * 32));
    cuda::decode_combine_kernel<NT><<<dim3(Tq, B * H), threads, 0, stream>>>(
        part_o.data_ptr<float>(), part_ml.data_ptr<float>(), reinterpret_cast<NT*>(o.data_ptr<scalar_t>()),
        o.stride(0), o.stride(1), o.stride(2), H, Tq, D, splits);
    cudaCheck(cudaGetLastError());
  });
  return o;
}

}  // namespace gpt2_fast

// Small-batch GEMV on CPU for fp32, bf16 and int8 weights: y (M, N) = x (M, K) @ W^T * s + b.
//
// Used by the cpu_linear op (csrc/cpu/gemv.cpp) and the fused decode step (csrc/cpu/decode_step.cpp).
// x is fp32; W is read in place in either of two layouts, whichever the tensor has:
//   NK  (N, K) row-major, nn.Linear's own layout and the tied embedding: y[m, n] = dot(x[m], W[n]),
//       4 weight rows at a time with their fp32 accumulators in registers, reduced once at the end.
//   KN  (K, N) row-major (the transposed storage the engine's cpu_layout / quantize_int8 give):
//       y[m, :] += x[m, k] * W[k, :], 4 weight rows at a time over a tile of columns whose fp32
//       accumulators live in L1; every weight row is read as one long sequential run.
// Both read every weight byte once per call from memory (NK: rows of x in chunks of 4 re-read the
// 4 weight rows from L1; KN: 5..8 rows take two passes), convert it to fp32 in registers (int8: sign-extend + cvt; bf16: a 16-bit shift) and
// accumulate in fp32; the per-channel int8 scale and the bias are applied once per output.
#pragma once

#include <cstdint>

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace gpt2_fast {
namespace cpu {

// Instruction sets the kernels are compiled for; picked once from the CPU (__builtin_cpu_supports)
// or forced with GPT2_FAST_CPU_ISA=portable|avx2|avx512 (or an explicit argument, for tests).
enum class Isa : int { Auto = -1, Portable = 0, Avx2 = 1, Avx512 = 2 };

Isa best_isa();                 // what this CPU runs (respecting GPT2_FAST_CPU_ISA)
Isa resolve_isa(int64_t isa);   // -1 = best_isa(); else checked against the CPU
const char* isa_name(Isa isa);

struct WeightView {
  const void* data = nullptr;
  c10::ScalarType dtype = c10::kFloat;  // kFloat, kBFloat16 or kChar (int8, needs scale)
  int64_t N = 0, K = 0;
  int64_t ld = 0;          // elements between consecutive rows of the stored matrix
  bool kn = false;         // stored (K, N) row-major (else (N, K))
  const float* scale = nullptr;  // (N,) per-output scale (int8), or null
};

// y[m * ldy + n] (+)= sum_k x[m * ldx + k] W[n, k] * scale[n] + bias[n], for m < M, n < N.
// accumulate: add to y (the residual add of a projection). Parallel over output columns.
// lowp_act: on AVX-512 CPUs with VNNI / BF16 and (N, K)-stored int8 / bf16 weights, round x to int8
// (per-row scale: W8A8) / bf16 and use the dot-product instructions (gemv.cpp); else ignored.
void gemv(const float* x, int64_t M, int64_t ldx, const WeightView& w, const float* bias, float* y,
          int64_t ldy, bool accumulate, Isa isa, bool lowp_act = false);

// ---- the serial core, for callers that split the output columns over their own threads ----
// (the fused decode step: one parallel region per token, csrc/cpu/decode_step.cpp)

struct LowpRows {             // x rounded by round_rows (see gemv.cpp's lowp namespace)
  const uint8_t* q = nullptr;   // int8 mode: per row, K bytes round(max(x, 0) / xs), K of round(max(-x, 0) / xs)
  const float* xs = nullptr;    // int8 mode: per-row scale
  const uint16_t* b = nullptr;  // bf16 mode: bf16 bits, (M, K)
};

struct Gemv {                 // one y (+)= x W^T * s + b
  const float* x = nullptr;
  int64_t M = 0, ldx = 0;
  WeightView w;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  bool accumulate = false;
  Isa isa = Isa::Portable;
  const LowpRows* lowp = nullptr;  // non-null: the dot-product-instruction path (lowp_applies)
};

// Output columns come in units of gemv_unit(w) (4 rows of an (N, K) weight, 16 columns of a (K, N) one).
int64_t gemv_unit(const WeightView& w);
// Columns per chunk when a caller hands the columns out in chunks: whole units, ~64 KiB of weights
// (a few us of streaming: many chunks per thread, each a sequential run), fixed by w alone.
int64_t gemv_chunk_cols(const WeightView& w);
// whether gemv(..., lowp_act) would round x for this weight on this CPU
bool lowp_applies(const WeightView& w, Isa isa, bool lowp_act);
// x (M, K) rounded for the lowp path: int8 (q: 2 * M * K bytes, per-row scale xs) or bf16 (b: M * K)
void round_rows(const float* x, int64_t M, int64_t ldx, int64_t K, bool int8, uint8_t* q, float* xs, uint16_t* b);
// outputs [n0, n1) of g on the calling thread (n0 and n1 multiples of gemv_unit(w), or n1 == N)
void gemv_cols(const Gemv& g, int64_t n0, int64_t n1);

constexpr int64_t kGemvMaxRows = 8;  // more rows of x (prefill) go to ATen's GEMM

// The view of a (N, K) weight tensor stored (N, K) or (K, N) row-major; int8 needs scale (N,) fp32.
WeightView weight_view(const at::Tensor& weight, const std::optional<at::Tensor>& scale);

// gemv for M <= kGemvMaxRows, else at::mm on a float copy of `weight` (the tensor of w) + epilogue.
void linear(const float* x, int64_t M, int64_t ldx, const at::Tensor& weight, const WeightView& w,
            const float* bias, float* y, int64_t ldy, bool accumulate, Isa isa, bool lowp_act = false);

}  // namespace cpu
}  // namespace gpt2_fast

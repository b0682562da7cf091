// One query row of decode attention over live KV-cache slots (csrc/cpu/attend_row.cpp).
#pragma once

#include <cstdint>

namespace gpt2_fast {
namespace cpu {

// o (D) = softmax(q . K[j] / sqrt(D) for j in [j0, j1)) @ V[j0:j1], K and V (S, D) row-major, T = float
// or uint16_t (bf16 bits); p: scratch of at least j1 floats. avx512: the AVX-512 path where D == 64 (the
// caller's ISA, resolve_isa: already checked against the CPU).
template <typename T>
void attend_row(const float* q, const T* K, const T* V, int64_t j0, int64_t j1, int64_t D, float* p, float* o,
                bool avx512);

}  // namespace cpu
}  // namespace gpt2_fast

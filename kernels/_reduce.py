"""The column sums of per-program fp32 partials, for dW/dB of the persistent backward kernels.

    out_k[j] = sum_p Part_k[p, j]     for k = 0 (and 1): Part_k (P, N) fp32, out_k (N,)

The LayerNorm and bias+GELU backward kernels leave one fp32 row of dW (and dB) partials per
program. Summing them with torch took 3-4 launches (a sum per buffer, a cast per buffer); this
kernel sums both buffers and casts on store in ONE launch. Design: each program owns BLOCK_N
columns and walks the P rows in BLOCK_P slabs in a fixed order, accumulating a (BLOCK_P, BLOCK_N)
fp32 tile and reducing it over rows at the end: the order of additions depends only on (P, N)
and the constexprs, never on scheduling, so the result is bit-for-bit deterministic (no atomics).
The work is tiny (P ~ 2 x SMs rows, ~1.6 MB for LayerNorm's dw+db at N=768): narrow column blocks
(32 fp32 = 128 bytes per row) give N / 32 programs (24 at N=768, 96 at N=3072) to spread the read
over SMs; each walks P in slabs of 64 rows, so a program has 2 x 64 x 32 loads in flight.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt2_fast import poison

from ._registry import launch
from ._store import cast_for_store

BLOCK_P = 64
BLOCK_N = 32


@triton.jit
def _sum_partials_kernel(
    Part0, Out0, Part1, Out1, P, N,
    HAS_SECOND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)               # (BLOCK_N,)
    col_mask = cols < N
    acc0 = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = (start + tl.arange(0, BLOCK_P)).to(tl.int64)                   # (BLOCK_P,)
        mask = (rows < P)[:, None] & col_mask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        acc0 += tl.load(Part0 + offs, mask=mask, other=0.0)
        if HAS_SECOND:
            acc1 += tl.load(Part1 + offs, mask=mask, other=0.0)
    tl.store(Out0 + cols, cast_for_store(tl.sum(acc0, axis=0), Out0), mask=col_mask)
    if HAS_SECOND:
        tl.store(Out1 + cols, cast_for_store(tl.sum(acc1, axis=0), Out1), mask=col_mask)


def sum_partials(part0: Tensor, dtype0: torch.dtype, part1: Optional[Tensor] = None,
                 dtype1: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(part0.sum(0) as dtype0, part1.sum(0) as dtype1 or None) in one launch.

    part0, part1: (P, N) contiguous fp32 of the same shape. Call inside a triton_op launcher."""
    P, N = part0.shape
    out0 = poison.empty((N,), dtype=dtype0, device=part0.device)
    out1 = poison.empty((N,), dtype=dtype1, device=part0.device) if part1 is not None else None
    launch(_sum_partials_kernel)[(triton.cdiv(N, BLOCK_N),)](
        part0, out0, part1 if part1 is not None else part0, out1 if out1 is not None else out0, P, N,
        HAS_SECOND=part1 is not None, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return out0, out1

"""Shared memory of the flash-attention kernels per config, and the launcher that picks configs by it.

An sm_90 block may use 227 KB (232448 bytes) of shared memory. Triton keeps in shared memory the
tiles a kernel loads once (operands of the wgmma B side, q in the forward) plus `num_stages`
copies of each tile loaded in the pipelined loop, so (e = bytes per element, Dp = padded head dim)

    fwd:                 e*Dp*(BLOCK_M + 2*stages*BLOCK_N)                 (q; k, v per stage)
    fwd_pipelined:       fwd + e*Dp*BLOCK_N                                 (k loaded a block ahead)
    bwd_dkdv:            e*Dp*(2*BLOCK_N + 2*stages*BLOCK_M) + 8*stages*BLOCK_M   (k, v; q, dO, lse, delta)
    bwd_dq:              e*Dp*(2*BLOCK_M + 2*stages*BLOCK_N)                (q, dO; k, v per stage)
    bwd_atomic:          bwd_dkdv + e*max(BLOCK_M, 32)*BLOCK_N + 4*BLOCK_M*Dp   (+ dS^T for dQ = dS k,
                         + e*Dp*BLOCK_N if BLOCK_M < 64          dQ re-laid out; k again for mma.sync)

`smem_estimate` is these formulas rounded up; kernels/flash_attention_sm90.py compiles every
config for sm_90 and fails if the estimate is ever below what Triton allocates. Configs
estimated over the limit are pruned before they are compiled (autotuning), and with autotuning
off (GPT2_FAST_TRITON_AUTOTUNE=0) the first fixed config that fits is launched; D = 256 thus
launches on H100/H200 either way.
"""
import os

import triton

from ._attention_common import INTERPRET
from ._sm90 import SMEM_LIMIT  # noqa: F401  (227 KB: the pruner's limit; tests import it from here)
AUTOTUNE = not INTERPRET and os.environ.get("GPT2_FAST_TRITON_AUTOTUNE", "1") != "0"
KEY = ["T_BUCKET_Q", "T_BUCKET_K", "BLOCK_D", "IS_CAUSAL", "HAS_DROPOUT"]


def smem_estimate(family: str, BM: int, BN: int, BD: int, stages: int, esize: int) -> int:
    """Bytes of shared memory Triton allocates for this config (an upper estimate, see above)."""
    if family == "fwd":
        return esize * BD * (BM + 2 * stages * BN)
    if family == "fwd_pipelined":
        return esize * BD * (BM + (2 * stages + 1) * BN)
    if family == "bwd_dq":
        return esize * BD * (2 * BM + 2 * stages * BN)
    if family in ("bwd_dkdv", "bwd_atomic"):
        base = esize * BD * (2 * BN + 2 * stages * BM) + 8 * stages * BM
        if family == "bwd_dkdv":
            return base
        # dS^T staged for dQ = dS k, dQ's fp32 tile re-laid out for the atomics; with BLOCK_M < 64
        # the dQ dot is mma.sync and reads a second, differently swizzled copy of k
        return base + esize * max(BM, 32) * BN + 4 * BM * BD + (esize * BN * BD if BM < 64 else 0)
    raise ValueError(f"smem_estimate: unknown kernel family {family!r}")


def fits(family: str, BM: int, BN: int, BD: int, stages: int, esize: int, limit: int = SMEM_LIMIT) -> bool:
    return smem_estimate(family, BM, BN, BD, stages, esize) <= limit


# With dropout the Philox counters and keep masks of a (BLOCK_M, BLOCK_N) tile are live too: configs
# with more tile elements per thread than this spilled on sm_90 at D=64 (flash_attention_sm90.py
# --dropout), so dropout launches skip them (a register proxy, checked by compiling, not timed).
DROPOUT_TILE_PER_THREAD = {"fwd": 32, "fwd_pipelined": 32, "bwd_dkdv": 16, "bwd_dq": 32, "bwd_atomic": 16}


def dropout_ok(family: str, BM: int, BN: int, num_warps: int) -> bool:
    return BM * BN <= DROPOUT_TILE_PER_THREAD[family] * 32 * num_warps


def _config_fits(family, c: triton.Config, BD: int, esize: int) -> bool:
    return fits(family, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], BD, c.num_stages, esize)


def _dropout_ok(family, c: triton.Config) -> bool:
    return dropout_ok(family, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)


def _no_fit(family, BD, esize):
    return ValueError(f"flash attention ({family}): no config fits {SMEM_LIMIT} bytes of shared memory at "
                      f"head dim {BD} with {esize}-byte elements")


def _pruner(family: str, fixed: list, exact_fp32: triton.Config):
    """early_config_prune: exact fp32 (DOT_PREC "ieee") runs on FMA units, where big tiles do not pay
    and take ptxas a minute each: one small config; otherwise the configs that fit shared memory,
    else (large head dims in fp32) the first fixed config that does; with dropout, of those the
    ones within DROPOUT_TILE_PER_THREAD when there are any."""
    def prune(configs, named_args, **kwargs):
        if kwargs.get("DOT_PREC") == "ieee":
            return [exact_fp32]
        esize, BD = named_args["Q"].element_size(), kwargs["BLOCK_D"]
        kept = [c for c in configs if _config_fits(family, c, BD, esize)]
        kept = kept or [c for c in fixed if _config_fits(family, c, BD, esize)][:1]
        if not kept:
            raise _no_fit(family, BD, esize)
        if kwargs.get("HAS_DROPOUT"):
            kept = [c for c in kept if _dropout_ok(family, c)] or kept
        return kept
    return {"early_config_prune": prune}


class FixedConfigKernel:
    """`kernel[grid](*args, **constexprs)` with one config: the first of `fixed` that fits the shared
    memory at this launch's BLOCK_D and element size, with dropout preferably one within
    DROPOUT_TILE_PER_THREAD (exact fp32: `exact_fp32`; the interpreter: fixed[0])."""

    def __init__(self, kernel, family: str, fixed: list, exact_fp32: triton.Config):
        self.kernel, self.family, self.fixed, self.exact_fp32 = kernel, family, fixed, exact_fp32

    def pick(self, BD: int, esize: int, dot_prec: str, dropout: bool = False) -> triton.Config:
        if INTERPRET:
            return self.fixed[0]
        if dot_prec == "ieee":
            return self.exact_fp32
        ok = [c for c in self.fixed if _config_fits(self.family, c, BD, esize)]
        if not ok:
            raise _no_fit(self.family, BD, esize)
        return next((c for c in ok if not dropout or _dropout_ok(self.family, c)), ok[0])

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            c = self.pick(kwargs["BLOCK_D"], args[0].element_size(), kwargs["DOT_PREC"], kwargs["HAS_DROPOUT"])
            return self.kernel[grid](*args, **kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        return launch


def tuned_kernel(kernel, family: str, configs: list, fixed: list, interp: list, exact_fp32: triton.Config,
                 reset_to_zero=None):
    """The kernel as launched: autotuned over `configs` on CUDA (pruned by shared memory), else a
    FixedConfigKernel over `fixed` (GPT2_FAST_TRITON_AUTOTUNE=0) or `interp` (the interpreter)."""
    if not AUTOTUNE:
        return FixedConfigKernel(kernel, family, interp if INTERPRET else fixed, exact_fp32)
    return triton.autotune(configs=configs, key=KEY, prune_configs_by=_pruner(family, fixed, exact_fp32),
                           reset_to_zero=reset_to_zero)(kernel)

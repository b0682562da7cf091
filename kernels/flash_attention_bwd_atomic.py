"""Flash attention backward in one kernel: 5 tile matmuls per (query, key) block pair, dQ by fp32 atomics.

Math (FlashAttention-2, P recomputed from q, k and the forward's lse; scale = sm_scale):
    delta_i = rowsum(dO_i * O_i)                                  (_attn_bwd_atomic_preprocess_kernel,
                                                                   which also zero-fills the dQ buffer)
    one program per key block n (k_n, v_n, dk_n, dv_n stay on chip), looping over query blocks m:
        S^T = k_n q_m^T * scale                 1  (N, M)
        P^T = exp(S^T - lse_m)
        dV_n += P^T dO_m                        2
        dP^T = v_n dO_m^T                       3  (N, M)
        dS^T = P^T * (dP^T - delta_m)
        dK_n += dS^T q_m                        4
        dQ_m += dS_m k_n   (fp32 atomic add)    5  (M, D), into a (B*H, Tq, Dp) fp32 buffer
    dk = dK * scale, dq = dQ * scale          (_attn_bwd_dq_convert_kernel: fp32 -> q's dtype)

Design: the deterministic backward in flash_attention.py recomputes S and dP in a second kernel
for dQ (7 matmuls); here each product is formed once and dQ is reduced across key blocks with
`atomic_add` (relaxed, fp32): the sum order varies from run to run, so dq is not bit-reproducible
(dk, dv are). The dQ buffer (rows padded to Dp, a constexpr stride the compiler can vectorize
for) costs 4*Tq*Dp bytes per head, zero-filled by the delta pass (no extra
launch) and converted by one small kernel. Causal: query blocks straddling the diagonal run the
masked loop, those entirely below it the unmasked one; blocks above it are skipped. A key block
with a tail past Tk (non-causal) runs masked too, so padded keys get P = 0 and add nothing to dQ.
Dropout regenerates the forward's Philox keep mask from the same seed and offsets (see
flash_attention.py).

Registers on sm_90 at D = 64, bf16 (ptxas via flash_attention_sm90.py, triton 3.9 / 3.6; a proxy,
not a timing): (BLOCK_M, BLOCK_N, warps) (64, 128, 8): 231-240 / 234-239; (32, 128, 8): 192-202 /
186-188; (32, 64, 4): 194 / 164; no spills, so one 8-warp CTA per SM. Two (<= 128 registers) is
not reached: at BLOCK_N = 128 the dK, dV accumulators alone hold 64 fp32 registers a thread,
and a maxnreg=128 cap spills (228 B at (32, 128, 8), 1 KB at (64, 128, 8)). The dQ atomics are
vectorized (red.global.add.v4.f32) because the buffer's row stride is the constexpr Dp.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt2_fast import poison

from ._attention_common import (INTERPRET, _cast_like, _cast_ptr, _dot, _load_tile, block_d, device_ctx,
                                dot_precision, t_bucket, tl_configs)
from .flash_attention_smem import tuned_kernel


@triton.jit
def _attn_bwd_atomic_preprocess_kernel(O, DO, Delta, DQacc,
                                       stride_ob, stride_oh, stride_om, stride_od,
                                       stride_dob, stride_doh, stride_dom, stride_dod,
                                       H, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                       EVEN_D: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, (B*H, Tq); DQacc (B*H, Tq, BLOCK_D) fp32 set to zero."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh
                   + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   offs_m, Tq, offs_d, D, True, not EVEN_D).to(tl.float32)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh
                    + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    offs_m, Tq, offs_d, D, True, not EVEN_D).to(tl.float32)
    tl.store(Delta + pid_bh * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)
    tl.store(DQacc + (pid_bh * Tq + offs_m[:, None]) * BLOCK_D + offs_d[None, :],
             tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
             mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))


@triton.jit
def _attn_bwd_atomic_inner(dk, dv, k, v, Q, DO, LSE, Delta, DQacc,
                           stride_qm, stride_qd, stride_dom, stride_dod,
                           lo, hi, offs_n, offs_d, Tq, Tk, D, causal_off, qk_scale, rp_scale,
                           seed, drop_base, dropout_p,
                           MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                           EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PREC: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       offs_m, Tq, offs_d, D, True, not EVEN_D)                             # (M, Dp)
        do = _load_tile(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        offs_m, Tq, offs_d, D, True, not EVEN_D)                            # (M, Dp)
        # padded rows get lse = +inf, so their P is 0; so do rows that saw no key (lse = -inf)
        lse = tl.load(LSE + offs_m, mask=offs_m < Tq, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(Delta + offs_m, mask=offs_m < Tq, other=0.0)
        sT = _dot(k, tl.trans(q), DOT_PREC) * qk_scale                                     # (N, M)
        if MASKED:
            keep = offs_n[:, None] < Tk
            if IS_CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + causal_off)
            sT = tl.where(keep, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dpT = _dot(v, tl.trans(do), DOT_PREC)                                               # (N, M)
        if HAS_DROPOUT:
            rng = drop_base + offs_m[None, :].to(tl.int64) * Tk + offs_n[:, None]
            kept = tl.rand(seed, rng) >= dropout_p
            pdT = tl.where(kept, pT * rp_scale, 0.0)
            dpT = tl.where(kept, dpT * rp_scale, 0.0)
        else:
            pdT = pT
        dv += _dot(_cast_like(pdT, do, DOT_PREC), do, DOT_PREC)
        dsT = _cast_like(pT * (dpT - delta[None, :]), q, DOT_PREC)
        dk += _dot(dsT, q, DOT_PREC)
        dq = _dot(tl.trans(dsT), k, DOT_PREC)                                               # (M, Dp)
        dq_ptrs = DQacc + offs_m[:, None] * BLOCK_D + offs_d[None, :]
        if EVEN_D:
            tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < Tq, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_atomic_kernel(Q, K, V, DO, LSE, Delta, DQacc, DK, DV, Seed,
                            stride_qb, stride_qh, stride_qm, stride_qd,
                            stride_kb, stride_kh, stride_kn, stride_kd,
                            stride_vb, stride_vh, stride_vn, stride_vd,
                            stride_dob, stride_doh, stride_dom, stride_dod,
                            stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                            stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                            H, Tq, Tk, D, sm_scale, dropout_p, T_BUCKET_Q, T_BUCKET_K,
                            IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                            BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += pid_bh * Tq
    Delta += pid_bh * Tq
    DQacc += pid_bh * Tq * BLOCK_D

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, Tk, offs_d, D, True, not EVEN_D)                                # (N, Dp)
    v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, Tk, offs_d, D, True, not EVEN_D)                                # (N, Dp)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    rp_scale = 1.0
    seed = 0
    drop_base = 0
    if HAS_DROPOUT:
        rp_scale = 1.0 / (1.0 - dropout_p)
        seed = tl.load(Seed)
        drop_base = pid_bh * Tq * Tk
    causal_off = Tk - Tq
    if IS_CAUSAL:
        # first query that sees key n0: i >= n0 - causal_off; first query block whose every row
        # sees every key of this block: start >= n0 + BLOCK_N - 1 - causal_off
        lo = (tl.maximum(n0 - causal_off, 0) // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M, Tq)
        mid = tl.maximum(mid, lo)
    else:  # a key block with a tail past Tk masks its padded keys in every query block
        lo = 0
        mid = tl.where(n0 + BLOCK_N > Tk, Tq, 0)
    dk, dv = _attn_bwd_atomic_inner(
        dk, dv, k, v, Q, DO, LSE, Delta, DQacc, stride_qm, stride_qd, stride_dom, stride_dod,
        lo, mid, offs_n, offs_d, Tq, Tk, D, causal_off, qk_scale, rp_scale, seed, drop_base,
        dropout_p, True, IS_CAUSAL, HAS_DROPOUT, EVEN_D, BLOCK_M, BLOCK_D, DOT_PREC)
    dk, dv = _attn_bwd_atomic_inner(
        dk, dv, k, v, Q, DO, LSE, Delta, DQacc, stride_qm, stride_qd, stride_dom, stride_dod,
        mid, Tq, offs_n, offs_d, Tq, Tk, D, causal_off, qk_scale, rp_scale, seed, drop_base,
        dropout_p, False, IS_CAUSAL, HAS_DROPOUT, EVEN_D, BLOCK_M, BLOCK_D, DOT_PREC)

    dk = dk * sm_scale
    mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _cast_ptr(dk, DK, DOT_PREC), mask=mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             _cast_ptr(dv, DV, DOT_PREC), mask=mask)


@triton.jit
def _attn_bwd_dq_convert_kernel(DQacc, DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                                H, Tq, D, sm_scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                DOT_PREC: tl.constexpr):
    """dq = DQacc * sm_scale, fp32 (B*H, Tq, BLOCK_D) -> DQ's dtype, through DQ's strides."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    dq = tl.load(DQacc + (pid_bh * Tq + offs_m[:, None]) * BLOCK_D + offs_d[None, :], mask=mask, other=0.0)
    DQ += (pid_bh // H) * stride_dqb + (pid_bh % H) * stride_dqh
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             _cast_ptr(dq * sm_scale, DQ, DOT_PREC), mask=mask)


# ---- host side -----------------------------------------------------------------------------

# H100/H200 autotune candidates (BLOCK_M, BLOCK_N, warps, stages); registers and shared memory per
# config: kernels/flash_attention_sm90.py. Configs over 227 KB of shared memory at a head dim are
# pruned (flash_attention_smem.py). FIXED: with autotuning off, the first that fits; INTERP: the
# interpreter's (unequal blocks on purpose: the tests cross the causal stages' block boundaries).
CONFIGS = tl_configs([(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3)])
FIXED = tl_configs([(32, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)])
INTERP = tl_configs([(32, 64, 4, 1)])
EXACT_FP32_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)  # 136 regs at D=64
# the autotuner re-runs the kernel per config: DQacc is re-zeroed before each run and the final one
_attn_bwd_atomic_tuned = tuned_kernel(_attn_bwd_atomic_kernel, "bwd_atomic", CONFIGS, FIXED, INTERP,
                                      EXACT_FP32_CONFIG, reset_to_zero=["DQacc"])


def small_block_m(esize: int) -> int:
    """Rows per program of the delta / convert kernels (fp32 tiles of 64 rows spilled on sm_90)."""
    return 32 if INTERPRET or esize == 4 else 64


def attention_bwd_atomic(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                         dropout_p: float, scale: float, seed: Optional[Tensor],
                         dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Fill dq, dk, dv (any strides, the inputs' dtype) with the attention backward: three launches
    (delta + zero dQ buffer, the 5-matmul kernel, dQ convert). Shapes checked by the caller;
    lse is the forward's contiguous (B, H, Tq) fp32 natural-log log-sum-exp."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    BLOCK_D = block_d(D)
    delta = poison.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    dq_acc = poison.empty(B * H, Tq, BLOCK_D, dtype=torch.float32, device=q.device)
    prec = dot_precision(q.dtype)
    bm = small_block_m(q.element_size())
    grid_m = (triton.cdiv(Tq, bm), B * H)
    with device_ctx(q):
        _attn_bwd_atomic_preprocess_kernel[grid_m](
            o, do, delta, dq_acc, *o.stride(), *do.stride(), H, Tq, D,
            BLOCK_M=bm, BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D)
        _attn_bwd_atomic_tuned[lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dq_acc, dk, dv, seed if seed is not None else delta,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, Tq, Tk, D, float(scale), float(dropout_p), t_bucket(Tq), t_bucket(Tk),
            IS_CAUSAL=bool(causal), HAS_DROPOUT=dropout_p > 0.0, BLOCK_D=BLOCK_D,
            EVEN_D=BLOCK_D == D, DOT_PREC=prec)
        _attn_bwd_dq_convert_kernel[grid_m](
            dq_acc, dq, *dq.stride(), H, Tq, D, float(scale),
            BLOCK_M=bm, BLOCK_D=BLOCK_D, DOT_PREC=prec)

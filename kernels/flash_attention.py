"""Flash attention in Triton: causal / non-causal, forward and backward, optional dropout.

    o = softmax(q k^T * scale [+ causal mask]) v      q (B, H, Tq, D), k/v (B, H, Tk, D)

Causal is aligned bottom-right (flash-attn's convention, reference.attention_ref): query i sees
key j iff j <= i + (Tk - Tq). A query that sees no key at all (causal with Tq > Tk) gets zeros
and lse = -inf (the reference gives NaN there).

Forward (one program per (BLOCK_M queries, batch*head); online softmax, FlashAttention-2):
    for each key block j:   s = q k_j^T * scale * log2(e)            (base-2 exponent units)
                            m' = max(m, rowmax(s)); alpha = 2^(m - m'); p = 2^(s - m')
                            l = alpha l + rowsum(p); acc = alpha acc + p v_j; m = m'
    o = acc / l;  lse = (m + log2 l) * ln 2   (natural log, fp32, saved for the backward)
Key blocks run in two stages: blocks every query of the block sees entirely (no mask work),
then the few that straddle the causal diagonal or the Tk tail (masked); causal blocks past the
diagonal are never visited. Head dims are padded to BLOCK_D = next power of two (>= 16) with
masked loads, so D = 80 works; q/k/v/o are addressed through their strides, so the model's
transposed views of (B, T, H, D) are read in place, and o, dq, dk, dv are allocated in that
(B, T, H, D) memory order (returned as (B, H, T, D) views) so the caller's transpose back is free.

Backward (FlashAttention-2, no atomics; P is recomputed from q, k and the saved lse):
    delta_i = rowsum(dO_i * O_i)                                  (_attention_bwd_preprocess_kernel)
    per key block (dk, dv; loop over query blocks)                (_attention_bwd_dkdv_kernel)
        P = exp(S - lse);  dV += P^T dO;  dP = dO V^T;  dS = P * (dP - delta);  dK += dS^T Q * scale
    per query block (dq; loop over key blocks)                    (_attention_bwd_dq_kernel)
        dQ += dS K * scale
Two kernels recompute S and dP twice: 7 tile matmuls per (query, key) block pair instead of the 5
of a single kernel with atomic dq adds, in exchange for determinism and no dq zero-fill/fp32 pass.
That single kernel is the other side of the A/B choice (gpt2_fast/choices.py "attention_bwd"):
"triton_det" (above, the default), "triton_atomic" (flash_attention_bwd_atomic.py) or "sdpa"
(flash_attention_bwd_sdpa.py: torch's SDPA backward, recomputing the forward). The forward has
one too, "attention_fwd_kernel": "v1" (above) or "pipelined" (flash_attention_fwd_pipelined.py:
QK^T of the next key block in flight during this block's softmax). Both are resolved once, at
import, into FWD_KERNEL / BWD_VARIANT, which the custom ops read.

Dropout (training): keep_ij = (philox_uniform(seed, bh*Tq*Tk + i*Tk + j) >= p); the forward
normalizes l with the undropped p, accumulates only kept p, and scales o by 1/(1-p). The
backward regenerates the same keep mask from the same seed and offsets: dV uses the dropped,
rescaled P; dP is masked and rescaled the same way; delta = rowsum(dO * O) still holds because
O already contains the dropout. The seed is an int64 device tensor drawn with torch.randint, so
a CUDA-graph replay draws a fresh mask (torch's generator is graph-aware) and nothing syncs.

Layers: @triton.jit kernels -> host launchers (attention_fwd, attention_bwd) -> torch.library
custom ops "gpt2_fast_triton::attention_fwd" / "::attention_bwd" with fake (meta) functions, so
torch.compile and CUDA graphs see through them -> AttentionFunction (autograd) -> attention().
The same path runs on CPU under TRITON_INTERPRET=1. On CUDA the kernels are autotuned for
H100/H200 (BLOCK_M/BLOCK_N 64/128, 4/8 warps, 2-4 stages), configs over sm_90's 227 KB of
shared memory at the launch's head dim pruned first (flash_attention_smem.py); under the
interpreter one small config is used (autotuning there is meaningless and slow), and
GPT2_FAST_TRITON_AUTOTUNE=0 launches the first fixed config that fits the head dim (D = 256
included). Registers, spills and shared memory per config: flash_attention_sm90.py. Exact fp32 (torch's default "highest" fp32 matmul
precision) uses one small FMA-friendly config; "high"/"medium" allow TF32 tensor cores.
Interpreter caveat (triton-lang/triton#11584): the Triton interpreter multiplies bf16 dot
operands as raw uint16 bits and truncates fp32 -> bf16 casts; DOT_PREC "bf16_interp" (CPU tests
only) widens dot operands to fp32 and rounds casts to nearest, as the GPU does.
Peers read for the design: Triton tutorial 06 (fused attention) and Dao's flash-attention.
"""
# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt2_fast import poison
from gpt2_fast.choices import choice

from ._attention_common import (INTERPRET, _cast_like, _cast_ptr, _dot, _load_tile, block_d as _block_d,
                                check_attention_tensors, check_head_dim, device_ctx, dot_precision,
                                t_bucket as _bucket, tl_configs as _configs)
from . import flash_attention_fwd_pipelined as _pipe
from .flash_attention_bwd_atomic import attention_bwd_atomic
from .flash_attention_bwd_sdpa import attention_bwd_sdpa, sdpa_supports
from .flash_attention_fwd_pipelined import _attn_fwd_pipelined_kernel
from .flash_attention_smem import tuned_kernel


# =============================================================================================
# Kernels
# =============================================================================================

@triton.jit
def _attention_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                         lo, hi, offs_m, offs_d, Tk, D, causal_off, qk_scale,
                         seed, drop_base, dropout_p,
                         MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, Tk, offs_d, D, MASKED, not EVEN_D)                  # (N, Dp)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale          # (M, N) log2 units
        if MASKED:
            keep = offs_n[None, :] < Tk
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row may have seen no key yet: keep 2^(s - m) finite
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            rng = drop_base + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
            p = tl.where(tl.rand(seed, rng) >= dropout_p, p, 0.0)
        v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, Tk, offs_d, D, MASKED, not EVEN_D)                  # (N, Dp)
        acc = acc * alpha[:, None] + _dot(_cast_like(p, v, DOT_PREC), v, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, Seed,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_ob, stride_oh, stride_om, stride_od,
                          H, Tq, Tk, D, sm_scale, dropout_p, T_BUCKET_Q, T_BUCKET_K,
                          IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query blocks see the most keys: start them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, Tq, offs_d, D, True, not EVEN_D)                                # (M, Dp)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_off = Tk - Tq
    tk_full = (Tk // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # keys every row of this block sees: j <= m0 + causal_off; the last one any row sees:
        # m0 + BLOCK_M - 1 + causal_off
        full_hi = tl.maximum(tl.minimum(((m0 + causal_off + 1) // BLOCK_N) * BLOCK_N, tk_full), 0)
        hi = tl.minimum(m0 + BLOCK_M + causal_off, Tk)
    else:
        full_hi = tk_full
        hi = Tk
    seed = 0
    drop_base = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        drop_base = pid_bh * Tq * Tk
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        0, full_hi, offs_m, offs_d, Tk, D, causal_off, qk_scale, seed, drop_base, dropout_p,
        False, IS_CAUSAL, HAS_DROPOUT, EVEN_D, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        full_hi, hi, offs_m, offs_d, Tk, D, causal_off, qk_scale, seed, drop_base, dropout_p,
        True, IS_CAUSAL, HAS_DROPOUT, EVEN_D, BLOCK_N, DOT_PREC)

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        o = o * (1.0 / (1.0 - dropout_p))
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, _cast_ptr(o, O, DOT_PREC),
             mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attention_bwd_preprocess_kernel(O, DO, Delta,
                                     stride_ob, stride_oh, stride_om, stride_od,
                                     stride_dob, stride_doh, stride_dom, stride_dod,
                                     H, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                     EVEN_D: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, (B*H, Tq)."""
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


@triton.jit
def _attention_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta,
                              stride_qm, stride_qd, stride_dom, stride_dod,
                              lo, hi, offs_n, offs_d, Tq, Tk, D, causal_off, qk_scale, rp_scale,
                              seed, drop_base, dropout_p,
                              MASKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
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
        sT = _dot(k, tl.trans(q), DOT_PREC) * qk_scale             # (N, M)
        if MASKED:
            sT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dpT = _dot(v, tl.trans(do), DOT_PREC)                       # (N, M)
        if HAS_DROPOUT:
            rng = drop_base + offs_m[None, :].to(tl.int64) * Tk + offs_n[:, None]
            kept = tl.rand(seed, rng) >= dropout_p
            pdT = tl.where(kept, pT * rp_scale, 0.0)
            dpT = tl.where(kept, dpT * rp_scale, 0.0)
        else:
            pdT = pT
        dv += _dot(_cast_like(pdT, do, DOT_PREC), do, DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(_cast_like(dsT, q, DOT_PREC), q, DOT_PREC)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, Seed,
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
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_qd, stride_dom, stride_dod,
            lo, mid, offs_n, offs_d, Tq, Tk, D, causal_off, qk_scale, rp_scale, seed, drop_base,
            dropout_p, True, HAS_DROPOUT, EVEN_D, BLOCK_M, DOT_PREC)
    else:
        mid = 0
    dk, dv = _attention_bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, LSE, Delta, stride_qm, stride_qd, stride_dom, stride_dod,
        mid, Tq, offs_n, offs_d, Tq, Tk, D, causal_off, qk_scale, rp_scale, seed, drop_base,
        dropout_p, False, HAS_DROPOUT, EVEN_D, BLOCK_M, DOT_PREC)

    dk = dk * sm_scale
    mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _cast_ptr(dk, DK, DOT_PREC), mask=mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             _cast_ptr(dv, DV, DOT_PREC), mask=mask)


@triton.jit
def _attention_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                            lo, hi, offs_m, offs_d, Tk, D, causal_off, qk_scale, rp_scale,
                            seed, drop_base, dropout_p,
                            MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                            EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, Tk, offs_d, D, MASKED, not EVEN_D)                           # (N, Dp)
        v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, Tk, offs_d, D, MASKED, not EVEN_D)                           # (N, Dp)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale              # (M, N)
        if MASKED:
            keep = offs_n[None, :] < Tk
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_PREC)                        # (M, N)
        if HAS_DROPOUT:
            rng = drop_base + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
            dp = tl.where(tl.rand(seed, rng) >= dropout_p, dp * rp_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast_like(ds, k, DOT_PREC), k, DOT_PREC)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, Seed,
                             stride_qb, stride_qh, stride_qm, stride_qd,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                             H, Tq, Tk, D, sm_scale, dropout_p, T_BUCKET_Q, T_BUCKET_K,
                             IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                             BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query blocks see the most keys: start them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, Tq, offs_d, D, True, not EVEN_D)
    do = _load_tile(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    offs_m, Tq, offs_d, D, True, not EVEN_D)
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    rp_scale = 1.0
    seed = 0
    drop_base = 0
    if HAS_DROPOUT:
        rp_scale = 1.0 / (1.0 - dropout_p)
        seed = tl.load(Seed)
        drop_base = pid_bh * Tq * Tk

    causal_off = Tk - Tq
    tk_full = (Tk // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_hi = tl.maximum(tl.minimum(((m0 + causal_off + 1) // BLOCK_N) * BLOCK_N, tk_full), 0)
        hi = tl.minimum(m0 + BLOCK_M + causal_off, Tk)
    else:
        full_hi = tk_full
        hi = Tk
    dq = _attention_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn,
                                 stride_vd, 0, full_hi, offs_m, offs_d, Tk, D, causal_off, qk_scale,
                                 rp_scale, seed, drop_base, dropout_p,
                                 False, IS_CAUSAL, HAS_DROPOUT, EVEN_D, BLOCK_N, DOT_PREC)
    dq = _attention_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn,
                                 stride_vd, full_hi, hi, offs_m, offs_d, Tk, D, causal_off, qk_scale,
                                 rp_scale, seed, drop_base, dropout_p,
                                 True, IS_CAUSAL, HAS_DROPOUT, EVEN_D, BLOCK_N, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             _cast_ptr(dq, DQ, DOT_PREC), mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))


# =============================================================================================
# Host launchers
# =============================================================================================

# H100/H200 autotune candidates, (BLOCK_M, BLOCK_N, warps, stages). Forward: large query tiles;
# dK/dV: key tiles of 64/128 with query tiles of 32/64; dQ: query tiles of 64/128 with key tiles
# of 32/64. Configs over sm_90's 227 KB of shared memory at a head dim are pruned before they are
# compiled (flash_attention_smem.py); registers and smem per config: flash_attention_sm90.py.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                         (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3)])
_DKDV_CONFIGS = _configs([(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3),
                          (64, 64, 4, 4), (32, 64, 4, 4)])  # (32, 128, 4, 3) spilled 20 B at D=64
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4),
                        (64, 32, 4, 4)])  # (128, 32, 4, 3) spilled 112 B with dropout at D=64
# Autotuning off (GPT2_FAST_TRITON_AUTOTUNE=0: quick test runs, fast start-up): the first config
# that fits the head dim's shared memory (the smaller ones serve D = 256).
_FWD_FIXED = _configs([(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)])  # 8 warps: (128, 64, 4, 3) spills at D=128
_DKDV_FIXED = _configs([(32, 64, 4, 4), (32, 64, 4, 2), (32, 32, 4, 2)])  # (64, 64, 4, 3) spills at D=128
_DQ_FIXED = _configs([(64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)])
# The interpreter: one small config (autotuning there measures nothing). Unequal BLOCK_M and
# BLOCK_N on purpose, so the tests exercise the block-boundary logic of the causal stages.
_FWD_INTERP = _configs([(64, 32, 4, 1)])
_DKDV_INTERP = _configs([(32, 64, 4, 1)])
_DQ_INTERP = _configs([(64, 32, 4, 1)])
# exact fp32 (DOT_PREC "ieee") runs on FMA units, where big tiles do not pay and take ptxas a
# minute or more each: such launches get one small config only
# (sm_90, D=64: 88 / 140 / 89 registers, no spill, where the 4-warp (64, 32) / (32, 64) ones spilled
# 0.3-2 KB; all within 227 KB of shared memory up to D=256)
_FWD_EXACT = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
_DKDV_EXACT = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)
_DQ_EXACT = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)
_attention_fwd_tuned = tuned_kernel(_attention_fwd_kernel, "fwd", _FWD_CONFIGS, _FWD_FIXED, _FWD_INTERP,
                                    _FWD_EXACT)
_attention_fwd_pipelined_tuned = tuned_kernel(_attn_fwd_pipelined_kernel, "fwd_pipelined", _pipe.CONFIGS,
                                              _pipe.FIXED, _pipe.INTERP, _pipe.EXACT_FP32_CONFIG)
_attention_bwd_dkdv_tuned = tuned_kernel(_attention_bwd_dkdv_kernel, "bwd_dkdv", _DKDV_CONFIGS, _DKDV_FIXED,
                                         _DKDV_INTERP, _DKDV_EXACT)
_attention_bwd_dq_tuned = tuned_kernel(_attention_bwd_dq_kernel, "bwd_dq", _DQ_CONFIGS, _DQ_FIXED, _DQ_INTERP,
                                       _DQ_EXACT)
_PREPROCESS_BLOCK_M = 32 if INTERPRET else 64
# Resolved once, at import (choices.py: GPT2_FAST_ATTN_FWD_KERNEL, GPT2_FAST_ATTN_BWD): the custom
# ops' bodies read these module constants, never the environment, so traced code sees one choice.
FWD_KERNEL = choice("attention_fwd_kernel")
BWD_VARIANT = choice("attention_bwd")


def _bthd_empty(B: int, H: int, T: int, D: int, dtype: torch.dtype, device) -> Tensor:
    """A (B, H, T, D) view of (B, T, H, D) memory: the layout the model transposes back for free."""
    return poison.empty(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, scale: float,
                  seed: Optional[Tensor], kernel: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Launch the forward. Returns o (B, H, Tq, D) in q's dtype and lse (B, H, Tq) fp32 (natural log).
    kernel: "v1" or "pipelined"; None takes FWD_KERNEL (choices.py, resolved at import)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = _bthd_empty(B, H, Tq, D, q.dtype, q.device)
    lse = poison.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    if B * H * Tq == 0:
        return o, lse
    BLOCK_D = _block_d(D)
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)  # noqa: E731
    kernel = kernel or FWD_KERNEL
    if kernel not in ("v1", "pipelined"):
        raise ValueError(f"attention_fwd: kernel must be 'v1' or 'pipelined', got {kernel!r}")
    prec = dot_precision(q.dtype)
    # exact fp32 runs its dots on FMA units: nothing to overlap, and the rotated loop spills there
    pipelined = kernel == "pipelined" and (prec != "ieee" or INTERPRET)
    launch = _attention_fwd_pipelined_tuned if pipelined else _attention_fwd_tuned
    with device_ctx(q):
        launch[grid](
            q, k, v, o, lse, seed if seed is not None else lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, Tq, Tk, D, float(scale), float(dropout_p), _bucket(Tq), _bucket(Tk),
            IS_CAUSAL=bool(causal), HAS_DROPOUT=dropout_p > 0.0, BLOCK_D=BLOCK_D,
            EVEN_D=BLOCK_D == D, DOT_PREC=prec)
    return o, lse


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                  dropout_p: float, scale: float, seed: Optional[Tensor],
                  variant: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward. Returns dq, dk, dv in the inputs' dtype.

    variant: "triton_det" (preprocess, dK/dV, dQ kernels: deterministic), "triton_atomic" (one
    5-matmul kernel, dQ by fp32 atomics: flash_attention_bwd_atomic.py) or "sdpa" (torch SDPA's
    backward, recomputing the forward; dropout and causal Tq > Tk fall back to "triton_det");
    None takes BWD_VARIANT (choices.py, resolved at import).
    lse: the forward's (B, H, Tq) fp32 natural-log log-sum-exp (-inf for a query with no key);
    the compiled extension's forward (gpt2_fast/extension.py) reuses this backward with its own."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if lse.dtype != torch.float32 or tuple(lse.shape) != (B, H, Tq):
        raise ValueError(f"attention_bwd: lse must be float32 of shape (B, H, Tq) = ({B}, {H}, {Tq}), "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    if tuple(do.shape) != (B, H, Tq, D) or tuple(o.shape) != (B, H, Tq, D):
        raise ValueError(f"attention_bwd: do and o must have q's shape {tuple(q.shape)}, got "
                         f"{tuple(do.shape)} and {tuple(o.shape)}")
    lse = lse.contiguous()  # the kernels index it as (B*H, Tq)
    dq = _bthd_empty(B, H, Tq, D, q.dtype, q.device)
    dk = _bthd_empty(B, H, Tk, D, k.dtype, k.device)
    dv = _bthd_empty(B, H, Tk, D, v.dtype, v.device)
    if B * H == 0 or Tk == 0 or Tq == 0:  # nothing to launch: every gradient is an empty or zero sum
        return dq.zero_(), dk.zero_(), dv.zero_()
    variant = variant or BWD_VARIANT
    if variant not in ("triton_det", "triton_atomic", "sdpa"):
        raise ValueError(f"attention_bwd: variant must be 'triton_det', 'triton_atomic' or 'sdpa', got {variant!r}")
    if variant == "sdpa" and sdpa_supports(causal, dropout_p, Tq, Tk):
        attention_bwd_sdpa(do, q, k, v, causal, scale, dq, dk, dv)
    elif variant == "triton_atomic":
        attention_bwd_atomic(do, q, k, v, o, lse, causal, dropout_p, scale, seed, dq, dk, dv)
    else:
        _attention_bwd_det(do, q, k, v, o, lse, causal, dropout_p, scale, seed, dq, dk, dv)
    return dq, dk, dv


def _attention_bwd_det(do, q, k, v, o, lse, causal, dropout_p, scale, seed, dq, dk, dv) -> None:
    """The deterministic backward: delta, then dK/dV per key block, then dQ per query block."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    BLOCK_D = _block_d(D)
    delta = poison.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    seed_arg = seed if seed is not None else delta
    common = dict(IS_CAUSAL=bool(causal), HAS_DROPOUT=dropout_p > 0.0, BLOCK_D=BLOCK_D,
                  EVEN_D=BLOCK_D == D, DOT_PREC=dot_precision(q.dtype))
    with device_ctx(q):
        _attention_bwd_preprocess_kernel[(triton.cdiv(Tq, _PREPROCESS_BLOCK_M), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, Tq, D,
            BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D)
        _attention_bwd_dkdv_tuned[lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, seed_arg,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, Tq, Tk, D, float(scale), float(dropout_p), _bucket(Tq), _bucket(Tk), **common)
        _attention_bwd_dq_tuned[lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, seed_arg,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, Tq, Tk, D, float(scale), float(dropout_p), _bucket(Tq), _bucket(Tk), **common)


# =============================================================================================
# torch.library registration (custom ops + fake shapes), autograd, public function
# =============================================================================================

@torch.library.custom_op("gpt2_fast_triton::attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, bool causal, float dropout_p, "
                                "float scale, Tensor? seed) -> (Tensor, Tensor)")
def _attention_fwd_op(q, k, v, causal, dropout_p, scale, seed):
    return attention_fwd(q, k, v, causal, dropout_p, scale, seed)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, causal, dropout_p, scale, seed):
    B, H, Tq, D = q.shape
    o = q.new_empty((B, Tq, H, D)).transpose(1, 2)
    return o, q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("gpt2_fast_triton::attention_bwd", mutates_args=(),
                         schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
                                "bool causal, float dropout_p, float scale, Tensor? seed) "
                                "-> (Tensor, Tensor, Tensor)")
def _attention_bwd_op(do, q, k, v, o, lse, causal, dropout_p, scale, seed):
    return attention_bwd(do, q, k, v, o, lse, causal, dropout_p, scale, seed)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, causal, dropout_p, scale, seed):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    return (q.new_empty((B, Tq, H, D)).transpose(1, 2), k.new_empty((B, Tk, H, D)).transpose(1, 2),
            v.new_empty((B, Tk, H, D)).transpose(1, 2))


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, scale, seed):
        o, lse = torch.ops.gpt2_fast_triton.attention_fwd(q, k, v, causal, dropout_p, scale, seed)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = torch.ops.gpt2_fast_triton.attention_bwd(
            do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, ctx.scale, seed)
        return dq, dk, dv, None, None, None, None


def _check_inputs(q, k, v, dropout_p) -> None:
    check_attention_tensors("attention", (("q", q), ("k", k), ("v", v)), " (B, H, T, D)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and INTERPRET):
        raise ValueError(f"attention (triton): expected CUDA tensors, or CPU tensors under "
                         f"TRITON_INTERPRET=1, got {q.device}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"attention: expected k and v of shape (B, H, Tk, D) = ({B}, {H}, Tk, {D}) "
                         f"for q {tuple(q.shape)}, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    check_head_dim("attention", D)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
              scale: Optional[float] = None) -> Tensor:
    """Flash attention: softmax(q k^T * scale [+ causal mask]) v, differentiable in q, k, v.

    q (B, H, Tq, D), k and v (B, H, Tk, D), any strides; fp16, bf16 or fp32; D <= 256 (tested
    32..128). causal aligns bottom-right (query i sees key j <= i + Tk - Tq). scale defaults to
    1/sqrt(D). dropout_p > 0 drops attention probabilities with a fresh Philox seed per call.
    Returns (B, H, Tq, D) in q's dtype, a view of (B, Tq, H, D) memory.
    """
    _check_inputs(q, k, v, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2 ** 62, (1,), device=q.device, dtype=torch.int64)
    return AttentionFunction.apply(q, k, v, bool(causal), dropout_p, scale, seed)

"""Flash-decoding in Triton: a few new queries against a static KV cache, split over its length.

    q (B, H, Tq, D); k_cache, v_cache (B, H, S, D); kv_len (B,) int; kv_start (B,) int or None.
    Query i of row b sees cache slot j iff kv_start[b] <= j <= kv_len[b] - Tq + i
    (reference.decode_attention_ref); a query that sees no slot gets zeros.

Why split: at decode (Tq = 1, batch 1) one program per (b, h) gives GPT-2 small 12 programs on a
132-SM H100: the step would read the cache at a tenth of the memory bandwidth. Flash-decoding
(Dao et al. 2023) splits the key range over `num_splits` programs per (b, h, query block):

  split kernel   (grid: query blocks x B*H x num_splits)
      live range [kv_start, min(kv_len, S)) is cut into num_splits chunks of whole BLOCK_N blocks;
      each program runs the online softmax over its chunk only (m, l, acc as in flash attention)
      and writes its partial output o_s = acc / l (fp32) and lse_s = m + log2 l (base 2; -inf
      when its chunk is empty or all masked, in which case o_s is not written at all).
  reduce kernel  (grid: B*H*Tq)
      lse = max_s lse_s;  w_s = 2^(lse_s - lse);  o = sum_s w_s o_s / sum_s w_s   (0 if no key).
With num_splits = 1 (enough programs already, e.g. a long prefill) the split kernel writes the
normalized output itself and no reduce runs.

CUDA-graph safety: the host never reads kv_len or kv_start. num_splits comes from static shapes
(B, H, Tq, S and the SM count): enough programs for two waves on the GPU, at most one per BLOCK_N
keys of the cache. The chunk boundaries are computed in the kernel from the live length, so
only [kv_start, kv_len) is read and programs past it exit at once writing lse = -inf. One graph
therefore serves every decode step.

Any Tq works (1 for decode, a few for speculative verification, the whole prompt for a cached
prefill): queries go in blocks of BLOCK_M = max(16, next_pow2(Tq)) up to 64 (tl.dot needs 16
rows), with a per-query causal mask; a query block skips keys past its last query's horizon.
q may differ in dtype from the cache (it is cast to the cache dtype); o has q's dtype and is a
(B, H, Tq, D) view of (B, Tq, H, D) memory, the layout the model transposes back for free.

Layers: @triton.jit kernels -> host launcher decode_attention_fwd -> torch.library custom op
"gpt2_fast_triton::decode_attention" with a fake (meta) function -> decode_attention(). It has
no backward: decoding is inference only (training uses kernels/flash_attention.py).
bf16 under the Triton interpreter: see the caveat in kernels/flash_attention.py (DOT_PREC).
"""
# No `from __future__ import annotations`: torch.library reads these annotations at runtime.
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt2_fast import poison

from ._attention_common import (INTERPRET, _cast_like, _cast_ptr, _dot, check_attention_tensors, check_head_dim,
                                device_ctx, dot_precision)


# =============================================================================================
# Kernels
# =============================================================================================

@triton.jit
def _decode_attention_fwd_kernel(Q, K, V, KvLen, KvStart, O, OPart, LsePart,
                                 stride_qb, stride_qh, stride_qm, stride_qd,
                                 stride_kb, stride_kh, stride_kn, stride_kd,
                                 stride_vb, stride_vh, stride_vn, stride_vd,
                                 stride_ob, stride_oh, stride_om, stride_od,
                                 stride_len, stride_start,
                                 H, Tq, S, D, sm_scale, num_splits,
                                 HAS_START: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    off_b = pid_bh // H
    off_h = pid_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh

    # The live range and this program's chunk of it, from device-side lengths only.
    kv_len = tl.load(KvLen + off_b * stride_len).to(tl.int32)
    kv_start = 0
    if HAS_START:
        kv_start = tl.maximum(tl.load(KvStart + off_b * stride_start).to(tl.int32), 0)
    end = tl.minimum(kv_len, S)
    live = tl.maximum(end - kv_start, 0)
    chunk = tl.cdiv(tl.cdiv(live, num_splits), BLOCK_N) * BLOCK_N
    lo = kv_start + pid_s * chunk
    m0 = pid_m * BLOCK_M
    horizon = kv_len - Tq                          # query i sees slots j <= horizon + i
    hi = tl.minimum(tl.minimum(lo + chunk, end), horizon + tl.minimum(m0 + BLOCK_M, Tq))

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=offs_m[:, None] < Tq, other=0.0)
    else:
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
    q = _cast_ptr(q, K, DOT_PREC)                                                      # (M, Dp)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):          # no iterations when the chunk is empty
        offs_n = start_n + offs_n0
        if EVEN_D:
            kv_mask = offs_n[:, None] < hi
        else:
            kv_mask = (offs_n[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)                                          # (N, Dp)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale              # (M, N)
        keep = (offs_n[None, :] < hi) & (offs_n[None, :] <= horizon + offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)                                          # (N, Dp)
        acc = acc * alpha[:, None] + _dot(_cast_like(p, v, DOT_PREC), v, DOT_PREC)
        m_i = m_new

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(O + off_b * stride_ob + off_h * stride_oh
                 + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 _cast_ptr(o, O, DOT_PREC), mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))
    else:
        row = (pid_bh * num_splits + pid_s) * Tq + offs_m                             # (M,)
        tl.store(OPart + row[:, None] * D + offs_d[None, :], o,
                 mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D) & seen[:, None])
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(LsePart + row, lse, mask=offs_m < Tq)


@triton.jit
def _decode_attention_reduce_kernel(OPart, LsePart, O,
                                    stride_ob, stride_oh, stride_om, stride_od,
                                    H, Tq, D, num_splits,
                                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per (b, h, query): combine the splits' partial outputs by their lse."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // Tq
    m = pid % Tq
    off_b = bh // H
    off_h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row = (bh * num_splits + offs_s) * Tq + m                                         # (S,)
    lse = tl.load(LsePart + row, mask=offs_s < num_splits, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(lse - mx)                                                        # 0 where -inf
    valid = lse > float("-inf")
    part = tl.load(OPart + row[:, None] * D + offs_d[None, :],
                   mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)            # (S, Dp)
    den = tl.sum(w, 0)
    o = tl.sum(w[:, None] * part, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + m * stride_om + offs_d * stride_od,
             _cast_ptr(o, O, DOT_PREC), mask=offs_d < D)


# =============================================================================================
# Host launcher
# =============================================================================================

MAX_SPLITS = 64
BLOCK_N = 16 if INTERPRET else 64      # interpreter: small blocks so chunks span several of them
MAX_BLOCK_M = 64


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_m(Tq: int) -> int:
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(max(Tq, 1))))


def choose_num_splits(B: int, H: int, Tq: int, S: int, device: torch.device) -> int:
    """Splits per (b, h, query block) from static shapes only: ~2 waves of programs, at most
    one split per BLOCK_N cache slots and MAX_SPLITS in all."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = 4  # the interpreter: still split a little, so CPU tests cover the reduce
    programs = B * H * triton.cdiv(max(Tq, 1), _block_m(Tq))
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(max(S, 1), BLOCK_N), MAX_SPLITS))


def decode_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                         kv_start: Optional[Tensor], scale: float,
                         num_splits: Optional[int] = None) -> Tensor:
    """Launch the split kernel (and the reduce when num_splits > 1). Returns o (B, H, Tq, D)."""
    B, H, Tq, D = q.shape
    S = k_cache.shape[2]
    o = poison.empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    if B * H * Tq == 0:
        return o
    if num_splits is None:
        num_splits = choose_num_splits(B, H, Tq, S, q.device)
    BLOCK_M = _block_m(Tq)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    single = num_splits == 1
    if single:
        o_part = lse_part = o  # unused
    else:
        o_part = poison.empty(B * H, num_splits, Tq, D, dtype=torch.float32, device=q.device)
        lse_part = poison.empty(B * H, num_splits, Tq, dtype=torch.float32, device=q.device)
    has_start = kv_start is not None
    start = kv_start if has_start else kv_len
    dot_prec = dot_precision(k_cache.dtype)
    with device_ctx(q):
        _decode_attention_fwd_kernel[(triton.cdiv(Tq, BLOCK_M), B * H, num_splits)](
            q, k_cache, v_cache, kv_len, start, o, o_part, lse_part,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *o.stride(),
            kv_len.stride(0), start.stride(0),
            H, Tq, S, D, float(scale), num_splits,
            HAS_START=has_start, SINGLE_SPLIT=single, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D, DOT_PREC=dot_prec, num_warps=4, num_stages=3)
        if not single:
            _decode_attention_reduce_kernel[(B * H * Tq,)](
                o_part, lse_part, o, *o.stride(), H, Tq, D, num_splits,
                BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D, DOT_PREC=dot_prec,
                num_warps=1 if D <= 64 else 2)
    return o


# =============================================================================================
# torch.library registration (custom op + fake shape) and the public function
# =============================================================================================

@torch.library.custom_op("gpt2_fast_triton::decode_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_len, "
                                "Tensor? kv_start, float scale) -> Tensor")
def _decode_attention_op(q, k_cache, v_cache, kv_len, kv_start, scale):
    return decode_attention_fwd(q, k_cache, v_cache, kv_len, kv_start, scale)


@_decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, kv_len, kv_start, scale):
    B, H, Tq, D = q.shape
    return q.new_empty((B, Tq, H, D)).transpose(1, 2)


_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_inputs(q, k_cache, v_cache, kv_len, kv_start) -> None:
    check_attention_tensors("decode_attention", (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)))
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"decode_attention: k_cache and v_cache must share a dtype, got "
                        f"{k_cache.dtype} and {v_cache.dtype}")
    B, H, Tq, D = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (B, H) or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: expected k_cache and v_cache of shape (B, H, S, D) = "
                         f"({B}, {H}, S, {D}) for q {tuple(q.shape)}, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    check_head_dim("decode_attention", D)
    for name, t in (("kv_len", kv_len), ("kv_start", kv_start)):
        if t is None and name == "kv_start":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"decode_attention: {name} must be a (B,) int tensor, got {type(t).__name__}")
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"decode_attention: {name} must be int32 or int64, got {t.dtype}")
        if t.shape != (B,):
            raise ValueError(f"decode_attention: {name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, kv_len, kv_start) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"decode_attention: all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and INTERPRET):
        raise ValueError(f"decode_attention (triton): expected CUDA tensors, or CPU tensors under "
                         f"TRITON_INTERPRET=1, got {q.device}")


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                     kv_start: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Flash-decoding attention of Tq new queries against a static KV cache (no autograd).

    q (B, H, Tq, D); k_cache, v_cache (B, H, S, D) any strides; kv_len (B,) int32/int64: slots
    [0, kv_len) are written and the queries sit at kv_len - Tq .. kv_len - 1; kv_start (B,) or
    None: left padding. Query i of row b sees kv_start[b] <= j <= kv_len[b] - Tq + i; zeros if
    none. Never reads kv_len on the host (CUDA-graph safe). Returns (B, H, Tq, D) in q's dtype.
    """
    _check_inputs(q, k_cache, v_cache, kv_len, kv_start)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.gpt2_fast_triton.decode_attention(q, k_cache, v_cache, kv_len, kv_start, scale)

"""The decode step's kernels (Triton): the batch-1..64 GEMV family with its prologues and
epilogues fused, the embedding gather and a one-launch decode attention.

One decode token of a pre-LN GPT-2 block is five launches here (gpt2_fast/decode_fused.py):

  _qkv_gemv_kernel    qkv = LN_1(x) @ W_attn^T + b; q -> Q, k and v -> the cache slot `pos`
  _attn_decode_kernel y   = softmax(q K^T / sqrt(D)) V over the live slots [kv_start, pos]
  _gemv_kernel        x  += y @ W_proj^T + b                  (RESIDUAL epilogue, in place)
  _gemv_kernel        h   = gelu(LN_2(x) @ W_fc^T + b)        (LN prologue, GELU epilogue)
  _gemv_kernel        x  += h @ W_mlp^T + b                   (RESIDUAL epilogue, in place)

and the token has three more: _embed_kernel (x = wte[seq[pos]] + wpe[pos - kv_start]),
_gemv_kernel for the LM head with ln_f in its prologue, and the sampler (kernels/sampler.py).

GEMV design: M (the batch bucket, 1..64) is small, so each program owns BLOCK_N output columns
for BLOCK_M rows and streams its (BLOCK_N, K) slice of W once, in BLOCK_K chunks along the
contiguous K axis (16-byte loads for 16-bit weights at BLOCK_K >= 8 per thread); the product is a
broadcast multiply + row sum in fp32 registers (no tl.dot: it needs 16 rows, and at M = 1 it
would waste 15/16 of the tensor core). A LayerNorm prologue costs each program one extra pass over
its BLOCK_M rows of x (C values, from L2: free next to the weight slice) for mean and rstd
(fp32, two-pass: mean, then mean((x - mean)^2)), and normalizes x chunk by chunk in the loop.
int8 weights (gpt2_fast/quant.py: W = W_q * s per output channel) use the same kernels with
HAS_SCALE: W_q is widened in registers and s is applied once to the accumulator.

Rounding follows the unfused step, so its tokens come out the same: the LN output, the matmul
output and each epilogue result are rounded to the activation dtype where the unfused step
stores a tensor (on the interpreter, bf16 rounds to nearest by hand: see _attention_common).

Attention: grid (B*H, NUM_SPLITS). The chunk of each split comes from the device-side live
length, so no host read. When the live range fits one chunk (short context, or NUM_SPLITS = 1)
split 0 writes the output and the others exit. Otherwise every split writes its partial (o, lse)
and bumps a per-(b, h) arrival counter; the last to arrive combines the partials
(o = sum_s 2^(lse_s - lse) o_s / sum_s 2^(lse_s - lse)) and resets the counter to 0, so one
launch does what flash-decoding does in two, and a CUDA graph replays it as is.
"""
import triton
import triton.language as tl

from ._attention_common import _round_bf16_interp


@triton.jit
def _to(x, P, BF16_INTERP: tl.constexpr):
    """fp32 x -> P's element type, rounded to nearest (also under the interpreter)."""
    if BF16_INTERP:
        x = _round_bf16_interp(x)
    return x.to(P.dtype.element_ty)


@triton.jit
def _round(x, P, BF16_INTERP: tl.constexpr):
    """fp32 x rounded to P's element type, kept as fp32 (what storing it would keep)."""
    return _to(x, P, BF16_INTERP).to(tl.float32)


@triton.jit
def _row_stats(X, stride_xm, offs_m, mask_m, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """mean and rstd (fp32) of BLOCK_M rows of X (K wide), two passes."""
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        total += tl.sum(x, axis=1)
    mean = total / K
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean[:, None], 0.0)
        sq += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)
    return mean, rstd


@triton.jit
def _gemv_acc(X, stride_xm, W, stride_wn, stride_wk, LnW, LnB, offs_m, mask_m, offs_n, mask_n, K, eps,
              LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr, BF16_INTERP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[m, n] = sum_k xin[m, k] W[n, k] in fp32, xin = LN(x) (rounded to x's dtype) or x."""
    if LN:
        mean, rstd = _row_stats(X, stride_xm, offs_m, mask_m, K, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    for k0 in tl.range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)   # (M, K)
        if LN:
            lw = tl.load(LnW + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = (x - mean[:, None]) * rstd[:, None] * lw[None, :]
            if HAS_LN_BIAS:
                x += tl.load(LnB + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            x = tl.where(mask_k[None, :], _round(x, X, BF16_INTERP), 0.0)
        w = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=mask_n[:, None] & mask_k[None, :],
                    other=0).to(tl.float32)                                              # (N, K)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _bias_scale(acc, S, Bias, offs_n, mask_n, P, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                GELU: tl.constexpr, BF16_INTERP: tl.constexpr):
    """The Linear's output as the unfused step rounds it. Float W: round(acc + b) (addmm);
    int8 W (quant.Int8Linear): round(round(round(acc) * round(s)) + b). Before a GELU the matmul
    is rounded without its bias and the bias is added in fp32 (ops.bias_gelu), unrounded."""
    if HAS_SCALE:
        s = _round(tl.load(S + offs_n, mask=mask_n, other=0.0), P, BF16_INTERP)
        acc = _round(_round(acc, P, BF16_INTERP) * s[None, :], P, BF16_INTERP)
    if GELU:
        acc = _round(acc, P, BF16_INTERP)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if not GELU:
        acc = _round(acc, P, BF16_INTERP)
    return acc


@triton.jit
def _gemv_kernel(X, W, S, Bias, LnW, LnB, Y, M, N, K, stride_xm, stride_wn, stride_wk, stride_ym, eps,
                 LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
                 BF16_INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Y = act(LN?(X) @ W^T (* S) + Bias), or with RESIDUAL: Y += X @ W^T (* S) + Bias in place.
    GELU: tanh GELU as sigmoid(2z) (kernels/bias_gelu.py)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    acc = _gemv_acc(X, stride_xm, W, stride_wn, stride_wk, LnW, LnB, offs_m, mask_m, offs_n, mask_n, K,
                    eps, LN, HAS_LN_BIAS, BF16_INTERP, BLOCK_M, BLOCK_N, BLOCK_K)
    y = _bias_scale(acc, S, Bias, offs_n, mask_n, Y, HAS_SCALE, HAS_BIAS, GELU, BF16_INTERP)
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if GELU:
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * z)
    if RESIDUAL:
        y += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, _to(y, Y, BF16_INTERP), mask=mask)


@triton.jit
def _qkv_gemv_kernel(X, W, S, Bias, LnW, LnB, Q, KCache, VCache, Pos, M, K, C, D,
                     stride_xm, stride_wn, stride_wk, stride_qm,
                     stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, eps,
                     HAS_LN_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BF16_INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """[q | k | v] = LN_1(X) @ W_attn^T + b (N = 3C): q -> Q (M, C); k, v -> the caches'
    slot Pos[0] at (row m, head n // D, dim n % D)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    N = 3 * C
    mask_n, mask_m = offs_n < N, offs_m < M
    acc = _gemv_acc(X, stride_xm, W, stride_wn, stride_wk, LnW, LnB, offs_m, mask_m, offs_n, mask_n, K,
                    eps, True, HAS_LN_BIAS, BF16_INTERP, BLOCK_M, BLOCK_N, BLOCK_K)
    y = _bias_scale(acc, S, Bias, offs_n, mask_n, Q, HAS_SCALE, HAS_BIAS, False, BF16_INTERP)
    pos = tl.load(Pos).to(tl.int64)
    part = offs_n // C                        # 0: q, 1: k, 2: v
    col = offs_n % C
    head, d = col // D, col % D
    m64 = offs_m[:, None].to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(Q + m64 * stride_qm + col[None, :], _to(y, Q, BF16_INTERP),
             mask=mask & (part[None, :] == 0))
    k_ptrs = KCache + m64 * stride_kb + head[None, :] * stride_kh + pos * stride_ks + d[None, :]
    tl.store(k_ptrs, _to(y, KCache, BF16_INTERP), mask=mask & (part[None, :] == 1))
    v_ptrs = VCache + m64 * stride_vb + head[None, :] * stride_vh + pos * stride_vs + d[None, :]
    tl.store(v_ptrs, _to(y, VCache, BF16_INTERP), mask=mask & (part[None, :] == 2))


@triton.jit
def _embed_kernel(Seq, Pos, KvStart, Wte, Wpe, X, C, n_tok, stride_seq, stride_te, stride_pe, stride_xm,
                  BF16_INTERP: tl.constexpr, BLOCK_C: tl.constexpr):
    """X[b] = wte[seq[b, pos]] + wpe[max(pos - kv_start[b], 0)] (one program per row b). A token
    id past wte (a finished spare row's EOT in a model with a small vocabulary) reads the last row
    instead of out of bounds."""
    b = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos).to(tl.int64)
    tok = tl.minimum(tl.maximum(tl.load(Seq + b * stride_seq + pos).to(tl.int64), 0), n_tok - 1)
    p = tl.maximum(pos - tl.load(KvStart + b).to(tl.int64), 0)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        x = tl.load(Wte + tok * stride_te + offs, mask=mask, other=0.0).to(tl.float32) + \
            tl.load(Wpe + p * stride_pe + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + b * stride_xm + offs, _to(x, X, BF16_INTERP), mask=mask)


@triton.jit
def _attn_chunk(Qb, Kb, Vb, lo, hi, stride_ks, stride_vs, offs_d, mask_d, qk_scale,
                BF16_INTERP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of one query over key slots [lo, hi): acc (D,), m, l (base-2 logits).
    p is rounded to the cache dtype before p @ V, as the unfused kernel's tl.dot does."""
    q = tl.load(Qb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        live = offs_n < hi
        kv_mask = live[:, None] & mask_d[None, :]
        rows = offs_n[:, None].to(tl.int64)
        k = tl.load(Kb + rows * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(live, tl.sum(q[None, :] * k, axis=1) * qk_scale, float("-inf"))     # (N,)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(Vb + rows * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(_round(p, Vb, BF16_INTERP)[:, None] * v, axis=0)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_combine(Y, OPart, LsePart, row0, used, offs_d, mask_d, BF16_INTERP: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse), over the splits [0, used).
    Volatile loads: the partials were written by other programs (L1 is not coherent)."""
    offs_s = tl.arange(0, BLOCK_S)
    rows = row0 + offs_s
    lse = tl.load(LsePart + rows, mask=offs_s < used, other=float("-inf"), volatile=True)
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(lse - mx)
    valid = lse > float("-inf")
    part = tl.load(OPart + rows[:, None] * BLOCK_D + offs_d[None, :],
                   mask=valid[:, None] & mask_d[None, :], other=0.0, volatile=True)
    den = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * part, axis=0) / tl.where(den > 0.0, den, 1.0)
    tl.store(Y + offs_d, _to(o, Y, BF16_INTERP), mask=mask_d)


@triton.jit
def _attn_decode_kernel(Q, KCache, VCache, Pos, KvStart, Y, OPart, LsePart, Count,
                        stride_qm, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        stride_ym, H, D, sm_scale, NUM_SPLITS,
                        BF16_INTERP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """One query per (b, h) over cache slots [max(kv_start[b], 0), Pos[0]]; grid (B*H, NUM_SPLITS).
    OPart (B*H*NUM_SPLITS, BLOCK_D) fp32, LsePart (B*H*NUM_SPLITS,) fp32, Count (B*H,) int32 zeros."""
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    end = tl.load(Pos).to(tl.int32) + 1
    start = tl.maximum(tl.load(KvStart + b).to(tl.int32), 0)
    live = tl.maximum(end - start, 0)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(live, NUM_SPLITS), BLOCK_N) * BLOCK_N, BLOCK_N)
    used = tl.maximum(tl.cdiv(live, chunk), 1)
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    Yb = Y + b * stride_ym + h * D
    if split < used:
        acc, m_i, l_i = _attn_chunk(Q + b * stride_qm + h * D, KCache + b * stride_kb + h * stride_kh,
                                    VCache + b * stride_vb + h * stride_vh, lo, hi, stride_ks, stride_vs,
                                    offs_d, mask_d, sm_scale * 1.4426950408889634, BF16_INTERP,
                                    BLOCK_N, BLOCK_D)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)
        if used == 1:
            tl.store(Yb + offs_d, _to(o, Y, BF16_INTERP), mask=mask_d)
        else:
            row = bh * NUM_SPLITS + split
            tl.store(OPart + row * BLOCK_D + offs_d, o, mask=mask_d)
            tl.store(LsePart + row, tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)),
                                             float("-inf")))
            tl.debug_barrier()                          # every thread's partial stores, then release
            arrived = tl.atomic_add(Count + bh, 1)      # acq_rel, gpu scope
            if arrived == used - 1:                     # the last split of (b, h) combines
                _attn_combine(Yb, OPart, LsePart, bh * NUM_SPLITS, used, offs_d, mask_d, BF16_INTERP,
                              BLOCK_S, BLOCK_D)
                tl.atomic_xchg(Count + bh, 0)           # ready for the next step (graph replay)


# =============================================================================================
# Host launchers: no checks of values (the step calls them inside a CUDA graph), shapes only.
# =============================================================================================

import os  # noqa: E402

import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ATTN_BLOCK_N = 16 if INTERPRET else 64      # interpreter: short chunks, so tests reach the combine
MAX_SPLITS = 64


def _bf16_interp(t: torch.Tensor) -> bool:
    return INTERPRET and t.dtype == torch.bfloat16


def gemv_blocks(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). GPU: 8-16 columns per program (gpt2's 768-wide
    projections -> 96 programs), 128 K per chunk (16 B per thread-load for 16-bit weights),
    the 3-D product tile BLOCK_M x BLOCK_N x BLOCK_K <= 4096 fp32 (8192 spills at M 4 x N 16).
    Interpreter: few, big programs."""
    bm = min(triton.next_power_of_2(max(M, 1)), 4 if not INTERPRET else 16)
    if INTERPRET:  # its cost is per program and per op, not per element: wide tiles
        bn = min(triton.next_power_of_2(N), 1024)
        return bm, bn, min(triton.next_power_of_2(K), max(16, (1 << 20) // (bm * bn))), 4
    bn = 8 if N <= 1024 else 16
    bk = max(32, min(128, 4096 // (bm * bn)))
    return bm, bn, bk, 4


def _ln_args(ln, like):
    """(LnW, LnB, eps, HAS_LN_BIAS) from ln = (weight, bias or None, eps) or None."""
    if ln is None:
        return like, like, 0.0, False
    w, b, eps = ln
    return w, (b if b is not None else w), float(eps), b is not None


def gemv(x, weight, y, scale=None, bias=None, ln=None, gelu=False, residual=False):
    """y (M, N) = [gelu](LN?(x) @ (weight [* scale])^T + bias), or y += ... with residual=True.
    x (M, K) unit column stride; weight (N', K) float or int8 with N' >= N = y.shape[1] (the rows
    past N are never read); scale (N',) fp32 for int8; ln = (weight, bias, eps) or None."""
    M, K = x.shape
    N = y.shape[1]
    BM, BN, BK, nw = gemv_blocks(M, N, K)
    lnw, lnb, eps, has_ln_bias = _ln_args(ln, x)
    _gemv_kernel[(triton.cdiv(N, BN), triton.cdiv(M, BM))](
        x, weight, scale if scale is not None else x, bias if bias is not None else x, lnw, lnb, y,
        M, N, K, x.stride(0), weight.stride(0), weight.stride(1), y.stride(0), eps,
        LN=ln is not None, HAS_LN_BIAS=has_ln_bias, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        GELU=gelu, RESIDUAL=residual, BF16_INTERP=_bf16_interp(y), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        num_warps=nw)
    return y


def qkv_gemv(x, weight, ln, q, k_cache, v_cache, pos, scale=None, bias=None):
    """q (M, C) = LN(x) @ W_q^T + b_q; k, v written to k_cache/v_cache[:M, :, pos[0], :]
    (caches (B_max, H, S, D) with unit D stride); pos (1,) int tensor, read on the device."""
    M, K = x.shape
    C = q.shape[1]
    D = k_cache.shape[3]
    BM, BN, BK, nw = gemv_blocks(M, 3 * C, K)
    lnw, lnb, eps, has_ln_bias = _ln_args(ln, x)
    _qkv_gemv_kernel[(triton.cdiv(3 * C, BN), triton.cdiv(M, BM))](
        x, weight, scale if scale is not None else x, bias if bias is not None else x, lnw, lnb,
        q, k_cache, v_cache, pos, M, K, C, D, x.stride(0), weight.stride(0), weight.stride(1), q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), eps,
        HAS_LN_BIAS=has_ln_bias, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BF16_INTERP=_bf16_interp(q), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=nw)


def embed(seq, pos, kv_start, wte, wpe, x):
    """x (M, C) = wte[seq[:M, pos]] + wpe[max(pos - kv_start, 0)]."""
    M, C = x.shape
    BLOCK_C = min(triton.next_power_of_2(C), 1024)
    _embed_kernel[(M,)](seq, pos, kv_start, wte, wpe, x, C, wte.shape[0], seq.stride(0), wte.stride(0), wpe.stride(0),
                        x.stride(0), BF16_INTERP=_bf16_interp(x), BLOCK_C=BLOCK_C,
                        num_warps=4 if C >= 512 else 1)


def attn_splits(M: int, H: int, S: int, device: torch.device) -> int:
    """Splits of the live range per (b, h), from static shapes: ~2 waves of programs."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, M * H), triton.cdiv(S, ATTN_BLOCK_N), MAX_SPLITS))


def attn_workspace(M: int, H: int, D: int, num_splits: int, device: torch.device):
    """(o_part, lse_part, count) for attn_decode; count must start at 0 (the kernel leaves it 0)."""
    BD = max(16, triton.next_power_of_2(D))
    return (torch.empty(M * H * num_splits, BD, dtype=torch.float32, device=device),
            torch.empty(M * H * num_splits, dtype=torch.float32, device=device),
            torch.zeros(M * H, dtype=torch.int32, device=device))


def attn_decode(q, k_cache, v_cache, pos, kv_start, y, workspace, num_splits: int, sm_scale: float):
    """y (M, C) = attention of q (M, C) (= (M, H, D)) over cache slots [kv_start, pos[0]]."""
    M, C = q.shape
    H, D = k_cache.shape[1], k_cache.shape[3]
    o_part, lse_part, count = workspace
    BD = max(16, triton.next_power_of_2(D))
    _attn_decode_kernel[(M * H, num_splits)](
        q, k_cache, v_cache, pos, kv_start, y, o_part, lse_part, count,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), y.stride(0), H, D, float(sm_scale),
        num_splits, BF16_INTERP=_bf16_interp(y), BLOCK_N=ATTN_BLOCK_N,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BD, num_warps=4 if D >= 64 else 2)

"""Flash attention forward, software-pipelined: QK^T of key block j+1 is issued before the softmax of j.

Math: the same online softmax as flash_attention.py's forward (base-2 exponents, lse saved in
natural log, bottom-right causal, dropout by Philox), computed in the same two stages (key blocks
every query of the block sees, then the masked ones).

Schedule: the v1 loop runs  S_j = Q K_j^T -> softmax(S_j) -> acc += P_j V_j  in order, and on sm_90
every wgmma is waited on before its result is touched, so the exponentials (as costly as the
matmuls at D=64) sit between two idle tensor-core phases. Here each stage is rotated by hand:

    S = Q K_lo^T
    for j in lo+1 .. last:   S_next = Q K_j^T          (issued first; its wait is at the loop end)
                             softmax(S); acc += P V_{j-1}
                             S = S_next
    softmax(S); acc += P V_last

so the QK^T wgmma of block j+1 runs on the tensor cores while the CUDA cores compute the softmax
of block j; the cost is one more (BLOCK_M, BLOCK_N) fp32 tile live in registers. Plain Triton
(3.6+) constructs only: no warp specialisation, no TMA descriptors. Selected with
choices.choice("attention_fwd_kernel") == "pipelined" (GPT2_FAST_ATTN_FWD_KERNEL).

How the overlap comes about (Triton's sm_90 wgmma pipeliner, checked in the TTGIR of triton 3.6
and 3.9): a dot whose result is only carried to the next iteration is left in flight ("properly
async") when every use of the carried value follows the loop's first wait{pendings=0}. The
P V dot comes first in the body, is synchronous (its accumulator is rescaled by alpha) and
supplies that wait; the Q K^T dot after it then stays in flight while the exp2s of the softmax
run, and is waited for by the next iteration's P V wait. Hence the rotation below, with P kept
in fp32 across iterations (in bf16 Triton stages it through shared memory). Only the unmasked key
blocks are rotated; the one or two masked ones at the causal diagonal / Tk tail run in order.
Registers at D = 64, bf16, (128, 64, 8 warps): 210-212 (triton 3.9) / 177 (3.6) against v1's 111:
one 8-warp CTA per SM instead of two, so v1 already overlaps softmax and matmuls across CTAs;
which is faster is for a GPU to decide (the default stays v1).
"""
import triton
import triton.language as tl

from ._attention_common import _cast_like, _cast_ptr, _dot, _load_tile, tl_configs


@triton.jit
def _online_softmax(s, m_i, l_i, start_n, offs_m, Tk, causal_off, qk_scale, seed, drop_base, dropout_p,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Softmax statistics of s = q k^T (unscaled) for the key block at start_n: returns p (fp32,
    dropout applied), alpha = 2^(m_old - m_new), and the updated m, l."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = s * qk_scale                                                   # log2 units
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
    return p, alpha, m_new, l_i


@triton.jit
def _pv(acc, alpha, p, V, stride_vn, stride_vd, start_n, offs_d, Tk, D, MASKED: tl.constexpr,
        EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc * alpha + p v for the key block at start_n (p fp32, cast to v's dtype here: carried across
    iterations in fp32 it stays a register operand of the wgmma instead of a shared-memory copy)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, Tk, offs_d, D, MASKED, not EVEN_D)                          # (N, Dp)
    return acc * alpha[:, None] + _dot(_cast_like(p, v, DOT_PREC), v, DOT_PREC)


@triton.jit
def _qk(q, K, stride_kn, stride_kd, start_n, offs_d, Tk, D, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """q k^T for the key block at start_n, unscaled (M, N) fp32."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, Tk, offs_d, D, CHECK_ROWS, not EVEN_D)                      # (N, Dp)
    return _dot(q, tl.trans(k), DOT_PREC)


@triton.jit
def _attn_fwd_masked_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                           lo, hi, offs_m, offs_d, Tk, D, causal_off, qk_scale, seed, drop_base, dropout_p,
                           IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """The few masked key blocks (causal diagonal, Tk tail), in order as in v1."""
    for start_n in range(lo, hi, BLOCK_N):
        s = _qk(q, K, stride_kn, stride_kd, start_n, offs_d, Tk, D, True, EVEN_D, BLOCK_N, DOT_PREC)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, start_n, offs_m, Tk, causal_off, qk_scale, seed,
                                             drop_base, dropout_p, True, IS_CAUSAL, HAS_DROPOUT, BLOCK_N)
        acc = _pv(acc, alpha, p, V, stride_vn, stride_vd, start_n, offs_d, Tk, D, True,
                  EVEN_D, BLOCK_N, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_pipelined_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                              lo, hi, offs_m, offs_d, Tk, D, causal_off, qk_scale, seed, drop_base, dropout_p,
                              HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                              DOT_PREC: tl.constexpr):
    """The unmasked key blocks lo .. hi (whole blocks), rotated: iteration j runs
    acc += P_{j-1} V_{j-1} (a synchronous wgmma: its wait also completes S_j), then issues
    S_{j+1} = q K_{j+1}^T, then computes the softmax of S_j while S_{j+1} is in flight."""
    n = (hi - lo) // BLOCK_N
    if n > 0:
        s = _qk(q, K, stride_kn, stride_kd, lo, offs_d, Tk, D, False, EVEN_D, BLOCK_N, DOT_PREC)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, lo, offs_m, Tk, causal_off, qk_scale, seed,
                                             drop_base, dropout_p, False, False, HAS_DROPOUT, BLOCK_N)
        if n > 1:
            s = _qk(q, K, stride_kn, stride_kd, lo + BLOCK_N, offs_d, Tk, D, False, EVEN_D, BLOCK_N, DOT_PREC)
        for start_n in range(lo + BLOCK_N, hi - BLOCK_N, BLOCK_N):     # block j at start_n, j = 1 .. n-2
            acc = _pv(acc, alpha, p, V, stride_vn, stride_vd, start_n - BLOCK_N, offs_d, Tk, D, False,
                      EVEN_D, BLOCK_N, DOT_PREC)
            s_next = _qk(q, K, stride_kn, stride_kd, start_n + BLOCK_N, offs_d, Tk, D, False, EVEN_D, BLOCK_N,
                         DOT_PREC)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, start_n, offs_m, Tk, causal_off, qk_scale, seed,
                                                 drop_base, dropout_p, False, False, HAS_DROPOUT, BLOCK_N)
            s = s_next
        if n > 1:
            acc = _pv(acc, alpha, p, V, stride_vn, stride_vd, hi - 2 * BLOCK_N, offs_d, Tk, D, False, EVEN_D,
                      BLOCK_N, DOT_PREC)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, hi - BLOCK_N, offs_m, Tk, causal_off, qk_scale,
                                                 seed, drop_base, dropout_p, False, False, HAS_DROPOUT, BLOCK_N)
        acc = _pv(acc, alpha, p, V, stride_vn, stride_vd, hi - BLOCK_N, offs_d, Tk, D, False, EVEN_D, BLOCK_N,
                  DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_pipelined_kernel(Q, K, V, O, LSE, Seed,
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
    if IS_CAUSAL:  # see flash_attention._attention_fwd_kernel for the two stages' bounds
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
    acc, l_i, m_i = _attn_fwd_pipelined_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        0, full_hi, offs_m, offs_d, Tk, D, causal_off, qk_scale, seed, drop_base, dropout_p,
        HAS_DROPOUT, EVEN_D, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _attn_fwd_masked_inner(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        full_hi, hi, offs_m, offs_d, Tk, D, causal_off, qk_scale, seed, drop_base, dropout_p,
        IS_CAUSAL, HAS_DROPOUT, EVEN_D, BLOCK_N, DOT_PREC)

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        o = o * (1.0 / (1.0 - dropout_p))
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, _cast_ptr(o, O, DOT_PREC),
             mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)


# H100/H200 autotune candidates (BLOCK_M, BLOCK_N, warps, stages), pruned per head dim by shared
# memory (flash_attention_smem.py); FIXED: with autotuning off, the first that fits (the smaller
# ones serve D = 256); INTERP: the interpreter's (unequal blocks: the tests cross block boundaries).
# (128, 64, 4, 3) spilled at D=64 (the extra S tile); 4-warp configs keep BLOCK_M = 64.
CONFIGS = tl_configs([(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)])
FIXED = tl_configs([(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)])
INTERP = tl_configs([(64, 32, 4, 1)])
# exact fp32 (FMA dots) launches v1 on a GPU (flash_attention.attention_fwd): this one spilled there
EXACT_FP32_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)

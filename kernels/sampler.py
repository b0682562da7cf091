"""The decode sampler in one Triton launch: greedy, temperature, top-k and top-p, no sort.

One program per row of logits (B, V). The rules are the engine's (engine.sample_on_device), so a
seed gives the same tokens:

  greedy   argmax of the logits (the first index among equal maxima, as torch.argmax).
  sample   l = logits / T;  top-k keeps l >= (k-th largest l);  top-p keeps the tokens whose
           softmax mass strictly above them (over the top-k set) is < p;  then the exponential
           race: argmax_i p_i / e_i with e_i ~ Exp(1) the engine's counter-based hash of
           (seed, counter, row, i), which draws i with probability p_i.

No sort: both thresholds are "the largest t with F(t) >= target", F(t) = sum_i w_i [l_i >= t]
non-increasing in t: top-k with w_i = 1 and target k (t = the k-th largest value), top-p with
w_i = exp(l_i - max) over the top-k set and target p * sum_i w_i (t = the smallest kept logit: the
mass at or above it reaches p, the mass strictly above it does not). t is found bit by bit on
an order-preserving uint32 key of the fp32 logit, RADIX_BITS per pass: each pass counts F at
2^RADIX_BITS candidates at once (a (BLOCK_V, 2^RADIX_BITS) compare-and-sum) and keeps the
largest candidate that still reaches the target; 32 / RADIX_BITS passes give t exactly. The
argmax of p_i / e_i skips the softmax's division by the sum (a common positive factor).

In the decode step (STEP) the program also writes the token into the step's sequence buffer at
pos + 1 (EOT for finished rows) and updates `done`; the host reads nothing, so a CUDA graph
replays it.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mix32(x):
    """engine._mix32 on uint32 (products wrap mod 2^32, as the engine's `& 0xFFFFFFFF`)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def _exp_noise(Seed, Counter, row, offs):
    """engine.exponential_noise for one row at columns offs: -log(u), u in (0, 1)."""
    seed = tl.load(Seed).to(tl.uint32)
    counter = tl.load(Counter).to(tl.uint32)
    h = _mix32(seed + _mix32(counter))
    r = _mix32(h + row.to(tl.uint32) * 0x2C1B3C6D)
    x = _mix32(r + offs.to(tl.uint32) * 0x297A2D39)
    u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(u)


@triton.jit
def _key(x):
    """fp32 -> uint32 with the same order (negative: flip all bits; positive: set the sign bit)."""
    b = x.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@triton.jit
def _unkey(k):
    b = tl.where((k >> 31) != 0, k & 0x7FFFFFFF, ~k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _load_scaled(Row, offs, V, temp, SCALE: tl.constexpr = True):
    """(l = logits / temp with torch's IEEE division, -inf past V; mask)."""
    mask = offs < V
    x = tl.load(Row + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALE:
        x = tl.math.div_rn(x, tl.zeros_like(x) + temp)
    return tl.where(mask, x, float("-inf")), mask


@triton.jit
def _radix_threshold(Row, V, temp, mx, floor, target, MASS: tl.constexpr, BLOCK_V: tl.constexpr,
                     RADIX_BITS: tl.constexpr):
    """The largest fp32 t with F(t) = sum_{l_i >= max(t, floor)} w_i >= target, w_i = 1
    (MASS False) or exp(l_i - mx). Returns t (or the smallest value when no t reaches it)."""
    R: tl.constexpr = 1 << RADIX_BITS
    digits = tl.arange(0, R).to(tl.uint32)
    prefix = tl.zeros([1], dtype=tl.uint32)
    for p in range(32 // RADIX_BITS):            # a loop, not unrolled: 8x less code to compile
        shift = tl.cast(32 - RADIX_BITS * (p + 1), tl.uint32)
        cand = prefix | (digits << shift)                                         # (R,)
        f = tl.zeros([R], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            l, mask = _load_scaled(Row, v0 + tl.arange(0, BLOCK_V), V, temp)
            keep = mask & (l >= floor)
            if MASS:
                w = tl.where(keep, tl.exp(l - mx), 0.0)
            else:
                w = tl.where(keep, 1.0, 0.0)
            hit = _key(l)[:, None] >= cand[None, :]
            f += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
        best = tl.max(tl.where(f >= target, digits, 0), axis=0)
        prefix = prefix | (best << shift)
    return tl.max(_unkey(prefix), axis=0)


@triton.jit
def _argmax_pass(Row, V, temp, mx, floor, Seed, Counter, row, SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr):
    """argmax_i of l_i (SAMPLE False) or of exp(l_i - mx) / e_i over l_i >= floor (first index
    among equals)."""
    best = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    best_i = tl.max(tl.zeros([BLOCK_V], tl.int32), axis=0)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        l, mask = _load_scaled(Row, offs, V, temp, SAMPLE)
        if SAMPLE:
            score = tl.exp(l - mx) / _exp_noise(Seed, Counter, row, offs)
            score = tl.where(mask & (l >= floor), score, -1.0)
        else:
            score = l
        m = tl.max(score, axis=0)
        i = tl.min(tl.where(score == m, offs, 2147483647), axis=0)
        take = m > best
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    return best_i


@triton.jit
def _sample_kernel(Logits, stride_lm, V, Temperature, TopP, Seed, Counter, top_k,
                   Out, Seq, stride_seq, Pos, Done, Stop, eot,
                   GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, STEP: tl.constexpr,
                   BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """One token per row of Logits (B, V). STEP: Seq[b, Pos + 1] = token (EOT where Done[b]) and
    Done[b] |= token == eot & Stop; else Out[b] = token."""
    row = tl.program_id(0)
    Row = Logits + row.to(tl.int64) * stride_lm
    if GREEDY:
        tok = _argmax_pass(Row, V, 1.0, 0.0, 0.0, Seed, Counter, row, False, BLOCK_V)
    else:
        temp = tl.load(Temperature).to(tl.float32)
        mx = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        for v0 in range(0, V, BLOCK_V):
            l, mask = _load_scaled(Row, v0 + tl.arange(0, BLOCK_V), V, temp)
            mx = tl.maximum(mx, tl.max(l, axis=0))
        floor = float("-inf")
        if TOP_K:
            floor = _radix_threshold(Row, V, temp, mx, floor, top_k.to(tl.float32), False, BLOCK_V,
                                     RADIX_BITS)
        if TOP_P:
            z = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
            for v0 in range(0, V, BLOCK_V):
                l, mask = _load_scaled(Row, v0 + tl.arange(0, BLOCK_V), V, temp)
                z += tl.sum(tl.where(mask & (l >= floor), tl.exp(l - mx), 0.0), axis=0)
            target = tl.load(TopP).to(tl.float32) * z
            floor = tl.maximum(floor, _radix_threshold(Row, V, temp, mx, floor, target, True, BLOCK_V,
                                                       RADIX_BITS))
        tok = _argmax_pass(Row, V, temp, mx, floor, Seed, Counter, row, True, BLOCK_V)
    if STEP:
        pos = tl.load(Pos).to(tl.int64)
        done = tl.load(Done + row) != 0
        tok = tl.where(done, eot, tok).to(tl.int64)
        tl.store(Seq + row.to(tl.int64) * stride_seq + pos + 1, tok)
        tl.store(Done + row, done | ((tok == eot) & (tl.load(Stop) != 0)))
    else:
        tl.store(Out + row, tok.to(tl.int64))


# =============================================================================================
# Host launcher
# =============================================================================================

def _block_v(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, RADIX_BITS): 4-bit digits (8 passes of 16 candidates); under the
    interpreter, whose cost is per op, 8-bit digits (4 passes of 256) for small vocabularies."""
    if INTERPRET:
        return min(triton.next_power_of_2(V), 4096), 4, 8 if V <= 4096 else 4
    return min(triton.next_power_of_2(V), 1024), 8, 4


def sample(logits, greedy: bool, top_k, use_top_p: bool, temperature, top_p, seed, counter,
           out=None, step=None):
    """Launch the sampler. logits (B, V) any float dtype with unit column stride; temperature,
    top_p (1,) fp32; seed, counter (1,) int64 device tensors; top_k an int or None.
    Returns out (B,) int64, or with step = (seq, pos, done, stop, eot) writes the step buffers."""
    B, V = logits.shape
    BLOCK_V, nw, radix_bits = _block_v(V)
    if step is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device) if out is None else out
        seq, pos, done, stop, eot = out, counter, out, out, 0
    else:
        seq, pos, done, stop, eot = step
    _sample_kernel[(B,)](
        logits, logits.stride(0), V, temperature, top_p, seed, counter, int(top_k or 0),
        out if out is not None else seq, seq, seq.stride(0), pos, done, stop, int(eot),
        GREEDY=bool(greedy), TOP_K=top_k is not None and not greedy, TOP_P=bool(use_top_p) and not greedy,
        STEP=step is not None, BLOCK_V=BLOCK_V, RADIX_BITS=radix_bits, num_warps=nw)
    return out

"""Softmax cross-entropy over given logits, and the LM head fused with it, in Triton.

Per row i of logits x (V columns) with target t_i, over the n rows whose target != ignore_index:
    lse_i  = log sum_j exp(x_ij)            (online: running max m and sum d over BLOCK_V blocks,
                                             d <- d exp(m - m') + sum exp(x - m'))
    loss   = (1/n) sum_i (lse_i - x_i,t_i)  (ignored rows contribute 0; n = 0 gives NaN, as torch)
    dx_ij  = dloss / n * (exp(x_ij - lse_i) - [j == t_i])   (0 on ignored rows)

softmax_cross_entropy(logits, targets): the forward kernel writes per-row loss and lse (fp32);
the backward kernel recomputes softmax from the saved logits and lse. The logits are the caller's
(the model returns them), so they are never overwritten.

lm_head_cross_entropy(hidden, weight, targets): logits = hidden @ weight[:V].T is never
materialized whole. The GEMMs use ALL rows of the (padded) weight, V_pad = weight.shape[0]
(GPTConfig.embedding_rows = 50304 for GPT-2's 50257: a 64-aligned leading dimension, so cuBLAS
can use its TMA kernels and the CE kernel's rows start 16-byte aligned), and the CE kernel
treats the logits of columns >= V as -inf: they add 0 to the softmax and get a gradient of
exactly 0, so grad_W of the padded rows is exactly 0 (0 * hidden). A weight whose rows are not a
multiple of ROW_ALIGN (an unpadded 50257-row embedding) is padded with zero rows in the
compute-dtype copy (made anyway when autocast casts an fp32 weight); grad_W keeps its rows. Rows are processed in chunks sized from a memory budget (CHUNK_BYTES of
logits per chunk); for each chunk cuBLAS computes the logits, the same forward kernel computes
loss and lse and, when a gradient is needed, overwrites the chunk's logits with dlogits (scaled
by 1/n, the scale read from device memory, so no host sync), and then
    grad_hidden[chunk]  = dlogits @ W                    (padded columns of dlogits are 0)
    grad_W             += dlogits^T @ hidden[chunk]      (accumulated in fp32)
so the backward only scales the saved gradients by dloss (Liger's fused_linear_cross_entropy
does the same). The matmuls run in reference.matmul_dtype(hidden, weight), the autocast dtype
under autocast (hidden and weight cast to it, the weight once per call); grad_W is accumulated
in fp32 without rounding each chunk's product to 16 bits (on CUDA cuBLAS writes the fp32 product
of the 16-bit operands, torch.mm(out_dtype=float32); elsewhere the operands are widened first).
Rows of W at or past vocab_size (a padded vocabulary) get exactly zero gradient. Peak extra memory is
one logits chunk plus the fp32 grad_W accumulator, instead of the (N, V) logits, their fp32 copy
and their gradient.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt2_fast import poison
from gpt2_fast.reference import matmul_dtype

from ._registry import check_float, check_same_device, launch, triton_op
from ._store import cast_for_store

CHUNK_BYTES = 256 * 2**20  # logits bytes per chunk of rows in lm_head_cross_entropy
ROW_ALIGN = 64             # logits rows of the fused LM head: a multiple of 64 columns
# torch.mm(a, b, out_dtype=torch.float32) of fp16/bf16 operands (CUDA, torch >= 2.8)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _ce_grad_row(Src, Dst, target, lse, scale, V, V_ROW, BLOCK_V: tl.constexpr):
    """Dst[j] = scale * (exp(Src[j] - lse) - [j == target]) for j < V, 0 for V <= j < V_ROW (the
    padded vocabulary); Dst may be Src. Loads and stores are masked on V_ROW only: when V_ROW is
    a multiple of 16 Triton knows the mask is constant over 16 columns and vectorises them."""
    for start in range(0, V_ROW, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V_ROW
        x = tl.load(Src + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(cols < V, x, float("-inf"))                        # padded: exp -> 0
        g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(Dst + cols, cast_for_store(g, Dst), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(
    Logits, Targets, Loss, Lse, NValid,
    stride_l, row_start, V, V_ROW, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Logits holds rows row_start.. of the problem (a chunk); Targets, Loss, Lse are full-size.
    # A row has V_ROW >= V logits; those at V.. (a padded vocabulary) are taken as -inf.
    pid = tl.program_id(0).to(tl.int64)
    row = row_start + pid
    src = Logits + pid * stride_l
    target = tl.load(Targets + row)
    m = float("-inf")
    d = 0.0
    for start in range(0, V_ROW, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(src + cols, mask=cols < V_ROW, other=float("-inf")).to(tl.float32)
        x = tl.where(cols < V, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    valid = target != ignore_index
    in_range = valid & (target >= 0) & (target < V)
    x_t = tl.load(src + tl.where(in_range, target, 0)).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - x_t, 0.0))
    tl.store(Lse + row, lse)
    if COMPUTE_GRAD:  # dlogits of the mean loss, written over this row's logits
        scale = tl.where(valid, 1.0 / tl.load(NValid), 0.0)
        _ce_grad_row(src, src, target, lse, scale, V, V_ROW, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    Logits, Targets, Lse, DLoss, NValid, DLogits,
    stride_l, stride_dl, V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Targets + row)
    lse = tl.load(Lse + row)
    scale = tl.where(target != ignore_index, tl.load(DLoss).to(tl.float32) / tl.load(NValid), 0.0)
    _ce_grad_row(Logits + row * stride_l, DLogits + row * stride_dl, target, lse, scale, V, V, BLOCK_V)


# ---------------------------------------------------------------------------------------------
# host launchers (registered ops)
# ---------------------------------------------------------------------------------------------

def _block_v(V: int) -> tuple[int, int]:
    BLOCK_V = min(4096, triton.next_power_of_2(V))
    return BLOCK_V, (8 if BLOCK_V >= 2048 else 4)


@triton_op("cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V), targets (N,) int64 -> (mean loss () fp32, lse (N,) fp32, n_valid () fp32)."""
    N, V = logits.shape
    loss_rows = poison.empty((N,), dtype=torch.float32, device=logits.device)
    lse = poison.empty((N,), dtype=torch.float32, device=logits.device)
    n_valid = (targets != ignore_index).sum().to(torch.float32)
    BLOCK_V, num_warps = _block_v(V)
    launch(_cross_entropy_fwd_kernel)[(N,)](
        logits, targets, loss_rows, lse, n_valid, logits.stride(0), 0, V, V, ignore_index,
        COMPUTE_GRAD=False, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return loss_rows.sum() / n_valid, lse, n_valid


@triton_op("cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(dloss: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, n_valid: Tensor,
                      ignore_index: int) -> Tensor:
    """-> dlogits (N, V) in logits' dtype."""
    N, V = logits.shape
    dlogits = poison.empty((N, V), dtype=logits.dtype, device=logits.device)
    BLOCK_V, num_warps = _block_v(V)
    launch(_cross_entropy_bwd_kernel)[(N,)](
        logits, targets, lse, dloss, n_valid, dlogits, logits.stride(0), dlogits.stride(0),
        V, ignore_index, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return dlogits


def _chunk_rows(N: int, V: int, element_size: int) -> int:
    """Rows per chunk: CHUNK_BYTES of logits, a multiple of 64 rows when more than 64."""
    rows = max(1, CHUNK_BYTES // max(1, V * element_size))
    if rows > 64:
        rows -= rows % 64
    return min(N, rows)


def _add_mm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, accumulated in fp32 with no rounding of the product to a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _MM_OUT_DTYPE:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:  # exact: products of 16-bit values are exact in fp32
        acc.addmm_(a.float(), b.float())


@triton_op("lm_head_cross_entropy_fwd", mutates_args=())
def lm_head_cross_entropy_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                              vocab_size: int, chunk_rows: int, need_dhidden: bool,
                              need_dweight: bool, compute_dtype: torch.dtype
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """hidden (N, C), weight (V_padded, C), targets (N,) -> (mean loss () fp32,
    dloss/dhidden (N, C) in hidden's dtype or empty, dloss/dweight (V_padded, C) in weight's
    dtype or empty). The matmuls run in compute_dtype."""
    N, C = hidden.shape
    V, V_pad = vocab_size, weight.shape[0]
    V_al = triton.cdiv(V_pad, ROW_ALIGN) * ROW_ALIGN
    if V_al == V_pad:
        w = weight.to(compute_dtype)                                        # (V_pad, C), all rows
    else:  # an unpadded weight (50257 rows): zero rows appended, in the copy the cast makes anyway
        w = torch.zeros((V_al, C), dtype=compute_dtype, device=hidden.device)
        w[:V_pad].copy_(weight)
    dev = hidden.device
    loss_rows = poison.empty((N,), dtype=torch.float32, device=dev)
    lse = poison.empty((N,), dtype=torch.float32, device=dev)
    n_valid = (targets != ignore_index).sum().to(torch.float32)
    dhidden = poison.empty((N, C) if need_dhidden else (0,), dtype=hidden.dtype, device=dev)
    dweight32 = torch.zeros((weight.shape[0], C) if need_dweight else (0,), dtype=torch.float32,
                            device=dev)
    chunk = chunk_rows if chunk_rows > 0 else _chunk_rows(N, V_al, compute_dtype.itemsize)
    BLOCK_V, num_warps = _block_v(V_al)
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        h = hidden[start:end].to(compute_dtype)                             # (rows, C)
        logits = torch.matmul(h, w.t())                                     # (rows, V_al)
        launch(_cross_entropy_fwd_kernel)[(end - start,)](
            logits, targets, loss_rows, lse, n_valid, logits.stride(0), start, V, V_al, ignore_index,
            COMPUTE_GRAD=need_dhidden or need_dweight, BLOCK_V=BLOCK_V, num_warps=num_warps,
        )
        # logits now holds dloss/dlogits for these rows, exactly 0 in the padded columns
        if need_dhidden:
            if dhidden.dtype == logits.dtype:
                torch.matmul(logits, w, out=dhidden[start:end])
            else:  # fp32 hidden under autocast: the 16-bit product, widened as autocast would
                dhidden[start:end].copy_(torch.matmul(logits, w))
        if need_dweight:
            _add_mm_fp32(dweight32, logits[:, :V_pad].t(), h)               # padded rows: 0
    dweight = dweight32.to(weight.dtype) if need_dweight else dweight32
    return loss_rows.sum() / n_valid, dhidden, dweight


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------

class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, lse, n_valid = torch.ops.gpt2_fast_triton.cross_entropy_fwd(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse, n_valid = ctx.saved_tensors
        dlogits = torch.ops.gpt2_fast_triton.cross_entropy_bwd(
            dloss.float().contiguous(), logits, targets, lse, n_valid, ctx.ignore_index)
        return dlogits, None, None


class LMHeadCrossEntropyFunction(torch.autograd.Function):
    """The gradients are computed in the forward (the logits chunks are gone by the backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, vocab_size, chunk_rows, need_dh, need_dw,
                compute_dtype):
        # need_* come from the caller: ctx.needs_input_grad stays True under torch.no_grad()
        loss, dhidden, dweight = torch.ops.gpt2_fast_triton.lm_head_cross_entropy_fwd(
            hidden, weight, targets, ignore_index, vocab_size, chunk_rows, need_dh, need_dw,
            compute_dtype)
        ctx.save_for_backward(dhidden, dweight)
        ctx.need = (need_dh, need_dw)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dhidden, dweight = ctx.saved_tensors
        need_dh, need_dw = ctx.need
        dh = dhidden * dloss.to(dhidden.dtype) if need_dh else None
        dw = dweight * dloss.to(dweight.dtype) if need_dw else None
        return dh, dw, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

def _check_targets(targets: Tensor, N: int, V: int, ignore_index: int, ref: Tensor) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 (or int32) tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape ({N},), got {tuple(targets.shape)}")
    check_same_device("logits/hidden", ref, targets=targets)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    capturing = targets.is_cuda and torch.cuda.is_current_stream_capturing()
    if not (capturing or torch.compiler.is_compiling()) and N > 0:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):  # one host sync; skipped under torch.compile and CUDA graph capture
            t = targets[bad][0].item()
            raise ValueError(f"targets must be in [0, {V}) or ignore_index={ignore_index}; got {t}")
    return targets.long().contiguous()


def softmax_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over rows whose target != ignore_index. logits (N, V), targets (N,) -> () fp32."""
    check_float("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, V) with V >= 1, got {tuple(logits.shape)}")
    N, V = logits.shape
    targets = _check_targets(targets, N, V, ignore_index, logits)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if N == 0:
        return _mean_of_no_rows(logits)
    return SoftmaxCrossEntropyFunction.apply(logits, targets, ignore_index)


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                          vocab_size: Optional[int] = None, *, chunk_rows: int = 0) -> Tensor:
    """Mean CE of hidden @ weight[:vocab_size].T without materializing the (N, V) logits.

    hidden (N, C), weight (V_padded, C) (the tied embedding), targets (N,) int -> () fp32.
    The matmuls run in the autocast dtype under torch.autocast, else in the wider of hidden's and
    weight's dtypes; the gradients come back in hidden's and weight's own dtypes.
    chunk_rows: rows per chunk (0: from CHUNK_BYTES).
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, C) and weight (V, C) with the same C; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    check_same_device("hidden", hidden, weight=weight)
    V = weight.shape[0] if vocab_size is None else vocab_size
    if not isinstance(V, int) or not 0 < V <= weight.shape[0]:
        raise ValueError(f"vocab_size must be an int in [1, {weight.shape[0]}] (weight rows), got {vocab_size!r}")
    if not isinstance(chunk_rows, int) or chunk_rows < 0:
        raise ValueError(f"chunk_rows must be an int >= 0, got {chunk_rows!r}")
    N = hidden.shape[0]
    targets = _check_targets(targets, N, V, ignore_index, hidden)
    if N == 0:
        return _mean_of_no_rows(hidden) + 0.0 * weight.sum()
    grad = torch.is_grad_enabled()
    return LMHeadCrossEntropyFunction.apply(hidden.contiguous(), weight.contiguous(), targets,
                                            ignore_index, V, chunk_rows,
                                            grad and hidden.requires_grad, grad and weight.requires_grad,
                                            matmul_dtype(hidden, weight))


def _mean_of_no_rows(t: Tensor) -> Tensor:
    """The mean over zero rows: NaN, as torch's F.cross_entropy, still attached to t's graph."""
    return t.float().sum() * float("nan")

"""LayerNorm over the last dim, with an optional fused residual add, forward and backward (Triton).

Forward, per row of width N (statistics in fp32; s is the residual stream when fused):
    s      = x + r                                      (rounded to x's dtype, as torch does)
    mean   = sum(s) / N,  var = sum((s - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
    xhat   = (s - mean) * rstd
    y      = xhat * w + b
Backward (dy = dL/dy, ds = dL/ds from the residual stream, zero when not fused):
    wdy    = w * dy
    dx     = rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy)) + ds   (= dL/dx = dL/dr)
    dw     = sum_rows(dy * xhat),  db = sum_rows(dy)

Dtypes (gpt2_fast/reference.py's rules): x and r may differ (an fp32 residual stream plus a
bf16 branch under autocast); s is stored in the wider of the two, y in the dtype the caller asks
for (the autocast dtype under autocast, so no cast kernel sits in front of the next Linear), dx in
s's dtype, cast to x's and r's by the autograd.Function.

Design: one program normalizes BLOCK_M rows held whole in registers (BLOCK_N = next power of
two >= N, masked; N <= 8192), several rows per program for small widths so each program still
moves ~4K elements. The fused variant reads x and r once and writes s and y (the block's
`x = x + attn(...); h = ln_2(x)`). mean and rstd (fp32, 8 bytes per row) are saved for the
backward, which recomputes xhat from s instead of storing it. The backward runs a persistent
grid of as many programs as fit on the GPU at once (kernels/_occupancy.py: from the compiled
kernel's registers and shared memory), each walking a contiguous range of row tiles in a
software-pipelined loop (tl.range num_stages=BWD_STAGES: the next tiles' loads are issued before
this tile's math), writing dx and keeping dw/db partials in fp32 registers, stored once per
program as a (programs, N) buffer; one more launch (kernels/_reduce.py) sums dw and db and casts
dw: deterministic, no atomics, no locks.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt2_fast import poison
from gpt2_fast.reference import add_layer_norm_ref, layer_norm_out_dtype, layer_norm_ref

from ._occupancy import resident_programs
from ._reduce import sum_partials
from ._registry import check_float, check_same_device, launch, rows_2d, triton_op
from ._store import cast_for_store

MAX_WIDTH = 8192
BWD_STAGES = 2  # software-pipelining depth of the backward's row-tile loop (tl.range num_stages)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _layer_norm_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_s, stride_y,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)                                             # (BLOCK_N,)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = cast_for_store(x.to(tl.float32) + r.to(tl.float32), S)          # round like torch
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / N                                             # (BLOCK_M,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_for_store(y, Y), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, Mean, Rstd, DY, DS, DX, DW, DB,
    stride_x, stride_dy, stride_ds, stride_dx,
    M, N, tiles_per_program,
    HAS_DS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in tl.range(0, tiles_per_program, num_stages=NUM_STAGES):  # loads of i+1.. in flight
        tile = pid.to(tl.int64) * tiles_per_program + i
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast_for_store(dx, DX), mask=mask)
        if HAS_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_DB:
            db_acc += tl.sum(dy, axis=0)
    if HAS_DW:
        tl.store(DW + pid * N + cols, dw_acc, mask=col_mask)
    if HAS_DB:
        tl.store(DB + pid * N + cols, db_acc, mask=col_mask)


# ---------------------------------------------------------------------------------------------
# host launchers (registered ops; inputs already 2D (M, N) with unit column stride)
# ---------------------------------------------------------------------------------------------

def _block_sizes(N: int, elements: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, ~`elements` elements per program and
    ~`per_thread` of them per thread (the backward keeps more live per element)."""
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_M = max(1, min(16, elements // BLOCK_N))
    num_warps = min(16, max(1, BLOCK_M * BLOCK_N // (32 * per_thread)))
    return BLOCK_M, BLOCK_N, num_warps


_EMPTY = (0,)


@triton_op("layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, y_dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual (M, N) -> (y (M, N) in y_dtype, s (M, N) in promote(x, residual) or empty
    when residual is None, mean (M,), rstd (M,))."""
    M, N = x.shape
    y = poison.empty((M, N), dtype=y_dtype, device=x.device)
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    s = poison.empty((M, N) if residual is not None else _EMPTY, dtype=s_dtype, device=x.device)
    mean = poison.empty((M,), dtype=torch.float32, device=x.device)
    rstd = poison.empty((M,), dtype=torch.float32, device=x.device)
    BLOCK_M, BLOCK_N, num_warps = _block_sizes(N, 4096, 16)
    r = residual if residual is not None else x
    launch(_layer_norm_fwd_kernel)[(triton.cdiv(M, BLOCK_M),)](
        x, r, s, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        x.stride(0), r.stride(0), N, y.stride(0),
        M, N, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )
    return y, s, mean, rstd


@triton_op("layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, ds: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, need_dw: bool, need_db: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx (M, N), dw (N,) in weight's dtype or empty, db (N,) fp32 or empty); x is the
    normalized input (s when the residual add was fused)."""
    M, N = x.shape
    dx = poison.empty((M, N), dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, num_warps = _block_sizes(N, 2048, 8)
    need_dw = need_dw and weight is not None
    consts = dict(HAS_DS=ds is not None, HAS_WEIGHT=weight is not None, HAS_DW=need_dw,
                  HAS_DB=need_db, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=BWD_STAGES,
                  num_warps=num_warps)

    def args(tiles_per_program, dw_part, db_part):
        return (x, weight if weight is not None else x, mean, rstd, dy, ds if ds is not None else dy,
                dx, dw_part, db_part,
                x.stride(0), dy.stride(0), ds.stride(0) if ds is not None else 0, dx.stride(0),
                M, N, tiles_per_program)

    tiles = triton.cdiv(M, BLOCK_M)
    probe = mean[:1]  # stands in for the fp32 partial buffers while the kernel is sized
    fit = resident_programs(_layer_norm_bwd_kernel, args(2, probe, probe), consts, x.device)
    tiles_per_program = triton.cdiv(tiles, max(1, min(tiles, fit)))
    programs = triton.cdiv(tiles, tiles_per_program)
    dw_part = poison.empty((programs, N) if need_dw else _EMPTY, dtype=torch.float32, device=x.device)
    db_part = poison.empty((programs, N) if need_db else _EMPTY, dtype=torch.float32, device=x.device)
    launch(_layer_norm_bwd_kernel)[(programs,)](*args(tiles_per_program, dw_part, db_part), **consts)
    # db stays fp32: the caller casts to bias's dtype
    if need_dw and need_db:
        dw, db = sum_partials(dw_part, weight.dtype, db_part, torch.float32)
    elif need_dw:
        dw, db = sum_partials(dw_part, weight.dtype)[0], db_part
    elif need_db:
        dw, db = dw_part, sum_partials(db_part, torch.float32)[0]
    else:
        dw, db = dw_part, db_part
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------

def _ln_forward(ctx, x, residual, weight, bias, eps, y_dtype):
    N = x.shape[-1]
    x2 = rows_2d(x, N)
    r2 = rows_2d(residual, N) if residual is not None else None
    y, s, mean, rstd = torch.ops.gpt2_fast_triton.layer_norm_fwd(x2, r2, weight, bias, eps, y_dtype)
    ctx.save_for_backward(s if residual is not None else x2, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.shape = x.shape
    return (s.view(x.shape) if residual is not None else None), y.view(x.shape)


def _ln_backward(ctx, ds, dy, need_dw, need_db):
    x2, weight, mean, rstd = ctx.saved_tensors
    N = x2.shape[-1]
    need_dw = need_dw and weight is not None
    need_db = need_db and ctx.bias_dtype is not None
    dx, dw, db = torch.ops.gpt2_fast_triton.layer_norm_bwd(
        rows_2d(dy, N), rows_2d(ds, N) if ds is not None else None, x2, weight, mean, rstd,
        need_dw, need_db)
    return dx.view(ctx.shape), (dw if need_dw else None), (db.to(ctx.bias_dtype) if need_db else None)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, y_dtype):
        return _ln_forward(ctx, x, None, weight, bias, eps, y_dtype)[1]

    @staticmethod
    def backward(ctx, dy):
        dx, dw, db = _ln_backward(ctx, None, dy, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return dx, dw, db, None, None


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, y_dtype):
        ctx.in_dtypes = (x.dtype, residual.dtype)
        return _ln_forward(ctx, x, residual, weight, bias, eps, y_dtype)

    @staticmethod
    def backward(ctx, ds, dy):
        dx, dw, db = _ln_backward(ctx, ds, dy, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        # d(x + residual)/dx = d/dresidual: both inputs get the same gradient, in their own dtypes
        x_dtype, r_dtype = ctx.in_dtypes
        return dx.to(x_dtype), dx.to(r_dtype), dw, db, None, None


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           residual: Optional[Tensor] = None) -> None:
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., C); got a 0-d tensor")
    N = x.shape[-1]
    if not 0 < N <= MAX_WIDTH:
        raise ValueError(f"layer_norm width must be in [1, {MAX_WIDTH}], got {N}")
    if residual is not None:
        check_float("residual", residual)
        if residual.shape != x.shape:  # dtypes may differ: s takes the wider one
            raise ValueError(f"residual must match x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(name, t)
            if t.shape != (N,):
                raise ValueError(f"{name} must have shape ({N},) to match x's last dim, got {tuple(t.shape)}")
    check_same_device("x", x, residual=residual, weight=weight, bias=bias)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim. x (..., C), weight/bias (C,) or None -> y (..., C) in x's
    dtype, or in the autocast dtype under torch.autocast."""
    _check(x, weight, bias, eps)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if x.numel() == 0:  # zero rows: nothing to launch; the reference keeps autograd working
        return layer_norm_ref(x, weight, bias, eps)
    return LayerNormFunction.apply(x, weight, bias, float(eps), layer_norm_out_dtype(x))


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(s, y): s = x + residual, y = LayerNorm(s), in one pass. x, residual (..., C), dtypes may
    differ: s in the wider one, y in s's dtype, or in the autocast dtype under torch.autocast."""
    _check(x, weight, bias, eps, residual)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if x.numel() == 0:
        return add_layer_norm_ref(x, residual, weight, bias, eps)
    return AddLayerNormFunction.apply(x, residual, weight, bias, float(eps),
                                      layer_norm_out_dtype(x, residual))

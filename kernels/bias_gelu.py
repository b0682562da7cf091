"""GPT-2's tanh GELU with the bias add fused: forward and backward (dx, dbias) in Triton.

Forward, elementwise on u = x + bias (bias broadcast over rows), in fp32:
    z    = k (u + a u^3),   k = sqrt(2/pi), a = 0.044715
    y    = 0.5 u (1 + tanh z) = u * sigmoid(2 z)
Backward:
    dy/du = sigmoid(2z) + u * 2 sigmoid(2z) (1 - sigmoid(2z)) * k (1 + 3 a u^2)
    dx    = dy * dy/du,   dbias = sum_rows(dx)

Design: 0.5(1 + tanh z) is evaluated as sigmoid(2z), which is exact at both tails and needs no
tanh intrinsic (the interpreter and every Triton version have tl.sigmoid). The forward is one
read of x (+ bias, cached) and one write of y over 2D tiles (BLOCK_M rows x BLOCK_N columns).
The backward recomputes u from x and bias instead of saving it, writes dx, and for dbias runs a
persistent grid over row tiles, as many programs as fit on the GPU at once (kernels/_occupancy.py,
from the compiled kernel's registers and shared memory), each walking its tiles in a
software-pipelined loop (tl.range num_stages=BWD_STAGES); each program keeps fp32 column partials
in registers and stores them once into a (programs, N) buffer, summed and cast to bias's dtype by
one more launch (kernels/_reduce.py; deterministic, no atomics).
Dtypes: bias may differ from x (fp32 next to a 16-bit c_fc output under autocast): it is added in
fp32; y and dx are in x's dtype, dbias in bias's. Autocast itself changes nothing here.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt2_fast import poison
from gpt2_fast.reference import bias_gelu_ref

from ._occupancy import resident_programs
from ._reduce import sum_partials
from ._registry import check_float, check_same_device, launch, rows_2d, triton_op
from ._store import cast_for_store

BWD_STAGES = 3  # software-pipelining depth of the backward's row-tile loop (tl.range num_stages)

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gelu_gate(u):
    """sigmoid(2z) with z = sqrt(2/pi) (u + 0.044715 u^3), and dz/du."""
    z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
    return tl.sigmoid(2.0 * z), 0.7978845608028654 * (1.0 + 0.134145 * u * u)


@triton.jit
def _bias_gelu_fwd_kernel(
    X, B, Y, stride_x, stride_y, M, N,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    gate, _ = _gelu_gate(u)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_for_store(u * gate, Y), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    X, B, DY, DX, DB, stride_x, stride_dy, stride_dx, M, N, tiles_per_program,
    HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.range(0, tiles_per_program, num_stages=NUM_STAGES):  # loads of i+1.. in flight
        rows = (pid_m.to(tl.int64) * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += b[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate, dz = _gelu_gate(u)
        dx = dy * (gate + u * 2.0 * gate * (1.0 - gate) * dz)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast_for_store(dx, DX), mask=mask)
        if HAS_DB:
            db_acc += tl.where(mask, dx, 0.0)
    if HAS_DB:
        tl.store(DB + pid_m * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# host launchers (registered ops; x, dy are (M, N) with unit column stride)
# ---------------------------------------------------------------------------------------------

def _block_sizes(N: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 4096-element tiles, ~`per_thread` elements per thread."""
    BLOCK_N = min(1024, triton.next_power_of_2(N))
    BLOCK_M = max(1, 4096 // BLOCK_N)
    return BLOCK_M, BLOCK_N, min(16, max(1, BLOCK_M * BLOCK_N // (32 * per_thread)))


@triton_op("bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    M, N = x.shape
    y = poison.empty((M, N), dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, num_warps = _block_sizes(N, 16)
    launch(_bias_gelu_fwd_kernel)[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        x, bias if bias is not None else x, y, x.stride(0), y.stride(0), M, N,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )
    return y


@triton_op("bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], need_db: bool) -> tuple[Tensor, Tensor]:
    """-> (dx (M, N), dbias (N,) in bias's dtype, or an empty tensor when not needed)."""
    M, N = x.shape
    dx = poison.empty((M, N), dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, num_warps = _block_sizes(N, 8)
    need_db = need_db and bias is not None
    consts = dict(HAS_BIAS=bias is not None, HAS_DB=need_db, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  NUM_STAGES=BWD_STAGES, num_warps=num_warps)

    def args(tiles_per_program, db_part):
        return (x, bias if bias is not None else x, dy, dx, db_part, x.stride(0), dy.stride(0),
                dx.stride(0), M, N, tiles_per_program)

    col_blocks = triton.cdiv(N, BLOCK_N)
    tiles = triton.cdiv(M, BLOCK_M)
    # as many programs as fit at once, each walking a contiguous range of row tiles
    probe = poison.empty((1,), dtype=torch.float32, device=x.device)
    fit = resident_programs(_bias_gelu_bwd_kernel, args(2, probe), consts, x.device)
    row_programs = max(1, min(tiles, triton.cdiv(fit, col_blocks)))
    tiles_per_program = triton.cdiv(tiles, row_programs)
    row_programs = triton.cdiv(tiles, tiles_per_program)
    db_part = poison.empty((row_programs, N) if need_db else (0,), dtype=torch.float32, device=x.device)
    launch(_bias_gelu_bwd_kernel)[(row_programs, col_blocks)](*args(tiles_per_program, db_part), **consts)
    db = sum_partials(db_part, bias.dtype)[0] if need_db else db_part
    return dx, db


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------

class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        N = x.shape[-1]
        x2 = rows_2d(x, N)
        y = torch.ops.gpt2_fast_triton.bias_gelu_fwd(x2, bias)
        ctx.save_for_backward(x2, bias)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        need_db = bias is not None and ctx.needs_input_grad[1]
        dx, db = torch.ops.gpt2_fast_triton.bias_gelu_bwd(rows_2d(dy, x2.shape[1]), x2, bias, need_db)
        return dx.view(ctx.shape), (db if need_db else None)


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------

def bias_gelu(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """gelu_tanh(x + bias). x (..., N), bias (N,) or None -> (..., N) in x's dtype."""
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., N); got a 0-d tensor")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (x.shape[-1],):
            raise ValueError(f"bias must have shape ({x.shape[-1]},) to match x's last dim, "
                             f"got {tuple(bias.shape)}")
        check_same_device("x", x, bias=bias)
        bias = bias.contiguous()
    if x.numel() == 0:  # nothing to launch; the reference keeps autograd working
        return bias_gelu_ref(x, bias)
    return BiasGeluFunction.apply(x, bias)

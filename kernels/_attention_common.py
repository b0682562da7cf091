"""What the Triton attention kernels (flash_attention*, decode_attention) share: precision helpers,
the masked tile load, block-size and autotune-key helpers, and the checks of their q / k / v inputs.

`_dot` / `_cast_like` / `_cast_ptr` take a DOT_PREC constexpr: "ieee" (exact fp32 products),
"tf32" (16-bit inputs, or fp32 when torch allows TF32), or "bf16_interp": bf16 under
TRITON_INTERPRET=1, whose dot multiplies bf16 tiles as raw uint16 bits and whose fp32 -> bf16
casts truncate; there the operands are widened to fp32 and stores round to nearest by hand, so
the CPU tests check the same numbers a GPU computes.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (len(rows), len(cols)) tile, zero outside rows < n_rows / cols < n_cols."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_PREC is "ieee" (fp32 inputs), "tf32" (16-bit inputs:
    unused) or "bf16_interp": bf16 under TRITON_INTERPRET=1, where the operands are widened to
    fp32 first (exactly), because the Triton 3.9 interpreter's dot multiplies bf16 tiles as their
    raw uint16 bits."""
    if DOT_PREC == "bf16_interp":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PREC)
    return c


@triton.jit
def _round_bf16_interp(x):
    """Round fp32 x to the nearest bf16 value (ties to even), still as fp32. Only for the
    interpreter, whose fp32 -> bf16 cast truncates where the GPU rounds to nearest."""
    if x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _cast_like(x, like, DOT_PREC: tl.constexpr):
    """x.to(like.dtype), rounding to nearest under the interpreter too (see _round_bf16_interp)."""
    if DOT_PREC == "bf16_interp":
        y = _round_bf16_interp(x).to(like.dtype)
    else:
        y = x.to(like.dtype)
    return y


@triton.jit
def _cast_ptr(x, P, DOT_PREC: tl.constexpr):
    """x.to(P's element type) for a store, rounding to nearest (see _cast_like)."""
    if DOT_PREC == "bf16_interp":
        y = _round_bf16_interp(x).to(P.dtype.element_ty)
    else:
        y = x.to(P.dtype.element_ty)
    return y


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's default) ->
    exact fp32 products on FMA units ("ieee"); "high"/"medium" -> TF32 tensor cores, as torch's
    own matmuls then do. 16-bit inputs: unused, except bf16 in the interpreter (see _dot)."""
    if dtype == torch.bfloat16 and INTERPRET:
        return "bf16_interp"
    if dtype == torch.float32:
        return "ieee" if INTERPRET or torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"


def block_d(D: int) -> int:
    """The head dim padded to a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(D))


def t_bucket(T: int) -> int:
    """Autotune key for a length: its next power of two, so every T does not re-tune."""
    return max(16, triton.next_power_of_2(max(T, 1)))


def tl_configs(pairs):
    """triton.Config list from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


def device_ctx(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_attention_tensors(op: str, named: tuple, shape_hint: str = "") -> None:
    """Each (name, tensor) must be a float16/bfloat16/float32 4-D tensor; raise naming op and name."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D{shape_hint}, got shape {tuple(t.shape)}")


def check_head_dim(op: str, D: int) -> None:
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim must be in 1..{MAX_HEAD_DIM}, got {D}")

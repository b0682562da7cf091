"""The "cuda" and "cpp" backends of gpt2_fast/ops.py: the compiled extension gpt2_fast._C.

Three layers, as flash-attention's interface:
  torch.ops.gpt2_fast.<op>_fwd / _bwd    registered in C++ (csrc/bindings.cpp), CPU and CUDA kernels;
                                         fake (meta) shapes registered here, so torch.compile and
                                         CUDA graphs see through them
  <Op>Function(torch.autograd.Function)  forward/backward call only those ops
  <op>(...)                              the public functions, with the reference signatures
                                         (gpt2_fast/reference.py, without `upcast`)
Attention's backward: on CUDA the Triton kernel (gpt2_fast.kernels.flash_attention, it takes the
same natural-log lse; resolved once, when the extension loads), else the reference math recomputed
under autograd. On CPU, attention that
needs gradients runs the reference directly (the C++ forward serves inference). decode_attention is
inference only. float64 inputs and attention dropout go to the reference (the kernels take
fp32 / fp16 / bf16 and no dropout).
Dtypes and torch.autocast follow gpt2_fast/reference.py's rules. The C++/CUDA LayerNorms take one
dtype for x and residual and write y in it, so the wrappers cast around them: the narrower of x
and residual up to s's dtype before, y to the autocast dtype after (one cast kernel each, which
the Triton kernels avoid by storing the output dtype directly).

Loading: `import gpt2_fast._C` (built by setup.py); when that fails and GPT2_FAST_JIT=1, or a CUDA
device is present (and GPT2_FAST_JIT is not 0), the sources in csrc/ are compiled with
torch.utils.cpp_extension.load into ~/.cache/gpt2_fast/ext/ (gpt2_fast/build_ext.py). This module
imports without error in every case; `unavailable_reason(device_type)` says why it cannot run.
GPT2_FAST_SKIP_EXT=1 at run time leaves the extension unloaded.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import build_ext, reference

OPS = ("layer_norm", "add_layer_norm", "bias_gelu", "attention", "decode_attention", "lm_head_cross_entropy")
CPU_ONLY_OPS = ("lm_head_cross_entropy",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The ops "auto" takes from this backend on CPU: only those measured faster than the torch
# backend (gpt2_fast.reference, eager) on this project's CPU machine; bench/cpu_cpp_ops.py writes
# the measurement to bench/results/cpu-cpp-vs-torch.json.
# Measured 2026-11-26 on the shared 2-core x86-64 AVX2 machine (B4 T256 C768, fp32 and bf16):
# faster than the torch backend in every row of three runs (forward ~1.5-10x, fwd+bwd ~1.3-9x; CPU
# attention with gradients runs the reference itself: ~1x). The machine is shared and noisy;
# torch's own fused F.layer_norm is still faster than our LayerNorm forward.
# lm_head_cross_entropy (csrc/cpu/lm_head_loss.cpp), 2026-11-30, this machine's AMX Xeon, 1024 rows x
# 50257 x 768 (bench/results/cpu-cpp-vs-torch.json): forward 64 vs 227 ms (bf16), 274 vs 411 (fp32);
# forward + backward 305 vs 572 ms (bf16), 1144 vs 1175 (fp32); the demo's whole bf16 step (C 256)
# 299 vs 775 ms (same-process A/B).
CPU_AUTO_OPS: tuple[str, ...] = ("layer_norm", "add_layer_norm", "bias_gelu", "attention", "decode_attention",
                                 "lm_head_cross_entropy")

_C = None
_LOAD_ERROR: Optional[str] = None


def _load() -> None:
    global _C, _LOAD_ERROR
    if os.environ.get("GPT2_FAST_SKIP_EXT") == "1":
        _LOAD_ERROR = "GPT2_FAST_SKIP_EXT=1 is set: the compiled extension is not used"
        return
    try:
        from . import _C as mod  # noqa: N813
    except ImportError as e:
        not_built = f"gpt2_fast._C is not built ({e})"
        jit = os.environ.get("GPT2_FAST_JIT", "")
        if not (jit == "1" or (jit != "0" and torch.cuda.is_available())):
            _LOAD_ERROR = (not_built + "; build it with `pip install --no-build-isolation -e .` "
                           "or set GPT2_FAST_JIT=1 to compile it on first use")
            return
        cache = os.path.join(os.environ.get("GPT2_FAST_CACHE", "~/.cache/gpt2_fast"), "ext")
        print(f"gpt2_fast: compiling the extension from csrc/ (first use only; cached under {cache}) ...",
              file=sys.stderr, flush=True)
        try:
            mod = build_ext.jit_build(verbose=os.environ.get("GPT2_FAST_JIT_VERBOSE") == "1")
        except Exception as e2:  # a compiler error, missing nvcc or ninja ...
            _LOAD_ERROR = f"{not_built}; the JIT build failed: {type(e2).__name__}: {str(e2)[-2000:]}"
            return
    _C = mod
    _register_fakes()
    if _C.WITH_CUDA and torch.cuda.is_available():
        resolve_triton_attention_bwd()


def unavailable_reason(device_type: str) -> Optional[str]:
    if _C is None:
        return _LOAD_ERROR
    if device_type == "cuda" and not _C.WITH_CUDA:
        return ("gpt2_fast._C was built without CUDA kernels (torch without CUDA or no nvcc at build "
                "time); rebuild on the CUDA machine")
    if device_type not in ("cpu", "cuda"):
        return f"no kernels for device type {device_type!r}"
    return None


def supports(op: str, device_type: str) -> bool:
    if op in CPU_ONLY_OPS and device_type != "cpu":
        return False
    return op in OPS and unavailable_reason(device_type) is None


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations of the C++ ops
# ---------------------------------------------------------------------------------------------

def _bthd(t: Tensor, B: int, H: int, T: int, D: int) -> Tensor:
    """(B, H, T, D) view of (B, T, H, D) memory: the attention kernels' output layout, which the
    model's transpose(1, 2).reshape(B, T, C) then reads without a copy."""
    return t.new_empty((B, T, H, D)).transpose(1, 2)


def _register_fakes() -> None:
    reg = torch.library.register_fake
    f32 = torch.float32

    @reg("gpt2_fast::layer_norm_fwd")
    def _(x, weight, bias, eps):
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=f32), x.new_empty((x.shape[0],), dtype=f32)

    @reg("gpt2_fast::add_layer_norm_fwd")
    def _(x, residual, weight, bias, eps):
        n = x.shape[0]
        return (torch.empty_like(x), torch.empty_like(x), x.new_empty((n,), dtype=f32),
                x.new_empty((n,), dtype=f32))

    @reg("gpt2_fast::layer_norm_bwd")
    def _(dy, x, weight, mean, rstd, dresidual):
        c = x.shape[1]
        return torch.empty_like(x), x.new_empty((c,), dtype=f32), x.new_empty((c,), dtype=f32)

    @reg("gpt2_fast::bias_gelu_fwd")
    def _(x, bias):
        return torch.empty_like(x)

    @reg("gpt2_fast::bias_gelu_bwd")
    def _(dy, x, bias):
        return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=f32)

    @reg("gpt2_fast::attention_fwd")
    def _(q, k, v, causal, scale):
        B, H, T, D = q.shape
        return _bthd(q, B, H, T, D), q.new_empty((B, H, T), dtype=f32)

    @reg("gpt2_fast::decode_attention_fwd")
    def _(q, k_cache, v_cache, kv_len, kv_start, scale):
        B, H, T, D = q.shape
        return _bthd(q, B, H, T, D)

    @reg("gpt2_fast::lm_head_ce_fwd")
    def _(h, weight, targets, ignore_index, vocab_size, need_grad):
        loss = h.new_empty((), dtype=f32)
        if not need_grad:
            return loss, h.new_empty((0,), dtype=f32), h.new_empty((0,), dtype=f32)
        return loss, h.new_empty(h.shape, dtype=f32), weight.new_empty(weight.shape, dtype=f32)


# ---------------------------------------------------------------------------------------------
# autograd.Functions: forward and backward call only the registered ops
# ---------------------------------------------------------------------------------------------

def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _param_grad(g: Tensor, p: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    return g.to(p.dtype) if (p is not None and needed) else None


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = _rows(x)
        y, mean, rstd = torch.ops.gpt2_fast.layer_norm_fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.gpt2_fast.layer_norm_bwd(_rows(dy), x2, weight, mean, rstd, None)
        db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx.view(ctx.shape), _param_grad(dw, weight, ctx.needs_input_grad[1]), db, None


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        s, y, mean, rstd = torch.ops.gpt2_fast.add_layer_norm_fwd(_rows(x), _rows(residual), weight, bias, eps)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.gpt2_fast.layer_norm_bwd(_rows(dy), s, weight, mean, rstd, _rows(ds))
        dx = dx.view(ctx.shape)
        db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        return dx, dx, _param_grad(dw, weight, ctx.needs_input_grad[2]), db, None


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x2 = _rows(x)
        y = torch.ops.gpt2_fast.bias_gelu_fwd(x2, bias)
        ctx.save_for_backward(x2, bias)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        dx, db = torch.ops.gpt2_fast.bias_gelu_bwd(_rows(dy), x2, bias)
        return dx.view(ctx.shape), _param_grad(db, bias, ctx.needs_input_grad[1])


_UNRESOLVED = object()
# torch.ops.gpt2_fast_triton.attention_bwd, or None where the Triton kernel file does not import;
# resolved once, when the extension loads on a CUDA machine (resolve_triton_attention_bwd), so
# AttentionFunction.backward only reads it: no import inside a backward that torch.compile traces.
_TRITON_ATTENTION_BWD = _UNRESOLVED


def resolve_triton_attention_bwd():
    """The Triton attention backward op for CUDA attention, or None without a usable Triton;
    imports gpt2_fast.kernels.flash_attention on the first call only."""
    global _TRITON_ATTENTION_BWD
    if _TRITON_ATTENTION_BWD is _UNRESOLVED:
        try:
            import gpt2_fast.kernels.flash_attention  # noqa: F401  (registers the op)
            _TRITON_ATTENTION_BWD = torch.ops.gpt2_fast_triton.attention_bwd
        except Exception:  # no triton, or a broken install: the reference math serves backward
            _TRITON_ATTENTION_BWD = None
    return _TRITON_ATTENTION_BWD


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = torch.ops.gpt2_fast.attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        bwd = _TRITON_ATTENTION_BWD if q.is_cuda else None
        if bwd is not None and bwd is not _UNRESOLVED:
            dq, dk, dv = bwd(do, q, k, v, o, lse, ctx.causal, 0.0, ctx.scale, None)
        else:  # the reference math, recomputed (fp32 accumulation, as the reference)
            with torch.enable_grad():
                qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
                out = reference.attention_ref(qd, kd, vd, ctx.causal, 0.0, ctx.scale)
                dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), do)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------------
# public functions (the reference signatures)
# ---------------------------------------------------------------------------------------------

def _check_tensor(name: str, op: str, t, dim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_param(name: str, op: str, p, x: Tensor) -> None:
    if p is None:
        return
    _check_tensor(name, op, p)
    if p.shape != (x.shape[-1],):
        raise ValueError(f"{op}: {name} must have shape ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{op}: {name} must be on {x.device}, got {p.device}")
    if not p.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {p.dtype}")


def _kernel_ok(*ts: Tensor) -> bool:
    """The kernels take fp32 / fp16 / bf16 on CPU or CUDA; anything else goes to the reference."""
    x = ts[0]
    return (x.dtype in DTYPES and all(t.dtype == x.dtype for t in ts)
            and unavailable_reason(x.device.type) is None and x.shape[-1] > 0)


def _widen_for(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x, or x in fp32 when the kernel's output (in x's dtype) is to be cast to another 16-bit
    dtype: so y is rounded once, from fp32, as the Triton kernels round it."""
    return x if (x.dtype == out_dtype or x.dtype == torch.float32) else x.float()


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim of x (..., C); weight, bias (C,) or None. y in x's dtype, or
    in the autocast dtype under torch.autocast."""
    _check_tensor("x", "layer_norm", x)
    _check_param("weight", "layer_norm", weight, x)
    _check_param("bias", "layer_norm", bias, x)
    if not _kernel_ok(x):
        return reference.layer_norm_ref(x, weight, bias, eps)
    y_dtype = reference.layer_norm_out_dtype(x)
    return LayerNormFunction.apply(_widen_for(x, y_dtype), weight, bias, float(eps)).to(y_dtype)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(s, y): s = x + residual, y = LayerNorm(s); x, residual (..., C), dtypes may differ:
    s in the wider one, y in s's dtype, or in the autocast dtype under torch.autocast."""
    _check_tensor("x", "add_layer_norm", x)
    _check_tensor("residual", "add_layer_norm", residual)
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"add_layer_norm: residual must be on {x.device}, got {residual.device}")
    _check_param("weight", "add_layer_norm", weight, x)
    _check_param("bias", "add_layer_norm", bias, x)
    if not (_kernel_ok(x) and _kernel_ok(residual)):
        return reference.add_layer_norm_ref(x, residual, weight, bias, eps)
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    s, y = AddLayerNormFunction.apply(x.to(s_dtype), residual.to(s_dtype), weight, bias, float(eps))
    # y is rounded to s's dtype first: twice only for a 16-bit s under the other 16-bit autocast
    return s, y.to(reference.layer_norm_out_dtype(x, residual))


def bias_gelu(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """tanh-GELU(x + bias); x (..., C), bias (C,) or None."""
    _check_tensor("x", "bias_gelu", x)
    _check_param("bias", "bias_gelu", bias, x)
    if not _kernel_ok(x):
        return reference.bias_gelu_ref(x, bias)
    return BiasGeluFunction.apply(x, bias)


def _check_qkv(op: str, q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, op, t, 4)
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"{op}: expected k and v of shape (B, H, T, D) = ({B}, {H}, T, {D}) for q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")


def _lastdim_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask, aligned bottom-right]) v.
    q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D) (memory laid out as (B, Tq, H, D))."""
    _check_qkv("attention", q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0.0 or not _kernel_ok(q, k, v):
        return reference.attention_ref(q, k, v, causal, dropout_p, scale)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # CPU training: torch's fused CPU flash attention has a backward and ours has none
        # (bench/cpu_cpp_ops.py: its torch_sdpa column); Tq != Tk (causal aligned bottom-right,
        # not SDPA's top-left) takes the reference math
        if causal and q.shape[-2] != k.shape[-2]:
            return reference.attention_ref(q, k, v, causal, 0.0, scale)
        # In fp32, as the reference's scores: SDPA's bf16 CPU kernel rounds P and dS to bf16 (3x
        # the reference's dK error); the output and gradients are rounded once, to q's dtype.
        with reference._autocast_off("cpu"):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                                  scale=scale).to(q.dtype)
    return AttentionFunction.apply(_lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v), bool(causal), scale)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                     kv_start: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Tq new queries against the static KV cache (see reference.decode_attention_ref).
    q (B, H, Tq, D); k_cache, v_cache (B, H, S, D); kv_len, kv_start (B,) int. Forward only."""
    _check_qkv("decode_attention", q, k_cache, v_cache)
    B = q.shape[0]
    for name, t in (("kv_len", kv_len), ("kv_start", kv_start)):
        if t is None and name == "kv_start":
            continue
        _check_tensor(name, "decode_attention", t, 1)
        if t.shape[0] != B or t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"decode_attention: {name} must be an integer tensor of shape ({B},), got "
                            f"{t.dtype} {tuple(t.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if needs_grad or not _kernel_ok(q, k_cache, v_cache):
        return reference.decode_attention_ref(q, k_cache, v_cache, kv_len, kv_start, scale)
    kv_len = kv_len.to(q.device)
    kv_start = None if kv_start is None else kv_start.to(q.device)
    return torch.ops.gpt2_fast.decode_attention_fwd(_lastdim_contig(q), _lastdim_contig(k_cache),
                                                    _lastdim_contig(v_cache), kv_len, kv_start, scale)


class LMHeadCrossEntropyFunction(torch.autograd.Function):
    """The CPU op computes the gradients of the mean loss with the loss (its pass 2); backward
    only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, vocab_size, need_grad):
        loss, dh, dw = torch.ops.gpt2_fast.lm_head_ce_fwd(hidden, weight, targets, ignore_index, vocab_size,
                                                          need_grad)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # a plain loss.backward() sends 1: skip the two passes (g is a CPU scalar: reading it is no device sync)
        if torch.compiler.is_compiling() or g.item() != 1.0:
            dh, dw = dh * g, dw * g
        return (dh.to(h_dtype) if ctx.needs_input_grad[0] else None,
                dw.to(w_dtype) if ctx.needs_input_grad[1] else None, None, None, None, None)


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                          vocab_size: Optional[int] = None) -> Tensor:
    """CE(hidden @ weight[:vocab_size].T, targets), mean over non-ignored rows (CPU only; see
    reference.lm_head_cross_entropy_ref). hidden (N, C), weight (V_padded, C), targets (N,)."""
    _check_tensor("hidden", "lm_head_cross_entropy", hidden, 2)
    _check_tensor("weight", "lm_head_cross_entropy", weight, 2)
    V = weight.shape[0] if vocab_size is None else int(vocab_size)
    dtype = reference.matmul_dtype(hidden, weight)
    if hidden.device.type != "cpu" or dtype not in DTYPES or weight.dtype not in DTYPES:
        return reference.lm_head_cross_entropy_ref(hidden, weight, targets, ignore_index, vocab_size)
    if hidden.shape[1] != weight.shape[1] or targets.shape != (hidden.shape[0],) or not 1 <= V <= weight.shape[0]:
        raise ValueError(f"lm_head_cross_entropy: expected hidden (N, C), weight (>= vocab_size, C), targets "
                         f"(N,) with vocab_size >= 1; got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(targets.shape)}, vocab_size {vocab_size}")
    # the gradient pass only where autograd will ask for it (ctx.needs_input_grad ignores no_grad)
    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LMHeadCrossEntropyFunction.apply(hidden.to(dtype), weight, targets.long(), int(ignore_index), V, need)


_load()

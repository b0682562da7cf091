"""The one dispatcher for the fused ops: picks the triton / cuda / cpp / torch implementation.

Every fused op the model uses is called through this module. A backend is a module that
exposes functions with the reference signatures (gpt2_fast/reference.py, without `upcast`):

    torch   gpt2_fast.reference      (`<op>_ref`)   always there: the ground truth and fallback
    triton  gpt2_fast.kernels        (`<op>`)       Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1
    cuda    gpt2_fast.extension      (`<op>`)       the compiled extension gpt2_fast._C on CUDA tensors
    cpp     gpt2_fast.extension      (`<op>`)       the same extension's CPU C++ kernels

A backend that does not implement an op (for example cpp has no fused cross-entropy) falls back
to torch for that op. The choice is `GPTConfig.backend` ("auto" by default); the environment
variable GPT2_FAST_BACKEND, when set, overrides it everywhere. "auto" picks, per device, the
first usable backend of AUTO_ORDER[device type] that implements the op.
"""
from __future__ import annotations

import functools
import importlib
import os
import types
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference

OPS = ("layer_norm", "add_layer_norm", "bias_gelu", "attention", "decode_attention",
       "softmax_cross_entropy", "lm_head_cross_entropy")

BACKEND_MODULES = {
    "torch": "gpt2_fast.reference",
    "triton": "gpt2_fast.kernels",
    "cuda": "gpt2_fast.extension",
    "cpp": "gpt2_fast.extension",
}

# Which backend "auto" tries first, per device type. On CPU the cpp ops are picked per op only
# where bench/ measured them faster than torch: gpt2_fast.extension.CPU_AUTO_OPS lists those.
# Backend modules may define `unavailable_reason(device_type) -> str | None`.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}


class BackendUnavailable(RuntimeError):
    """Raised when a backend asked for by name cannot run here; the message says why."""


def requested_backend(config_backend: str = "auto") -> str:
    env = os.environ.get("GPT2_FAST_BACKEND", "").strip()
    if env:
        if env not in ("auto",) + tuple(BACKEND_MODULES):
            raise ValueError(f"GPT2_FAST_BACKEND must be one of auto, {', '.join(BACKEND_MODULES)}; "
                             f"got {env!r}")
        return env
    return config_backend


@functools.lru_cache(maxsize=None)
def _backend_module(name: str, device_type: str):
    """Import backend `name` and check that it can run on `device_type`; raise BackendUnavailable."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(BACKEND_MODULES)}")
    if name == "torch":
        return reference
    if name == "cuda" and device_type != "cuda":
        raise BackendUnavailable("backend 'cuda' needs CUDA tensors (use 'cpp' on CPU)")
    if name == "cpp" and device_type != "cpu":
        raise BackendUnavailable("backend 'cpp' runs on CPU tensors only (use 'cuda' on a GPU)")
    try:
        mod = importlib.import_module(BACKEND_MODULES[name])
    except Exception as e:  # ImportError, or a broken toolchain raising at import
        raise BackendUnavailable(f"backend {name!r} failed to import: {type(e).__name__}: {e}") from e
    why_not = getattr(mod, "unavailable_reason", lambda device_type: None)(device_type)
    if why_not:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device_type}: {why_not}")
    return mod


def _lookup(mod, name: str, op: str, device_type: str) -> Optional[Callable]:
    """The backend's function for op, or None where it has none (a backend module may define
    `supports(op, device_type) -> bool` when it implements an op on one device only)."""
    if name == "torch":
        return getattr(reference, op + "_ref")
    supports = getattr(mod, "supports", None)
    if supports is not None and not supports(op, device_type):
        return None
    fn = getattr(mod, op, None)
    if isinstance(fn, types.ModuleType):  # kernels/<op>.py, once imported, shadows its function <op>
        fn = getattr(fn, op, None)
    return fn


def backend_status(device_type: str) -> dict:
    """{backend: None if usable on device_type else the reason it is not}."""
    out = {}
    for name in BACKEND_MODULES:
        try:
            _backend_module(name, device_type)
            out[name] = None
        except BackendUnavailable as e:
            out[name] = str(e)
    return out


@functools.lru_cache(maxsize=None)
def resolve(op: str, backend: str, device_type: str) -> tuple[str, Callable]:
    """(backend name, function) that runs `op` for `backend` on `device_type`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            try:
                mod = _backend_module(name, device_type)
            except BackendUnavailable:
                continue
            if name == "cpp" and op not in getattr(mod, "CPU_AUTO_OPS", ()):
                continue
            fn = _lookup(mod, name, op, device_type)
            if fn is not None:
                return name, fn
        return "torch", getattr(reference, op + "_ref")
    mod = _backend_module(backend, device_type)  # raises with the reason when unusable
    fn = _lookup(mod, backend, op, device_type)
    if fn is None:
        return "torch", getattr(reference, op + "_ref")
    return backend, fn


def _fn(op: str, backend: str, device: torch.device) -> Callable:
    return resolve(op, requested_backend(backend), device.type)[1]


# ---------------------------------------------------------------------------------------------
# The public ops. Signatures and semantics: gpt2_fast/reference.py.
# ---------------------------------------------------------------------------------------------

def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               backend: str = "auto") -> Tensor:
    return _fn("layer_norm", backend, x.device)(x, weight, bias, eps)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(s, y): s = x + residual, y = layer_norm(s)."""
    return _fn("add_layer_norm", backend, x.device)(x, residual, weight, bias, eps)


def bias_gelu(x: Tensor, bias: Optional[Tensor], backend: str = "auto") -> Tensor:
    return _fn("bias_gelu", backend, x.device)(x, bias)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
              scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    return _fn("attention", backend, q.device)(q, k, v, causal, dropout_p, scale)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                     kv_start: Optional[Tensor] = None, scale: Optional[float] = None,
                     backend: str = "auto") -> Tensor:
    return _fn("decode_attention", backend, q.device)(q, k_cache, v_cache, kv_len, kv_start, scale)


def softmax_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                          backend: str = "auto") -> Tensor:
    return _fn("softmax_cross_entropy", backend, logits.device)(logits, targets, ignore_index)


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                          vocab_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    return _fn("lm_head_cross_entropy", backend, hidden.device)(
        hidden, weight, targets, ignore_index, vocab_size)

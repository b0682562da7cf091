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
first usable backend of AUTO_ORDER[device type] that implements the op, after the backend a
committed GPU measurement chose for it (OP_CHOICE_FILES: bench/results/cuda-op-choice.json).

Dispatch is decided once, outside traced code: `dispatch(backend)` returns a `Kernels` whose
per-device tables of functions are resolved when it is made (GPT2_FAST_BACKEND and the
`attention_fwd` choice are read then, not per call). The model and patch_hf hold one and call
`kernels.layer_norm(...)`: a forward does one dict read and no imports, so
`torch.compile(fullgraph=True)` traces a whole training step with zero graph breaks. The
module-level functions below (`layer_norm(..., backend="auto")`) are the same ops for callers that
name a backend per call; they re-read the environment each call (eager use, tests, benchmarks).
"""
from __future__ import annotations

import functools
import importlib
import os
import types
from typing import Callable, Optional

import torch.nn.functional as F

import torch
from torch import Tensor

from . import reference
from .choices import CHOICES, choice

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

# "auto" first honours a committed table of GPU measurements, per device type, read once:
# {op or "attention_bwd": {"backend": name, "measured": "bench/results/<file>" or null}}. Only
# entries with a "measured" file count (null = today's default, written down); a measured backend
# that cannot run here falls back to AUTO_ORDER. "attention" may name "sdpa" (torch SDPA forward
# and backward: cuDNN / flash on Hopper); "attention_bwd" names a side of choices.py's
# attention_bwd (triton_det | triton_atomic | sdpa) for our Triton attention, unless
# GPT2_FAST_ATTN_BWD forces one.
OP_CHOICE_FILES = {
    "cuda": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "bench", "results", "cuda-op-choice.json"),
}
_TABLE_SIDES = {"attention": ("triton", "cuda", "torch", "sdpa"),
                "attention_bwd": ("triton_det", "triton_atomic", "sdpa")}


@functools.lru_cache(maxsize=None)
def measured_choices(device_type: str) -> dict:
    """{op: backend} of the measured entries of OP_CHOICE_FILES[device_type] ({} without one)."""
    path = OP_CHOICE_FILES.get(device_type)
    if not path or not os.path.isfile(path):
        return {}
    import json
    with open(path) as f:
        table = json.load(f)
    out = {}
    for op, entry in table.items():
        if op.startswith("_"):
            continue  # comments
        sides = _TABLE_SIDES.get(op, tuple(BACKEND_MODULES) if op in OPS else None)
        if sides is None or not isinstance(entry, dict) or entry.get("backend") not in sides:
            raise ValueError(f"{path}: entry {op!r} must be an op of {OPS} or attention_bwd with "
                             f'"backend" one of {sides}; got {entry!r}')
        if entry.get("measured"):
            out[op] = entry["backend"]
    return out


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
        measured = measured_choices(device_type).get(op)
        if measured == "sdpa":  # only "attention" may name it; GPT2_FAST_ATTN_FWD, when set, wins
            if not os.environ.get(CHOICES["attention_fwd"].env):
                return "sdpa", sdpa_attention
            measured = None
        order = AUTO_ORDER.get(device_type, ("torch",))
        for name in ((measured,) if measured else ()) + order:
            try:
                mod = _backend_module(name, device_type)
            except BackendUnavailable:
                continue
            if name == "cpp" and name != measured and op not in getattr(mod, "CPU_AUTO_OPS", ()):
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


# ---------------------------------------------------------------------------------------------
# torch SDPA as the attention forward (choice "attention_fwd" = "sdpa", CUDA)
# ---------------------------------------------------------------------------------------------

def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
                   scale: Optional[float] = None) -> Tensor:
    """ops.attention's semantics on torch's scaled_dot_product_attention (its backward too).

    q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D). causal aligns bottom-right as ours
    (query i sees key j <= i + Tk - Tq); SDPA's is_causal is top-left, so Tq != Tk takes a mask.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if causal and Tq != Tk:
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)  # (Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


# ---------------------------------------------------------------------------------------------
# Kernels: the ops of one backend choice, resolved once
# ---------------------------------------------------------------------------------------------

class _Unavailable:
    """Stands in for an op whose requested backend cannot run on a device: raises when called
    (a model may be built where its backend cannot run, and moved before it runs)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, *args, **kwargs):
        raise BackendUnavailable(self.reason)


def _device_types_now() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def _resolve_table(backend: str, device_type: str, attention_fwd: str) -> tuple[dict, dict]:
    """({op: function}, {op: backend name}) for one device type."""
    fns, names = {}, {}
    for op in OPS:
        try:
            names[op], fns[op] = resolve(op, backend, device_type)
        except BackendUnavailable as e:
            names[op], fns[op] = "unavailable", _Unavailable(str(e))
    if device_type == "cuda" and names["attention"] == "triton" and attention_fwd == "sdpa":
        names["attention"], fns["attention"] = "sdpa", sdpa_attention
    bwd = measured_choices(device_type).get("attention_bwd") if backend == "auto" else None
    if bwd and names["attention"] == "triton" and not os.environ.get(CHOICES["attention_bwd"].env):
        # the measured side, set once before anything is traced (the kernel reads this constant)
        importlib.import_module("gpt2_fast.kernels.flash_attention").BWD_VARIANT = bwd
    return fns, names


class Kernels:
    """The fused ops of one backend, each resolved once per device type.

    Made by `dispatch(backend)`; tables for "cpu" (and "cuda" when present) are resolved at once,
    any other device type on its first call. Calls do one dict read, so torch.compile traces
    straight into the chosen implementation. Shared and immutable: copying returns it; pickling
    resolves it again where it is loaded.
    """

    def __init__(self, backend: str, attention_fwd: str):
        self.backend, self.attention_fwd = backend, attention_fwd
        self._fns: dict[str, dict] = {}
        self._names: dict[str, dict] = {}
        for device_type in _device_types_now():
            self._table(device_type)

    def _table(self, device_type: str) -> dict:
        fns = self._fns.get(device_type)
        if fns is None:  # a device type first met here (eager only: this resolves and imports)
            fns, self._names[device_type] = _resolve_table(self.backend, device_type, self.attention_fwd)
            self._fns[device_type] = fns
        return fns

    def names(self, device_type: str) -> dict:
        """{op: the backend that runs it on device_type} ("sdpa" for the SDPA attention forward)."""
        self._table(device_type)
        return dict(self._names[device_type])

    def __repr__(self) -> str:
        return f"Kernels(backend={self.backend!r}, attention_fwd={self.attention_fwd!r})"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _kernels_for, (self.backend, self.attention_fwd)

    # The ops. Signatures and semantics: gpt2_fast/reference.py.
    def layer_norm(self, x, weight, bias, eps=1e-5):
        return self._table(x.device.type)["layer_norm"](x, weight, bias, eps)

    def add_layer_norm(self, x, residual, weight, bias, eps=1e-5):
        return self._table(x.device.type)["add_layer_norm"](x, residual, weight, bias, eps)

    def bias_gelu(self, x, bias):
        return self._table(x.device.type)["bias_gelu"](x, bias)

    def attention(self, q, k, v, causal=True, dropout_p=0.0, scale=None):
        return self._table(q.device.type)["attention"](q, k, v, causal, dropout_p, scale)

    def decode_attention(self, q, k_cache, v_cache, kv_len, kv_start=None, scale=None):
        return self._table(q.device.type)["decode_attention"](q, k_cache, v_cache, kv_len, kv_start, scale)

    def softmax_cross_entropy(self, logits, targets, ignore_index=-100):
        return self._table(logits.device.type)["softmax_cross_entropy"](logits, targets, ignore_index)

    def lm_head_cross_entropy(self, hidden, weight, targets, ignore_index=-100, vocab_size=None):
        return self._table(hidden.device.type)["lm_head_cross_entropy"](
            hidden, weight, targets, ignore_index, vocab_size)


_KERNELS: dict[tuple[str, str], Kernels] = {}


def _kernels_for(backend: str, attention_fwd: str) -> Kernels:
    key = (backend, attention_fwd)
    if key not in _KERNELS:
        _KERNELS[key] = Kernels(backend, attention_fwd)
    return _KERNELS[key]


def dispatch(backend: str = "auto") -> Kernels:
    """The Kernels for `backend` ("auto" | "torch" | "triton" | "cuda" | "cpp"), GPT2_FAST_BACKEND
    and the attention_fwd choice (GPT2_FAST_ATTN_FWD) applied as they are set now."""
    if backend not in ("auto",) + tuple(BACKEND_MODULES):
        raise ValueError(f"unknown backend {backend!r}; expected one of auto, {', '.join(BACKEND_MODULES)}")
    return _kernels_for(requested_backend(backend), choice("attention_fwd"))


# ---------------------------------------------------------------------------------------------
# The public ops with a backend per call. Signatures and semantics: gpt2_fast/reference.py.
# ---------------------------------------------------------------------------------------------

def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               backend: str = "auto") -> Tensor:
    return dispatch(backend).layer_norm(x, weight, bias, eps)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(s, y): s = x + residual, y = layer_norm(s)."""
    return dispatch(backend).add_layer_norm(x, residual, weight, bias, eps)


def bias_gelu(x: Tensor, bias: Optional[Tensor], backend: str = "auto") -> Tensor:
    return dispatch(backend).bias_gelu(x, bias)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
              scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    return dispatch(backend).attention(q, k, v, causal, dropout_p, scale)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                     kv_start: Optional[Tensor] = None, scale: Optional[float] = None,
                     backend: str = "auto") -> Tensor:
    return dispatch(backend).decode_attention(q, k_cache, v_cache, kv_len, kv_start, scale)


def softmax_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                          backend: str = "auto") -> Tensor:
    return dispatch(backend).softmax_cross_entropy(logits, targets, ignore_index)


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                          vocab_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    return dispatch(backend).lm_head_cross_entropy(hidden, weight, targets, ignore_index, vocab_size)

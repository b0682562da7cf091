"""Triton kernels for gpt2_fast's fused ops, installed as the subpackage `gpt2_fast.kernels`.

One file per op (layer_norm, bias_gelu, flash_attention, decode_attention, cross_entropy), each
reading top-down: @triton.jit kernels -> host launchers -> autograd.Function -> public function.
This module is the "triton" backend of gpt2_fast/ops.py: it exports one function per op with
the reference signature (gpt2_fast/reference.py) and `unavailable_reason(device_type)`.
"""
from __future__ import annotations

import os
from typing import Optional


def unavailable_reason(device_type: str) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton is not importable ({type(e).__name__}: {e})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before import)"
    if device_type not in ("cpu", "cuda"):
        return f"no Triton target for device type {device_type!r}"
    return None


# op name -> the file (kernels/<file>.py) that defines it; imported on first use, so that
# `import gpt2_fast.kernels` stays cheap and works where Triton is missing.
_EXPORTS = {
    "layer_norm": "layer_norm",
    "add_layer_norm": "layer_norm",
    "bias_gelu": "bias_gelu",
    "attention": "flash_attention",
    "decode_attention": "decode_attention",
    "softmax_cross_entropy": "cross_entropy",
    "lm_head_cross_entropy": "cross_entropy",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    try:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{_EXPORTS[name]}":  # that kernel file does not exist (yet)
            raise AttributeError(f"no Triton kernel for {name!r}: kernels/{_EXPORTS[name]}.py is missing") from e
        raise
    return getattr(module, name)

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

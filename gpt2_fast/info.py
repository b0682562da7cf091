"""`gpt2-fast info`: the device, library versions, and which kernel backends can run here."""
from __future__ import annotations

import importlib
import json
import os
import platform

import torch

from . import ops


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:
        return f"not available ({type(e).__name__})"


def extension_lines() -> list[str]:
    """Whether gpt2_fast._C is there, and if not, loudly: why, and how to get it."""
    from . import extension
    from .build_ext import csrc_dir
    here = os.path.dirname(os.path.abspath(__file__))
    build = {}
    try:
        with open(os.path.join(here, "_build_info.json")) as f:  # written by setup.py's build_py
            build = json.load(f)
    except (OSError, ValueError):
        pass
    why = extension.unavailable_reason("cpu")
    if why is None:
        return [f"extension: gpt2_fast._C loaded ({extension._C.__file__})"]
    sources = csrc_dir()
    lines = ["WARNING: the compiled extension gpt2_fast._C is NOT available: the cpp/cuda backends are off",
             f"  reason: {why}"]
    if build.get("extension") == "skipped":
        lines.append(f"  this install was built without it: {build.get('reason')}")
    lines.append(f"  JIT sources: {sources}" if sources else
                 "  JIT sources: not found (reinstall from a wheel or checkout that has csrc/)")
    lines.append("  fix: pip install --no-build-isolation .   or   GPT2_FAST_JIT=1 (compiles on first use)")
    return lines


def info_lines() -> list[str]:
    lines = [f"gpt2_fast {_version('gpt2_fast')}  python {platform.python_version()}  "
             f"torch {torch.__version__}  triton {_version('triton')}  "
             f"transformers {_version('transformers')}  tiktoken {_version('tiktoken')}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device: cuda ({p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                     f"CUDA {torch.version.cuda})")
        device_types = ["cuda", "cpu"]
    else:
        lines.append(f"device: cpu ({platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads); no CUDA device")
        device_types = ["cpu"]
    lines += extension_lines()
    env = ops.requested_backend("auto")
    lines.append(f"backend requested: {env} (GPT2_FAST_BACKEND or GPTConfig.backend)")
    for dt in device_types:
        lines.append(f"backends on {dt}:")
        for name, why in ops.backend_status(dt).items():
            if name in ("cuda",) and dt == "cpu" or name == "cpp" and dt == "cuda":
                continue
            lines.append(f"  {name:7s} {'usable' if why is None else 'unusable: ' + why}")
        lines.append(picks_line(dt))
    return lines


def picks_line(device_type: str) -> str:
    """What a model built now runs per op on device_type: the requested backend resolved as the
    model's dispatch resolves it (ops.dispatch: the measured table and the attention_fwd choice
    applied), attention with what runs its backward where that differs."""
    kernels = ops.dispatch("auto")
    names = kernels.names(device_type)
    names["attention"] = attention_pick(names["attention"], device_type)
    return f"  {kernels.backend} picks: " + ", ".join(f"{op}={b}" for op, b in names.items())


def attention_pick(name: str, device_type: str) -> str:
    """name, plus the implementation that runs attention with gradients when it is another."""
    if name == "sdpa":
        return "sdpa (torch SDPA forward and backward)"
    if name == "cpp" and device_type == "cpu":  # gpt2_fast.extension.attention: no C++ backward
        return "cpp (with gradients: torch SDPA)"
    if name == "triton" and device_type == "cuda":  # its backward variant, fixed when dispatch resolved
        fa = importlib.import_module("gpt2_fast.kernels.flash_attention")
        return f"triton (backward: {fa.BWD_VARIANT})"
    if name == "cuda" and device_type == "cuda":  # the extension's backward: the Triton op, else the reference
        from .extension import resolve_triton_attention_bwd
        if resolve_triton_attention_bwd() is None:
            return "cuda (backward: torch reference, no usable Triton)"
        fa = importlib.import_module("gpt2_fast.kernels.flash_attention")
        return f"cuda (backward: triton {fa.BWD_VARIANT})"
    return name

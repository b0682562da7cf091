"""Output allocation for kernels: NaN-filled under GPT2_FAST_POISON=1 (the tests set it).

Kernel launchers allocate their outputs with `empty` / `empty_like` from here, so that an
element a kernel forgets to write shows up as NaN in the tests instead of stale memory.
"""
from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("GPT2_FAST_POISON") == "1"


def _poison(t: torch.Tensor) -> torch.Tensor:
    if ENABLED and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty(*shape, dtype=None, device=None) -> torch.Tensor:
    return _poison(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return _poison(torch.empty_like(t, dtype=dtype))

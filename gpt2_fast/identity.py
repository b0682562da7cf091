"""Cheap identities of a model's tensors, checked on every generate call.

The engine (gpt2_fast/engine.py) and the CPU decoder (gpt2_fast/cpu_decode.py) keep work done for a
model's tensors (CUDA graphs, packed tensor lists) as long as the model still holds the very same
tensors. nn.Module.parameters() / buffers() / modules() walk the module tree through nested
generators once per call: three walks cost ~2.7 ms for gpt2, per generate call. One walk over the
`_modules` / `_parameters` / `_buffers` dicts gives the same facts in a fraction of that.
"""
from __future__ import annotations

from torch import nn


def walk_modules(model: nn.Module) -> list[nn.Module]:
    """Every module under model (itself first), each once."""
    out, seen, stack = [], set(), [model]
    while stack:
        mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        out.append(mod)
        stack.extend(c for c in reversed(mod._modules.values()) if c is not None)
    return out


def tensor_identity(modules: list[nn.Module], skip: tuple = ()) -> tuple:
    """(data_ptr, dtype) of every parameter and buffer of these modules (modules of a type in skip
    left out): a new tensor, storage or dtype anywhere changes it."""
    return tuple((t.data_ptr(), t.dtype) for mod in modules if not isinstance(mod, skip)
                 for d in (mod._parameters, mod._buffers) for t in d.values() if t is not None)

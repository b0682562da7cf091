"""One loader for every place a model can come from: `load_model(path)`.

`path` may be
  - an HF GPT-2 folder (config.json + model.safetensors / pytorch_model.bin / a sharded index),
  - a training checkpoint file (ckpt_*.pt, or any file written by gpt2_fast.checkpoint),
  - a training output folder (`gpt2-fast train --out D`): its latest ckpt_*.pt,
  - a preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl): the HF hub (or its local cache).
An existing path always wins over a preset name. A folder with HF weights is read as HF even if
it also holds checkpoints. Used by `generate --model`, `eval --model`, `export` and
`train --init_from`; every failure is a ValueError / FileNotFoundError / CheckpointError whose
message names the path and what was expected.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .config import PRESETS, GPTConfig

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
EXPECTED = ("an HF GPT-2 folder (config.json + model.safetensors or pytorch_model.bin), a training "
            "checkpoint (.pt), a training output folder (holding ckpt_*.pt) or a preset name "
            f"({', '.join(PRESETS)})")


def resolve(path: str) -> tuple[str, str]:
    """(kind, location) for `path`: kind is "hf" (a folder), "checkpoint" (a file) or "preset"."""
    from .checkpoint import list_checkpoints
    if not isinstance(path, str) or not path:
        raise ValueError(f"expected a model path or preset name, got {path!r}")
    if os.path.isfile(path):
        base = os.path.basename(path)
        if base in ("model.safetensors", "pytorch_model.bin") or base.endswith(".safetensors"):
            raise ValueError(f"{path} is an HF weight file: pass the folder that holds it and its "
                             f"config.json ({os.path.dirname(path) or '.'})")
        return "checkpoint", path
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in HF_WEIGHT_FILES):
            return "hf", path
        found = list_checkpoints(path)
        if found:
            return "checkpoint", found[-1]
        cfg = os.path.join(path, "config.json")
        if os.path.exists(cfg) and not _is_hf_config(cfg):
            raise FileNotFoundError(f"{path} looks like a training output folder but holds no "
                                    f"checkpoints (ckpt_*.pt); train longer or pass a checkpoint")
        if os.path.exists(cfg):
            raise FileNotFoundError(f"{path} has config.json but no model.safetensors, "
                                    f"pytorch_model.bin or sharded index")
        raise FileNotFoundError(f"folder {path} holds no model: expected {EXPECTED}")
    if path in PRESETS:
        return "preset", path
    raise FileNotFoundError(f"model {path!r} does not exist: expected {EXPECTED}")


def _is_hf_config(path: str) -> bool:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return True  # let the HF loader report what is wrong with it
    return isinstance(d, dict) and ("n_embd" in d or "model_type" in d)


def load_model(path: str, dtype: Optional[torch.dtype] = None, device=None,
               **config_overrides):
    """The GPT stored at `path` (see the module docstring), in eval mode.

    dtype: None keeps the stored dtype (fp32 for training checkpoints); device: None is CPU.
    config_overrides: GPTConfig fields to change (e.g. dropout, backend for fine-tuning).
    """
    from .model import GPT
    kind, where = resolve(path)
    if kind == "checkpoint":
        model = _from_checkpoint(where, config_overrides)
    else:
        model = GPT.from_pretrained(where, **config_overrides)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def _from_checkpoint(path: str, overrides: dict):
    from .checkpoint import load_checkpoint, model_from_state
    state = load_checkpoint(path)
    if overrides:
        unknown = sorted(set(overrides) - set(GPTConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}")
        state = dict(state, model_config={**state["model_config"], **overrides})
    return model_from_state(state)


def describe(path: str) -> str:
    """A short human description of what load_model(path) reads (for log lines)."""
    kind, where = resolve(path)
    return {"hf": f"HF checkpoint {where}", "checkpoint": f"checkpoint {where}",
            "preset": f"pretrained {where} (HF hub)"}[kind]

"""Training checkpoints: atomic writes, the last K kept, clear errors on load.

A checkpoint is one torch.save file, `ckpt_{step:08d}.pt`, holding plain data only (so it loads
with torch.load(weights_only=True), mapped to CPU first):

    format, version, step        "gpt2_fast.checkpoint", 1, optimizer steps done
    model_config, train_config   dataclasses.asdict of GPTConfig / TrainConfig
    model, optimizer             state_dicts (full, unsharded)
    rng                          per-rank python / numpy / torch / cuda generator states
    data                         the train loader's position (TokenLoader.state_dict)
    metrics                      last train / val loss, tokens seen, ...

Writes go through gpt2_fast.atomic (temp file, fsync, rename): a crash, kill or full disk in
the middle of a write leaves the previous checkpoints as they were. Older checkpoints are
deleted only after the new one is on disk, and only those of lower steps (a folder holds one
run: gpt2_fast.run_dir). `best.pt` (keep-best) holds the weights of the lowest val loss so far,
without optimizer state: it loads as a model, not for --resume.

A tied lm_head (GPT-2's: the same tensor as transformer.wte.weight) is stored once, under
transformer.wte.weight; `model_state_dict` leaves lm_head.weight out (on CUDA, copying both
names to CPU would otherwise write the 50257 x C matrix twice) and loading re-ties it.
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Optional

import numpy as np
import torch

from .atomic import atomic_write
from .config import GPTConfig

FORMAT = "gpt2_fast.checkpoint"
VERSION = 1
_NAME_RE = re.compile(r"^ckpt_(\d+)\.pt$")
BEST = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """The python, numpy, torch and CUDA generator states of this process, as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------

def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt_{step:08d}.pt")


def checkpoint_step(path: str) -> int:
    """The step number of a ckpt_{step}.pt path."""
    return int(_NAME_RE.match(os.path.basename(path)).group(1))


def model_state_dict(model) -> dict:
    """model.state_dict() on CPU, a tied lm_head.weight left out (stored once, as wte's)."""
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if model.lm_head.weight is model.transformer.wte.weight:
        sd.pop("lm_head.weight", None)
    return sd


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoints in out_dir, oldest first (by step)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), f) for f in os.listdir(out_dir) if (m := _NAME_RE.match(f))]
    return [os.path.join(out_dir, f) for _, f in sorted(found)]


def save_checkpoint(path: str, state: dict) -> None:
    """Write `state` to path atomically. Raises CheckpointError (previous files untouched)."""
    state = {"format": FORMAT, "version": VERSION, **state}
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # ENOSPC comes as OSError, or RuntimeError from torch.save
        others = [p for p in list_checkpoints(folder) if os.path.abspath(p) != os.path.abspath(path)]
        kept = f"the previous checkpoint {others[-1]} is intact" if others else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path}: {type(e).__name__}: {e}; {kept}") from e


class CheckpointManager:
    """Saves ckpt_{step}.pt in out_dir and keeps the newest `keep_last` of them."""

    def __init__(self, out_dir: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.out_dir, self.keep_last = out_dir, keep_last

    def save(self, step: int, state: dict) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        self._remove_stale_temps()
        path = checkpoint_path(self.out_dir, step)
        save_checkpoint(path, {"step": step, **state})
        older = [p for p in list_checkpoints(self.out_dir) if checkpoint_step(p) < step]
        for old in older[:max(0, len(older) - (self.keep_last - 1))]:
            os.unlink(old)
        return path

    def save_best(self, step: int, state: dict) -> str:
        """best.pt: the model weights and configs of `state` (no optimizer / RNG / data position)."""
        path = os.path.join(self.out_dir, BEST)
        keep = {k: state[k] for k in ("model_config", "train_config", "model", "metrics") if k in state}
        save_checkpoint(path, {"step": step, "resumable": False, **keep})
        return path

    def latest(self) -> Optional[str]:
        found = list_checkpoints(self.out_dir)
        return found[-1] if found else None

    def _remove_stale_temps(self) -> None:
        """Temp files left by a killed writer (atomic_write's .tmp-ckpt_* prefix)."""
        for tmp in glob.glob(os.path.join(self.out_dir, ".tmp-ckpt_*")) + \
                glob.glob(os.path.join(self.out_dir, f".tmp-{BEST}-*")):
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# read
# ---------------------------------------------------------------------------------------------

def load_checkpoint(path: str) -> dict:
    """Load a checkpoint to CPU. A missing, truncated, corrupt or foreign file raises
    CheckpointError / FileNotFoundError naming it (and the other checkpoints beside it)."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoints (ckpt_*.pt) in folder {path}")
        path = found[-1]
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (str(e).splitlines() or ["empty file" if os.path.getsize(path) == 0 else ""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete and cannot be loaded "
                              f"({type(e).__name__}: {why}){_alternatives(path)}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gpt2_fast training checkpoint (no format={FORMAT!r} "
                              f"entry); for HF weights pass the directory instead")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}, this gpt2_fast "
                              f"reads version {VERSION}")
    for key in ("step", "model_config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry")
    return state


def _alternatives(path: str) -> str:
    others = [p for p in list_checkpoints(os.path.dirname(os.path.abspath(path)))
              if os.path.abspath(p) != os.path.abspath(path)]
    if not others:
        return ""
    return f"; other checkpoints in that folder: {', '.join(os.path.basename(p) for p in others)} " \
           f"(resume from one with --resume {others[-1]})"


def model_from_state(state: dict):
    from .model import GPT
    config = GPTConfig.from_dict(state["model_config"])
    model = GPT(config)
    sd = state["model"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if model.lm_head.weight is model.transformer.wte.weight:
        missing = [k for k in missing if k != "lm_head.weight"]  # tied: stored once, as wte's
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model


def load_model_from_checkpoint(path: str):
    """The GPT stored in a training checkpoint (on CPU, fp32 as trained, train mode off)."""
    return model_from_state(load_checkpoint(path)).eval()

"""Where `gpt2-fast train` writes its records: log.jsonl always (rank 0), TensorBoard and
Weights & Biases when asked for and installed (one line says so when one is asked for but
missing; training goes on with log.jsonl).

A record is a flat dict with `kind` ("train", "eval", "sample", "resume") and `step`; numbers
go to TensorBoard as `<kind>/<key>` scalars and to wandb as `<kind>/<key>`.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional


def _say(msg: str) -> None:
    print(f"gpt2-fast train: {msg}", file=sys.stderr, flush=True)


def _open_tensorboard(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _say("--tensorboard: tensorboard is not installed (pip install tensorboard); "
             "logging to log.jsonl only")
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


def _open_wandb(project: str, name: str, config: dict):
    try:
        import wandb
    except ImportError:
        _say("--wandb: wandb is not installed (pip install wandb); logging to log.jsonl only")
        return None
    return wandb.init(project=project, name=name, config=config)


class TrainLogger:
    """log.jsonl (appended; the run folder's rules drop records past a resumed step) + optional
    TensorBoard / wandb. Inactive (every call a no-op) on ranks other than 0."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "gpt2-fast", wandb_run_name: str = "", config: Optional[dict] = None):
        self.enabled = enabled
        self.f = self.tb = self.wb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.f = open(os.path.join(out_dir, "log.jsonl"), "a")
        if tensorboard:
            self.tb = _open_tensorboard(out_dir)
        if wandb:
            name = wandb_run_name or os.path.basename(os.path.abspath(out_dir))
            self.wb = _open_wandb(wandb_project, name, config or {})

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        kind, step = record.get("kind", "train"), record.get("step", 0)
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None and scalars:
            self.wb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
        self.enabled = False

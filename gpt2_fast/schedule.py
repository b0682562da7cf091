"""The learning-rate schedule of `gpt2-fast train`: linear warmup, then a cosine to min_lr.

Raising (or lowering) max_steps on --resume re-anchors the cosine at the resumed step: it runs
from the rate the old schedule had reached there down to min_lr at the new max_steps, so the rate
never jumps back up. With time_schedule (the demo), the decay follows the wall clock instead.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .config import TrainConfig


WARMUP_TIME_FRACTION = 0.05  # with time_schedule, warmup also ends after this share of max_seconds


def lr_at(cfg: TrainConfig, step: int, anchor: Optional[dict] = None, elapsed: Optional[float] = None) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine down to min_lr at
    max_steps.

    anchor {"step": k, "lr": lr_k}: set when a run is resumed at step k with another max_steps;
    from step k on, the cosine runs from lr_k (the rate the old schedule had reached, so there is
    no jump) down to min_lr at the new max_steps. elapsed (seconds, with cfg.time_schedule): the
    decay's progress is the larger of the step and the time fraction (of max_seconds), and the
    warmup ends after warmup_steps or WARMUP_TIME_FRACTION of the time, whichever comes first (a
    slow machine must not spend its whole budget warming up)."""
    timed = cfg.time_schedule and elapsed is not None
    if step < cfg.warmup_steps and not timed:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start, top = cfg.warmup_steps, cfg.lr
    if anchor is not None and step >= anchor["step"]:
        start, top = anchor["step"], anchor["lr"]
    progress = max(0, step - start) / max(1, cfg.max_steps - start)
    warm = 1.0
    if timed:
        progress = max(progress, elapsed / cfg.max_seconds)
        warm = min(1.0, max((step + 1) / max(1, cfg.warmup_steps), elapsed / (WARMUP_TIME_FRACTION * cfg.max_seconds)))
    progress = min(1.0, progress)
    return warm * (cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (top - cfg.min_lr))


def schedule_anchor(saved_cfg: dict, saved_metrics: dict, step: int, cfg: TrainConfig) -> Optional[dict]:
    """The lr_at anchor of a run resumed at `step`: the saved one, or a new one where max_steps
    changed after the warmup (the cosine then continues from the rate reached, see lr_at)."""
    anchor = saved_metrics.get("lr_anchor")
    old_max = saved_cfg.get("max_steps", cfg.max_steps)
    if old_max == cfg.max_steps or step < cfg.warmup_steps:
        return anchor
    old = dataclasses.replace(cfg, max_steps=old_max, time_schedule=False)
    return {"step": step, "lr": lr_at(old, step, anchor)}

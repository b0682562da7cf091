"""Starting a run in its folder: lock it, decide fresh or resume, and check that a resume
keeps what must not change (everything outside config.RUN_CONTROL_FIELDS, and the global
batch: tokens per optimizer step, however they are split over processes and accumulation)."""
from __future__ import annotations

import os
import sys
from typing import Optional

from . import run_dir
from .checkpoint import BEST, checkpoint_step, list_checkpoints, load_checkpoint
from .config import RUN_CONTROL_FIELDS, TrainConfig
from .distributed import Dist, broadcast_error, broadcast_object
from .run_dir import RunLock


def _saved_tokens_per_step(saved: dict, world_size: int) -> tuple[int, str]:
    """(tokens per optimizer step, how they were made) of a checkpoint's train_config."""
    B, T = saved.get("batch_size", 0), saved.get("seq_len", 0)
    total = saved.get("total_batch_size", 0)
    accum = total // max(1, B * T * world_size) if total else saved.get("grad_accum", 1)
    return B * T * accum * world_size, f"{B} x {T} x {accum} accum x {world_size} process(es)"


def resume_mismatch(saved: dict, saved_world: int, cfg: TrainConfig, world_size: int) -> list[str]:
    """What differs between a checkpoint's train_config and cfg that a resume cannot take: every
    field outside RUN_CONTROL_FIELDS, and the global batch (tokens per optimizer step, which may
    be split differently over processes, micro-batches and accumulation)."""
    now = cfg.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in RUN_CONTROL_FIELDS and k in saved and saved[k] != now[k]]
    if "batch_size" in saved:
        was, how = _saved_tokens_per_step(saved, saved_world)
        is_ = cfg.tokens_per_step(world_size)
        if was != is_:
            diff.append(f"tokens per optimizer step: checkpoint {was:,} ({how}), now {is_:,} ({cfg.batch_size} "
                        f"x {cfg.seq_len} x {cfg.accum_steps(world_size)} accum x {world_size} process(es)); "
                        f"set --total_batch_size={was}")
    return diff


def open_run_dir(cfg: TrainConfig, d: Dist, lock: RunLock) -> tuple[Optional[str], Optional[dict]]:
    """Lock the run folder and find what to resume (rank 0 decides, every rank gets the answer):
    (checkpoint path or None, its state or None)."""
    path, err = None, None
    if d.master:
        try:
            lock.acquire()
            path = _resume_path(cfg)
            if path is None:
                run_dir.prepare_fresh(cfg.out_dir, cfg.overwrite, logs_only_ok=cfg.resume == "auto")
        except (ValueError, OSError) as e:
            lock.release()
            if not d.enabled:
                raise
            err = str(e)
    err = broadcast_error(err, d)
    if err:
        raise run_dir.RunDirError(err)
    path = broadcast_object(path, d)
    return path, (load_checkpoint(path) if path else None)


def _resume_path(cfg: TrainConfig) -> Optional[str]:
    """The checkpoint a run resumes from (None: a fresh run); refuses to resume from a checkpoint
    older than others in the run folder unless --overwrite (which then deletes the newer ones)."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        path = list_checkpoints(cfg.out_dir)[-1] if list_checkpoints(cfg.out_dir) else None
        if path is None:
            print(f"gpt2-fast train: resume=auto but no checkpoint in {cfg.out_dir}; starting fresh",
                  file=sys.stderr)
        return path
    path = list_checkpoints(cfg.resume)[-1] if os.path.isdir(cfg.resume) and list_checkpoints(cfg.resume) \
        else cfg.resume
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint file (or folder with ckpt_*.pt)")
    if os.path.basename(path) == BEST:
        raise ValueError(f"--resume {path}: best.pt holds the weights only (no optimizer state); resume "
                         f"from a ckpt_*.pt, or fine-tune from it with --init_from {path}")
    step = int(load_checkpoint(path)["step"])
    newer = [p for p in list_checkpoints(cfg.out_dir) if checkpoint_step(p) > step]
    if newer and not cfg.overwrite:
        raise ValueError(f"run folder {cfg.out_dir} holds checkpoints newer than step {step} "
                         f"({', '.join(os.path.basename(p) for p in newer)}); resuming there would mix two "
                         f"histories: --resume=auto continues the newest, --overwrite deletes the newer ones")
    for p in newer:
        os.unlink(p)
    return path

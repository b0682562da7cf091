"""The run folder of `gpt2-fast train`: one run per folder, a lock, a log without duplicates.

What a run writes there (RUN_FILES): ckpt_{step:08d}.pt, best.pt, log.jsonl, config.json,
loss.png, tb/ and the lock file .lock. The rules:

  - a fresh run refuses a folder that is not empty (an older run's checkpoints would be pruned or
    reported as this run's, its log mixed with this one's); --overwrite deletes the earlier run's
    RUN_FILES only, never other files;
  - --resume continues the run in it; records of log.jsonl past the resumed step (written after
    that checkpoint by the run that was stopped) are dropped, so every step is logged once;
  - a lock file (.lock: pid and host) keeps a second run out while one is running; the lock of a
    process that is no longer alive (same host) is taken over.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from typing import Optional

from .atomic import atomic_write
from .owned_tmpdir import pid_alive

LOCK = ".lock"
_RUN_FILE_RE = re.compile(r"^(ckpt_\d+\.pt|best\.pt|log\.jsonl|config\.json|loss\.png|tb|\.tmp-(ckpt_\d+|best)\.pt-.*)$")


class RunDirError(ValueError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


def is_run_file(name: str) -> bool:
    """Whether a file name in a run folder is one `gpt2-fast train` writes."""
    return bool(_RUN_FILE_RE.match(name))


def _listing(names: list[str], n: int = 4) -> str:
    shown = ", ".join(sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


_LOG_ONLY = ("log.jsonl", "config.json", "loss.png", "tb")


def prepare_fresh(folder: str, overwrite: bool, logs_only_ok: bool = False) -> None:
    """Make `folder` ready for a new run: create it, or refuse a non-empty one unless overwrite
    (then delete the earlier run's files only). logs_only_ok (--resume=auto finding no
    checkpoint): a folder holding only the logs of a run that saved no checkpoint is reused."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunDirError(f"--out {folder} is a file, expected a folder for the run")
    os.makedirs(folder, exist_ok=True)
    names = [n for n in os.listdir(folder) if n != LOCK]
    if logs_only_ok and all(n in _LOG_ONLY or n.startswith(".tmp-") for n in names):
        overwrite = True
    if not names:
        return
    if not overwrite:
        raise RunDirError(f"run folder {folder} is not empty ({_listing(names)}); continue that run with "
                          f"--resume=auto, train into another folder with --out, or start afresh there "
                          f"with --overwrite (deletes its checkpoints and logs, keeps other files)")
    for name in names:
        if is_run_file(name):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def truncate_log(path: str, step: int) -> int:
    """Drop the records of log.jsonl with a step past `step` (and lines cut by a crash); returns
    how many were dropped. Rewritten atomically."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(keep)
        atomic_write(path, write)
    return dropped


def write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------------

def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


class RunLock:
    """`with RunLock(folder):` holds folder/.lock for this process; raises RunDirError when a live
    process holds it. A lock left by a dead process on this host is taken over."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK)
        self.held = False

    def acquire(self) -> None:
        folder = os.path.dirname(self.path)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise RunDirError(f"--out {folder} is a file, expected a folder for the run")
        os.makedirs(folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(4):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None and time.time() - _mtime(self.path) < 5.0:
                    time.sleep(0.5)  # being written by a run that just took it
                    owner = self._owner() or {"pid": "?", "host": "?", "since": "just now"}
                if owner is not None and (owner.get("host") != me["host"] or not isinstance(owner.get("pid"), int)
                                          or pid_alive(owner["pid"])):
                    raise RunDirError(
                        f"run folder {os.path.dirname(self.path)} is in use by another training run "
                        f"(pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}); "
                        f"wait for it, train into another folder with --out, or delete {self.path} "
                        f"if that process is gone") from None
                try:  # stale (dead pid) or unreadable: take it over
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirError(f"could not take the lock {self.path} (another run keeps taking it)")

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                d = json.load(f)
            return d if isinstance(d, dict) and isinstance(d.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner is not None and owner.get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""Temporary folders that name the process that made them, so that a later run can reclaim the
folders of a run that was killed (SIGKILL, OOM killer, power loss: no `finally` ran) and nothing else.

make_owned_tmpdir(parent, prefix, tool) makes parent/<prefix><random> (tempfile.mkdtemp) and writes
OWNER_FILE into it: {"tool", "pid", "host", "pid_ns"}. reclaim_abandoned(parent, prefix, tool)
removes a folder parent/<prefix>* only when all of these hold:
  - it is a folder (not a link) whose OWNER_FILE parses and names the same `tool` (so: ours);
  - it was made on this host, in this PID namespace (so its pid means the same process here);
  - that pid is not this process and no process with it is alive (os.kill(pid, 0) raises
    ProcessLookupError): the run that made it is gone, so nobody is writing there.
A folder without a readable OWNER_FILE (made by someone else, by an older version, or killed
between mkdtemp and the marker) is left alone and named in one line. A reused pid only keeps a
folder longer (its owner counts as alive), never removes a live one.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Callable, Optional

OWNER_FILE = ".owner.json"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host, in this PID namespace). On Windows,
    where os.kill(pid, 0) would terminate the process, every pid counts as alive."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:  # no /proc (macOS): the host name alone must do
        return None


def _me(tool: str) -> dict:
    return {"tool": tool, "pid": os.getpid(), "host": socket.gethostname(), "pid_ns": _pid_namespace()}


def make_owned_tmpdir(parent: str, prefix: str, tool: str) -> str:
    """A new folder parent/<prefix><random> holding OWNER_FILE that names this process."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        json.dump(_me(tool), f)
    return path


def _owner(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def reclaim_abandoned(parent: str, prefix: str, tool: str, log: Callable[[str], None] = _stderr) -> list[str]:
    """Remove the folders parent/<prefix>* that a dead run of `tool` on this host left behind (see
    the module docstring for the proof asked of each); return their paths. Logs one line each."""
    me, removed = _me(tool), []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or os.path.islink(path) or not os.path.isdir(path):
            continue
        owner = _owner(path)
        if owner is None or owner.get("tool") != tool:
            log(f"{tool}: left alone: {path} has no {OWNER_FILE} naming {tool}, so it may not be ours; "
                f"delete it yourself if nothing uses it")
            continue
        pid = owner["pid"]
        if (owner.get("host"), owner.get("pid_ns")) != (me["host"], me["pid_ns"]) or pid == me["pid"] \
                or pid_alive(pid):
            continue  # another host's or namespace's run, or a live one: it may still be writing
        try:
            shutil.rmtree(path)
        except OSError as e:
            log(f"{tool}: could not remove {path}, left by an earlier {tool} (pid {pid}): {e}")
            continue
        removed.append(path)
        log(f"{tool}: removed {path}, left by an earlier {tool} (pid {pid}) that was killed before it "
            f"could clean up")
    return removed

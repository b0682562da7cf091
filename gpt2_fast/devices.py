"""`--device` for every command: one parser, one set of error lines."""
from __future__ import annotations

from typing import Optional

import torch


def parse_device(name: Optional[str]) -> torch.device:
    """--device as a torch.device (empty or None: cuda when there, else cpu). A device this machine
    cannot run is a ValueError naming the flag and what was expected."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not a device gpt2-fast runs on "
                         f"(--device expects cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available here ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device

"""The loss-curve PNG written at the end of training (matplotlib, when it is installed)."""
from __future__ import annotations

import json
import math
import os
from typing import Optional


def read_log(path: str) -> list[dict]:
    """The records of a training log.jsonl (lines that do not parse are skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return out


def plot_loss_curve(log_path: str, png_path: str, baseline: Optional[float] = None,
                    title: Optional[str] = None) -> Optional[str]:
    """Train and val loss against step from log.jsonl -> png_path. Returns the path, or None
    where matplotlib is missing or the log is empty. `baseline` draws a horizontal line (the
    unigram loss, say)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not os.path.exists(log_path):
        return None
    recs = read_log(log_path)
    # a resumed run appends; keep the last record of each step
    train = {r["step"]: r["loss"] for r in recs if r.get("kind") == "train" and "loss" in r}
    val = {r["step"]: r["val_loss"] for r in recs if r.get("kind") == "eval"}
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        s = sorted(train)
        ax.plot(s, [train[k] for k in s], label="train", lw=1.2)
    if val:
        s = sorted(val)
        ax.plot(s, [val[k] for k in s], "o-", label="val", lw=1.5, ms=4)
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "gpt2_fast training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path

"""TokenLoader: memory-mapped (x, y) batches from the token shards of one split.

It treats the shards of a split as one stream and cuts it into windows of T+1 tokens
(x = window[:-1], y = window[1:]) that start every T tokens. Each call to next_batch() consumes
one global micro-batch of world_size * B windows, of which rank r takes the r-th B. "sequential"
walks the windows in order (every token once per epoch); "random" walks a permutation drawn
from (seed, epoch) with a per-epoch random offset. Its position (epoch, windows consumed) is
state_dict() / load_state_dict(), independent of B and of the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from .data_shards import read_shard, shard_paths


@dataclass
class LoaderState:
    epoch: int = 0
    pos: int = 0  # windows of this epoch already consumed (by all ranks together)


class TokenLoader:
    """Memory-mapped (x, y) batches of shape (B, T) from the shards of one split.

    data: a prepared folder or a glob of shards. order: "sequential" or "random".
    rank / world_size: this process's slice of each global micro-batch (DDP).
    """

    def __init__(self, data: str, split: str, batch_size: int, seq_len: int, order: str = "sequential",
                 seed: int = 1337, rank: int = 0, world_size: int = 1, device="cpu"):
        if order not in ("sequential", "random"):
            raise ValueError(f"order must be 'sequential' or 'random', got {order!r}")
        for key, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.paths = shard_paths(data, split)
        self.shards = [read_shard(p) for p in self.paths]
        sizes = np.array([s.size for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n_tokens = int(self.starts[-1])
        self.split, self.B, self.T, self.order, self.seed = split, batch_size, seq_len, order, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        need = world_size * batch_size * seq_len + 1
        if self.n_tokens < need:
            raise ValueError(
                f"the {split} split has {self.n_tokens} tokens, fewer than one batch needs: "
                f"world_size {world_size} x batch_size {batch_size} x seq_len {seq_len} + 1 = {need}; "
                f"use a smaller batch_size / seq_len or more data")
        self.state = LoaderState()
        self._epoch_cache: tuple[int, int, Optional[np.ndarray]] = (-1, 0, None)

    # -- the epoch's windows ----------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> tuple[int, Optional[np.ndarray]]:
        """(offset of window 0, permutation of the windows or None) for `epoch`."""
        if self._epoch_cache[0] != epoch:
            if self.order == "sequential":
                self._epoch_cache = (epoch, 0, None)
            else:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                offset = int(rng.integers(0, self.T)) if self.n_tokens - 1 >= 2 * self.T else 0
                n = (self.n_tokens - 1 - offset) // self.T
                self._epoch_cache = (epoch, offset, rng.permutation(n))
        return self._epoch_cache[1], self._epoch_cache[2]

    def windows_per_epoch(self, epoch: Optional[int] = None) -> int:
        offset, _ = self._epoch_plan(self.state.epoch if epoch is None else epoch)
        return (self.n_tokens - 1 - offset) // self.T

    def batches_per_epoch(self) -> int:
        """Global micro-batches (world_size * B windows) per epoch."""
        return self.windows_per_epoch() // (self.world_size * self.B)

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's stream (may span shards)."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, need = [], length
        while need:
            local = start - int(self.starts[i])
            chunk = self.shards[i][local:local + need]
            out.append(chunk)
            need -= chunk.size
            start += chunk.size
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    # -- iteration --------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank, int64 (B, T) on the loader's device."""
        G = self.world_size * self.B
        if self.state.pos + G > self.windows_per_epoch():
            self.state = LoaderState(self.state.epoch + 1, 0)
        offset, perm = self._epoch_plan(self.state.epoch)
        first = self.state.pos + self.rank * self.B
        idx = np.arange(first, first + self.B)
        if perm is not None:
            idx = perm[idx]
        rows = np.stack([self._read(offset + int(w) * self.T, self.T + 1) for w in idx])
        self.state.pos += G
        buf = torch.from_numpy(rows.astype(np.int64))                    # (B, T+1)
        x, y = buf[:, :-1], buf[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def reset(self) -> None:
        self.state = LoaderState()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "pos": self.state.pos, "order": self.order,
                "seed": self.seed, "seq_len": self.T, "n_tokens": self.n_tokens}

    def load_state_dict(self, d: dict) -> None:
        for key, mine in (("order", self.order), ("seed", self.seed), ("seq_len", self.T),
                          ("n_tokens", self.n_tokens)):
            if key in d and d[key] != mine:
                raise ValueError(f"cannot resume the data position: it was saved with {key}={d[key]!r}, "
                                 f"this loader has {key}={mine!r}")
        self.state = LoaderState(int(d["epoch"]), int(d["pos"]))

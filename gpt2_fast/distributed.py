"""torchrun's process group for training: who am I, and the few collectives the loop needs
(NCCL on CUDA, gloo on CPU). Single-process runs never touch torch.distributed."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """torchrun's environment -> an initialised process group (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world_size
    return x


def broadcast_error(err: Optional[str], d: Dist) -> Optional[str]:
    """Rank 0's error message (or None) on every rank, so that all of them stop together."""
    if d.enabled:
        import torch.distributed as dist
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    return err


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if d.enabled:
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def finish_distributed() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

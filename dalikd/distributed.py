"""torch.distributed set-up from torchrun's environment; a single process needs none of it.

``torchrun --nproc_per_node N -m dalikd train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK. The
student is wrapped in DDP; the teacher is frozen and stays unwrapped. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # the process group's ("nccl" | "gloo"); "" without one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """A process group is in use (DDP, collectives): launched by torchrun, also with
        ``--nproc_per_node 1``, which runs the multi-GPU code path on one GPU."""
        return bool(self.backend)


def init(device: str) -> Dist:
    """Join the process group when launched by torchrun; select this rank's GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "gpu":
        torch.cuda.set_device(local_rank)
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # not torchrun's
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "gpu" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def shutdown(ctx: Dist) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(ctx: Dist, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place; a sync point)."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(ctx: Dist, flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank, so every rank takes the same branch."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(ctx: Dist, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable; tensors on the CPU), in rank order, on every rank."""
    if not ctx.enabled:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out

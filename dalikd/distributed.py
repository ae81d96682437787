"""torch.distributed set-up from torchrun's environment; a single process needs none of it.

``torchrun --nproc_per_node N -m dalikd train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK. The
student is wrapped in DDP; the teacher is frozen and stays unwrapped. NCCL on GPU, gloo on CPU.

BatchNorm buffers are not synced on every forward (:func:`wrap`): the KD step runs the student
twice before one backward (x, then x'), and DDP's per-forward buffer broadcast writes the
running statistics in place between the two, which torch before 2.14 rejects in backward
("modified by an inplace operation"; seen with torch 2.11). Each rank keeps its own running
statistics instead, and :func:`average_buffers` averages them over the ranks before every
validation and mid-epoch checkpoint (timm's ``--dist-bn reduce``), so what is evaluated and
saved is the same on every rank and a resume continues from exactly it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dalikd.errors import DalikdError

# what gloo and NCCL say when another rank's process is gone
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "Broken pipe", "NCCL communicator was aborted")  # fmt: skip


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


def wrap(ctx: Dist, model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` in DDP, its buffers not synced on every forward (see the module's docstring).
    torch 2.14 renamed the switch, ``forward_sync_buffers``, which still syncs them once at
    construction; before, ``broadcast_buffers=False`` syncs them never. Every rank builds the
    same student (one seed, the same weights or last.pt), so they start equal either way."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = inspect.signature(DDP.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
    device_ids = [ctx.local_rank] if device == "gpu" else None
    return DDP(model, device_ids=device_ids, **{no_sync: False})


def average_buffers(ctx: Dist, model: torch.nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm's running statistics) over the ranks, in
    place; integer ones (batches seen) are equal on every rank already. A collective: every
    rank calls it at the same point."""
    if not ctx.enabled or ctx.world_size == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(ctx.world_size)


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


def explained(ctx: Dist, error: Exception) -> DalikdError | None:
    """The one line a rank of several stops with, so that the reader of every rank's output
    finds the cause: its own DalikdError prefixed ``rank R:``; the loss of another rank (a
    collective whose peer is gone: gloo's and NCCL's errors) as one line pointing at that rank's
    own, instead of a traceback. None: ``error`` as it is (a single process, or another error)."""
    if not ctx.enabled or ctx.world_size == 1:
        return None
    if type(error) is DalikdError:
        return DalikdError(f"rank {ctx.rank}: {error}")
    if isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_LOST):
        return DalikdError(
            f"rank {ctx.rank} stops: another rank stopped first (its own error line is above; "
            "none where it was killed: torchrun's report below names its exit code)"
        )
    return None

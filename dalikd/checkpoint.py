"""Atomic files (a crash while writing never leaves a half-written checkpoint or metrics file),
and :class:`RunState`, where a run is, which a checkpoint saves and restores."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dalikd.errors import DalikdError


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to ``path.tmp``, fsync, rename over ``path``; a full or read-only disk is
    one clear line and leaves no ``.tmp`` behind (``path`` keeps its previous content)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise DalikdError(f"cannot write {path}: {reason}") from None


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to ``path.tmp``, fsync, then rename over ``path``."""
    _write(Path(path), lambda tmp: torch.save(obj, tmp))


def write_text_atomic(text: str, path: str | Path) -> None:
    _write(Path(path), lambda tmp: tmp.write_text(text))


def write_jsonl_atomic(records: list[dict[str, Any]], path: str | Path) -> None:
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), path)


# 2: the DALI graph hands uint8 images over and seeds its draws explicitly; T. stddev is saved
# per rank. A checkpoint of another format cannot restore this version's data pipeline.
CHECKPOINT_FORMAT = 2

EPOCH_START = {"loss_sum": 0.0, "seen": 0, "seconds": 0.0}  # never mutated: rebound per epoch


@dataclass
class RunState:
    """Where a run is, as last.pt saves it beside the weights, optimizer and data states."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the next epoch already done
    global_step: int = 0  # optimizer steps so far: the schedule is a function of it
    best_top1: float = -1.0  # best val top-1 (%) so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    # sums of the interrupted epoch so far: loss_sum, seen (images), seconds (s)
    partial: dict[str, Any] = field(default_factory=lambda: EPOCH_START)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "scheduler": {"step": self.global_step}, "best_top1": self.best_top1,
                "history": self.history, "partial": self.partial}  # fmt: skip

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RunState:
        return cls(ckpt["epoch"], ckpt["step_in_epoch"], ckpt["scheduler"]["step"],
                   ckpt["best_top1"], ckpt["history"], ckpt["partial"])  # fmt: skip

    def restart_epoch(self) -> None:
        """Back to the first step of the current epoch (its data order is lost)."""
        self.global_step -= self.step_in_epoch
        self.step_in_epoch, self.partial = 0, EPOCH_START

    def end_epoch(self, record: dict[str, Any]) -> bool:
        """Close the epoch with its record; whether val top-1 improved (best.pt)."""
        self.history.append(record)
        self.epoch, self.step_in_epoch, self.partial = self.epoch + 1, 0, EPOCH_START
        improved = record["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, record["val_top1"])
        return improved

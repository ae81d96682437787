"""Checkpoints written atomically (:mod:`dalikd.atomic`: a crash never leaves half of one),
and :class:`RunState`, where a run is, which a checkpoint saves and restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dalikd.atomic import write_atomic


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (:func:`dalikd.atomic.write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


# 2: the DALI graph hands uint8 images over and seeds its draws explicitly; T. stddev is saved
# per rank. A checkpoint of another format cannot restore this version's data pipeline.
# Still 2 with the data plan: its graphs hold the operators of format 2 in the same order (a
# restored DALI state overrides the explicit seeds; checked by hand: runs stopped mid-epoch by
# dalikd d91f5b2 resume here and end bit-identical to its uninterrupted runs), and the
# checkpoint's "plan" entry is a record that nothing reads back.
# 3: dalikd orders the epochs itself (dalikd.recovery.epochs: every rank's reads a function of
# the seed, the epoch and the files left out) and reads each rank's list in order; "dali" holds
# each rank's recovery.TrainData state (its failures this epoch and its loader's DALI state).
CHECKPOINT_FORMAT = 3

EPOCH_START = {"loss_sum": 0.0, "seen": 0, "seconds": 0.0}  # never mutated: rebound per epoch


class Position(NamedTuple):
    """Where a step is in a run: what a teacher source looks its outputs up by."""

    epoch: int = 0  # epochs completed before it
    step: int = 0  # its index in the epoch
    rank: int = 0  # the process taking it (each reads its own shard)
    # what its views depend on beyond the run's settings: the files left out before it
    # (recovery.TrainData.history; "" when none)
    data: str = ""


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

    def position(self, rank: int = 0) -> Position:
        """The position of the next step (taken by process ``rank``)."""
        return Position(self.epoch, self.step_in_epoch, rank)

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

"""The teacher as a source: where a step's teacher outputs come from.

A :class:`TeacherSource` turns a batch and its position in the run (epoch, step, rank: from
:class:`dalikd.checkpoint.RunState`) into the teacher's outputs (:class:`TeacherOut`). The
:class:`dalikd.step.Distiller` is given one at construction and asks it once per step; the
training loop talks to it only through the rest of this interface (validation, checkpoints, the
cache's counts). Two kinds:

- :class:`LiveTeacher` runs the network: it owns the build (lazy: on the first step that needs
  it, never drawing from the run's torch RNG), the input adaptation to the student's
  normalization, the placement on the device and the freezing (eval mode, no gradients, once).
- ``dalikd.teacher_cache.CachedTeacher`` reads what a cache holds for the position and falls
  back to a LiveTeacher where it holds nothing (``--teacher-cache``).

No DALI here: the model side runs without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from dalikd.batch import Batch, InputNorm
from dalikd.checkpoint import Position
from dalikd.config import ModelConfig
from dalikd.device import place
from dalikd.models import adapt_input, build_model

TStdSums = tuple[torch.Tensor, torch.Tensor, int]  # (Σ probabilities [C], Σ entropies, rows)


@dataclass
class TeacherOut:
    """What the teacher contributes to one step."""

    logits_x: torch.Tensor | None  # [B, C] teacher logits of x; None without a teacher
    # [k·B, C] logits of every x' row (a pool before its pick: ``keep`` None), or [R, C] those of
    # the kept rows (``keep`` given); None: no x'
    logits_aug: torch.Tensor | None
    keep: torch.Tensor | None = None  # [R] int64 kept rows of a candidate pool; None: not picked
    # the T. stddev sums of the rows trained on (x's, then the kept x'), exact (float64, as
    # dalikd.metrics.tstddev_sums makes them); None: the Distiller sums the rows themselves
    tstd_sums: TStdSums | None = None

    def rows(self) -> torch.Tensor | None:
        """The rows T. stddev counts: x's, then those of the x' trained on."""
        if self.logits_x is None or self.logits_aug is None:
            return self.logits_x
        return torch.cat([self.logits_x, self.logits_aug])


class TeacherSource(Protocol):
    """Where a Distiller's teacher outputs come from (see the module docstring)."""

    def outputs(self, batch: Batch, at: Position) -> TeacherOut:
        """The teacher's outputs for ``batch`` (model-ready images) at position ``at``."""
        ...

    def module(self) -> nn.Module:
        """The teacher network (built and placed now where it was not yet)."""
        ...

    def val_teacher(
        self, batches: int = 0, history: Callable[[], str] = lambda: ""
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """What evaluation compares the student with: a callable on a val batch's images
        (``batches``: batches in a validation pass; ``history()``: which files are left out,
        recovery.ValData.history)."""
        ...

    def checkpoint(self) -> None:
        """The run saves a checkpoint here (a cache writes what it recorded)."""
        ...

    def counts(self) -> tuple[int, int] | None:
        """(steps read from a cache, steps computed) so far this run; None: no cache."""
        ...


class LiveTeacher:
    """The teacher network itself, run on every step it is asked for.

    ``build`` makes the network on first use (:meth:`module`): with :meth:`from_config` the
    config's model with its weights, adapted to the inputs' normalization ``norm`` and placed on
    ``device``; or an already built module (tests, the probe). Either way it is frozen (eval
    mode, no gradients) once, here, and stays so.
    """

    def __init__(self, build: nn.Module | Callable[[], nn.Module]) -> None:
        self._build = build
        self._module: nn.Module | None = None
        if isinstance(build, nn.Module):
            self._module = _frozen(build)

    @classmethod
    def from_config(
        cls,
        model: ModelConfig,
        num_classes: int,
        device: str,
        norm: InputNorm | None,
        *,
        weights: bool = True,
        channels_last: bool = True,
        data_norm: InputNorm | None = None,
    ) -> LiveTeacher:
        """``model.teacher`` (with its weights, unless ``weights`` is False: random, as the
        profiler times), taking inputs normalized with ``norm`` (the student's; None: its own),
        on ``device``, channels_last on a GPU. Built on first use. ``data_norm``: the data's
        normalization, the teacher's own where it has none (a cifar: model)."""

        def build() -> nn.Module:
            # the build leaves the run's torch RNG as it was: a run whose teacher is built late
            # or never (--teacher-cache) draws the same dropout masks etc.
            chosen = model.teacher_weights if weights else ""
            with torch.random.fork_rng(devices=[]):
                t = build_model(model.teacher, num_classes, chosen, role="teacher")
            t = _frozen(t)
            if norm is not None:  # the student's inputs (a timm model's norm may differ)
                t = adapt_input(t, norm, data_norm)
            return place(t, device, channels_last)

        return cls(build)

    def module(self) -> nn.Module:
        if self._module is None:
            self._module = _frozen(self._build())  # type: ignore[operator]
        return self._module

    @property
    def built(self) -> bool:
        return self._module is not None

    def outputs(self, batch: Batch, at: Position | None = None) -> TeacherOut:
        """One teacher pass over x and every x' row together (eval mode: the same numbers as
        two passes); a pool's rows are returned whole (the Distiller picks)."""
        views = [batch.images] if batch.aug_images is None else [batch.images, batch.aug_images]
        with torch.no_grad():
            logits = self.module()(torch.cat(views))
        n = len(batch)
        return TeacherOut(logits[:n], logits[n:] if batch.aug_images is not None else None)

    def val_teacher(
        self, batches: int = 0, history: Callable[[], str] = lambda: ""
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.module()

    def checkpoint(self) -> None:
        pass

    def counts(self) -> tuple[int, int] | None:
        return None


def _frozen(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients, once: the teacher is never switched back to train."""
    return model.eval().requires_grad_(False)

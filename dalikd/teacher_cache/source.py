"""``--teacher-cache`` as a teacher source: :class:`CachedTeacher` reads what the cache holds for
a step's position and runs the teacher (a :class:`dalikd.teacher.LiveTeacher`, built on the
first miss) where it holds nothing; :class:`ValTeacher` does the same for validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dalikd import pick
from dalikd.batch import Batch
from dalikd.checkpoint import Position
from dalikd.config import KDConfig
from dalikd.errors import DalikdError
from dalikd.teacher import LiveTeacher, TeacherOut
from dalikd.teacher_cache.formats import Format
from dalikd.teacher_cache.key import cache_key
from dalikd.teacher_cache.store import TeacherCache


class CachedTeacher:
    """A :class:`~dalikd.teacher.TeacherSource` over ``cache`` (one the run cannot use, read or
    write says so itself: :attr:`TeacherCache.unused`). On a hit it returns the stored outputs
    (the kept x' rows and the pick's indices: the Distiller does not pick again) and the teacher
    does not run; on a miss it runs ``live``, makes the pick itself (a cache only replays
    teacher-based picks, so the student is not needed), records the outputs and returns them.
    It counts hits and misses, writes its chunks where the run checkpoints, and stands in for
    the teacher in validation (:meth:`val_teacher`)."""

    def __init__(
        self,
        cache: TeacherCache,
        live: LiveTeacher,
        kd: KDConfig,
        message: Callable[[str], None] = lambda text: None,
        name: str = "",
    ) -> None:
        self.cache, self.live, self.kd, self.message = cache, live, kd, message
        self.name = name or str(cache.root)
        self.hits = self.misses = 0
        self._val: ValTeacher | None = None

    def module(self) -> torch.nn.Module:
        if not self.live.built:
            self.message(f"teacher cache {self.name}: a step is not cached; teacher loaded")
        return self.live.module()

    def outputs(self, batch: Batch, at: Position) -> TeacherOut:
        hit = self.cache.lookup(at.epoch, at.step, batch.images.device, at.data)
        if hit is not None:
            self.hits += 1
            return TeacherOut(hit.teacher_x, hit.teacher_aug, hit.keep, hit.tstd_sums)
        self.misses += 1
        self.module()  # built on the first miss
        out = self.live.outputs(batch, at)
        if batch.aug_images is not None and batch.pool_size > 1:
            keep = pick.select(self.kd, batch.aug_images, out.logits_aug, None)
            out = TeacherOut(out.logits_x, out.logits_aug[keep], keep)
        self.cache.record(at.epoch, at.step, out.logits_x, out.logits_aug, out.keep, at.data)
        return out

    def val_teacher(self, batches: int = 0, history: Callable[[], str] = lambda: "") -> ValTeacher:
        """The cached validation logits (or the teacher, recording them: saved once a whole
        pass of ``batches`` batches is seen) of the validation batches ``history()`` names
        (which files are left out: another history, other batches)."""
        data = history()
        if self._val is None or self._val.data != data:
            logits = self.cache.val_logits(data)
            self._val = ValTeacher(lambda images: self.module()(images), logits, self.cache,
                                   batches, history)  # fmt: skip
        return self._val

    def checkpoint(self) -> None:
        """The cache's chunks end where checkpoints do."""
        self.cache.flush()

    def counts(self) -> tuple[int, int]:
        return self.hits, self.misses


class ValTeacher(torch.nn.Module):
    """Stands in for the teacher during evaluation: replays the cached logits batch by batch
    (``logits`` given), or runs ``teacher`` and records what it returns (``logits`` None).
    ``evaluate`` calls it once per validation batch, in the loader's fixed order. Given
    ``cache`` and ``batches`` (batches per pass), a recorded pass is saved when it completes
    and replayed from then on. ``history()`` names the batches (which files are left out): when
    a file fails in the middle of a pass the batches after it are others, so the rest of that
    pass runs the teacher and nothing of it is saved."""

    def __init__(
        self,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None,
        logits: list[torch.Tensor] | None,
        cache: TeacherCache | None = None,
        batches: int = 0,
        history: Callable[[], str] = lambda: "",
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.replay = logits
        self.recorded: list[torch.Tensor] = []
        self.cache, self.batches = cache, batches
        self.history, self.data = history, history()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.history() != self.data:  # a file failed mid-pass: other batches from here on
            self.replay, self.cache, self.batches = None, None, 0
        if self.replay is not None:
            logits = self.replay[len(self.recorded)].to(images.device)
            self.recorded.append(logits)
            if len(logits) != len(images):
                raise DalikdError("teacher cache: the validation batches changed; delete val/")
            if len(self.recorded) == len(self.replay):
                self.recorded = []  # the next pass starts again at the first batch
            return logits
        logits = self.teacher(images).float()
        if self.cache is None and self.batches:
            return logits  # no cache to save to: nothing to record
        self.recorded.append(logits.detach().cpu())
        if self.cache is not None and len(self.recorded) == self.batches:
            self.cache.save_val(self.recorded, self.data)
            self.replay = self.done()
        return logits

    def done(self) -> list[torch.Tensor]:
        """The batches of this pass; resets for the next pass."""
        out, self.recorded = self.recorded, []
        return out


def for_run(
    cfg: Any, plan: Any, dataset: Any, live: LiveTeacher, *, world_size: int, rank: int,
    graph_format: int, message: Callable[[str], None], sizes: dict[str, int] | None = None,
) -> CachedTeacher:  # fmt: skip
    """``cfg.teacher_cache`` for a run (``cfg`` a TrainConfig, ``plan`` its data plan,
    ``dataset`` the run's listing, ``sizes`` its failed files' sizes: key.listing_hash): the
    cache of the run's key (its key.json checked or written; a key of other settings is one
    line naming them) around ``live``. ``message``: rank 0's reporter; another rank says the
    notes on its own files itself (:func:`rank_notes`)."""
    from dalikd.device import amp_dtype

    message = message if rank == 0 else rank_notes(rank, cfg.teacher_cache)

    fmt = Format(cfg.teacher_cache_format, cfg.teacher_cache_topk, cfg.kd.temperature)
    precision = str(amp_dtype(plan.device, cfg.precision) or torch.float32).removeprefix("torch.")
    key = cache_key(
        plan, dataset, teacher=cfg.model.teacher, teacher_weights=cfg.model.teacher_weights,
        kd=cfg.kd, precision=precision, world_size=world_size, channels_last=cfg.channels_last,
        graph_format=graph_format, fmt=fmt, sizes=sizes,
    )  # fmt: skip
    cache = TeacherCache(cfg.teacher_cache, key, rank=rank, message=message,
                         temperature=cfg.kd.temperature)  # fmt: skip
    return CachedTeacher(cache, live, cfg.kd, message, cfg.teacher_cache)


def rank_notes(rank: int, root: str | Path) -> Callable[[str], None]:
    """The notes of rank ``rank`` (not 0) on the cache at ``root`` that name its own files (a
    damaged chunk of its ``r{rank}/`` folder, its ``val/r{rank}.pt``, a disk that filled as it
    wrote one), as one warning line each prefixed ``rank R:``; those about the whole cache
    (read-only, not used) rank 0 says once for every rank. Its files are told by their path
    inside the cache (a cache under a folder named ``r1`` is not rank 1's file)."""
    import os
    import warnings

    own, where = (f"{os.sep}r{rank}{os.sep}", f"{os.sep}r{rank}.pt"), str(Path(root))

    def say(text: str) -> None:
        if any(part in text.replace(where, "") for part in own):
            warnings.warn(f"dalikd: rank {rank}: {text}", RuntimeWarning, stacklevel=2)

    return say

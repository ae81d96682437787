"""The files a run leaves out while it trains and validates, across its ranks and its resumes.

Each rank finds its own failures (:class:`~dalikd.recovery.TrainData`,
:class:`~dalikd.recovery.ValData`); :meth:`RunFailures.share` tells every rank every other
rank's at the run's checkpoints (a collective: every rank calls it at the same point), so all of
them plan the next epoch without the same files. Rank 0 keeps ``data_report.tsv``: the scan's
files left out, then every failure of every rank, written as soon as rank 0 learns of one (its
own: at once; another rank's: at the next checkpoint, before the checkpoint itself).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dalikd import distributed
from dalikd.data import Dataset
from dalikd.recovery.report import (
    REPORT,
    RUN_TIME,
    VAL_TIME,
    failure_epoch,
    report_rows,
    write_report,
)
from dalikd.recovery.source import SampleSource, source_of
from dalikd.recovery.train_data import TrainData
from dalikd.recovery.val_data import ValData


class RunFailures:
    """``failed``: path -> reason of the files the run left out before (its report, on a resume);
    ``dataset``: the run's base listing (:func:`~dalikd.recovery.with_reported`), whose
    ``skipped`` are the scan's. ``say`` is rank 0's reporter (other ranks: silent).
    ``sources``: the (train, val) samples (default: the dataset's own, files or shard
    samples: :func:`~dalikd.recovery.source_of`)."""

    def __init__(
        self, run_dir: Path, dataset: Dataset, failed: dict[str, str], ctx: distributed.Dist,
        say: Callable[[str], None], sources: tuple[SampleSource, SampleSource] | None = None,
        sizes: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        self.run_dir, self.dataset, self.failed = run_dir, dataset, dict(failed)
        self.ctx, self.say = ctx, say
        self.sources = sources or (source_of(dataset.train), source_of(dataset.val))
        self._sizes = dict(sizes or {})

    def sizes(self) -> dict[str, int]:
        """The size in bytes of each file that failed in training or validation, by its path
        relative to the dataset's root (``sizes`` given, then each such file still there): a
        checkpoint keeps them, so a teacher cache's key lists a file removed since as the run
        first listed it (:func:`dalikd.teacher_cache.key.listing_hash`: "remove the file and
        --resume")."""
        for path, reason in self.failed.items():
            rel = os.path.relpath(path, self.dataset.root)
            if reason.startswith((RUN_TIME, VAL_TIME)) and rel not in self._sizes:
                # removed before a checkpoint knew it: the key will differ
                with contextlib.suppress(OSError):
                    self._sizes[rel] = os.stat(path).st_size
        return dict(self._sizes)

    def train_data(self, plan: Any, *, epoch: int, step: int, checkpoint: Any) -> TrainData:
        """This rank's training data, the files that failed before left out (from the epoch
        after the one they failed in)."""
        source = self.sources[0]
        ids = {p: source.index(p) for p, r in self.failed.items() if r.startswith(RUN_TIME)}
        failed = {i: failure_epoch(self.failed[p]) for p, i in ids.items() if i is not None}
        return TrainData(source, plan, epoch=epoch, step=step, failed=failed, rank=self.ctx.rank,
                         world=self.ctx.world_size, checkpoint=checkpoint,
                         on_failure=self.found_train)  # fmt: skip

    def val_data(self, plan: Any, where: Callable[[], str]) -> ValData:
        """This rank's validation data, the files that failed before left out."""
        source = self.sources[1]
        ids = (source.index(p) for p, r in self.failed.items() if r.startswith(VAL_TIME))
        return ValData(source, plan, rank=self.ctx.rank, world=self.ctx.world_size,
                       failed={i for i in ids if i is not None}, where=where,
                       on_failure=self.found_val)  # fmt: skip

    def summary(self) -> str:
        """The run's data in one line: images used, classes, files left out."""
        ds, failed = self.dataset, self.failed.values()
        n = len(report_rows(ds.skipped, self.failed))
        what = self.sources[0].what
        left_out = f", {n} {what}{'s' if n > 1 else ''} left out (see {REPORT})" if n else ""
        train = len(ds.train) - sum(r.startswith(RUN_TIME) for r in failed)
        val = len(ds.val) - sum(r.startswith(VAL_TIME) for r in failed)
        return f"data: {train:,} train / {val:,} val images, {ds.num_classes} classes{left_out}"

    def write(self) -> None:
        """data_report.tsv (rank 0)."""
        if self.ctx.is_main:
            write_report(self.run_dir, report_rows(self.dataset.skipped, self.failed))

    def found_train(self, named: dict[str, str], where: str) -> None:
        """A TrainData's ``on_failure``: rank 0 says so and writes the report at once."""
        if self.ctx.is_main:
            self.say(
                f"left out {len(named)} {self.sources[0].what}(s) that failed to decode at "
                f"{where}: "
                f"{', '.join(sorted(named))}; the epoch goes on without them (see {REPORT})"
            )
            self._add(named)

    def found_val(self, named: dict[str, str], where: str) -> None:
        """A ValData's ``on_failure``."""
        if self.ctx.is_main:
            self.say(
                f"left out {len(named)} validation {self.sources[1].what}(s) that failed to decode"
                f"{f' ({where})' if where else ''}: {', '.join(sorted(named))}; validation goes "
                f"on without them (see {REPORT})"
            )
            self._add(named)

    def _add(self, named: dict[str, str]) -> None:
        new = {p: r for p, r in named.items() if p not in self.failed}
        if new:
            self.failed.update(new)
            self.write()

    def share(self, train_data: Any, val_data: Any) -> None:
        """Every rank's new failures to every rank (a collective where distributed); rank 0
        names those of the other ranks and writes them to the report."""
        mine = (train_data.take_failures(), val_data.take_failures())
        if not self.ctx.enabled or self.ctx.world_size == 1:
            return
        for rank, (train, val) in enumerate(distributed.gather_objects(self.ctx, mine)):
            if rank == self.ctx.rank:
                continue
            train_data.learn(train)
            val_data.learn(val)
            if self.ctx.is_main and (train or val):
                names = sorted(p for p, _ in [*train, *val])
                self.say(
                    f"rank {rank} left out {len(names)} {self.sources[0].what}(s) that failed to "
                    "decode: "
                    f"{', '.join(names)} (see {REPORT})"
                )
                self._add(dict([*train, *val]))

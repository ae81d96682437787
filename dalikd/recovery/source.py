"""Where recovery reads samples from: a :class:`SampleSource` (a split's samples by identity),
:class:`FileSource`, the one for an image folder's file list, and :func:`source_of`, which
gives a split its source (a shard set's: :class:`dalikd.recovery.shards.ShardSource`).

A sample's identity is its index in the split. Recovery never asks a source for an order or a
shard: it decides which samples each rank reads, in which order (:mod:`.epochs`), and asks the
source for a loader over exactly those (a whole epoch's reads, or the remainder after a
failure), and, when one fails, which of them fail to decode. The one thing a source says about
order is :attr:`SampleSource.groups`: samples stored together (a tar shard's), which an epoch's
order keeps together so that a rank reads each shard in one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from dalikd.data import Split
from dalikd.recovery.culprits import find_culprits


class SampleSource(Protocol):
    """The samples of one split, by identity (their index in the split)."""

    # the group (a shard) of each identity, or None: every sample stands alone (a file).
    # An epoch's order (recovery.epochs) shuffles the groups, then the samples in each
    groups: Sequence[int] | None
    what: str  # what the messages call a sample: "file", "sample"

    def __len__(self) -> int: ...

    def name(self, i: int) -> str:
        """How the report and the messages name sample ``i`` (a file's path)."""

    def index(self, name: str) -> int | None:
        """The identity of the sample ``name`` names (None: not in this split)."""

    def loader(
        self, samples: Sequence[int], plan: Any, *, train: bool, seed: int = 0, rank: int = 0,
        checkpoint: str | bytes | None = None,
    ) -> Any:  # fmt: skip
        """A :class:`dalikd.loaders.Loader` over exactly ``samples``, in this order: training's
        graph (``train``: whole batches; augmentations seeded from ``seed`` and ``rank``,
        resumed from ``checkpoint``) or validation's (the last batch partial)."""

    def culprits(self, error: BaseException, samples: Sequence[int], plan: Any) -> dict[int, str]:
        """identity -> reason for the samples among ``samples`` (in the order they were to be
        read) that made the pipeline fail with ``error``."""


class FileSource:
    """An image folder's split: a sample is a file, its name the file's path."""

    groups = None  # each file is read on its own: any order costs the same
    what = "file"

    def __init__(self, split: Split) -> None:
        self.split = split
        self._index = {f: i for i, f in enumerate(split.files)}

    def __len__(self) -> int:
        return len(self.split)

    def name(self, i: int) -> str:
        return self.split.files[i]

    def index(self, name: str) -> int | None:
        return self._index.get(name)

    def label(self, i: int) -> int:
        return self.split.labels[i]

    def subset(self, samples: Sequence[int]) -> Split:
        return Split(tuple(self.split.files[i] for i in samples),
                     tuple(self.split.labels[i] for i in samples))  # fmt: skip

    def loader(
        self, samples: Sequence[int], plan: Any, *, train: bool, seed: int = 0, rank: int = 0,
        checkpoint: str | bytes | None = None,
    ) -> Any:  # fmt: skip
        return subset_loader(self.subset(samples), plan, train=train, seed=seed, rank=rank,
                             checkpoint=checkpoint)  # fmt: skip

    def culprits(self, error: BaseException, samples: Sequence[int], plan: Any) -> dict[int, str]:
        found = find_culprits(error, [self.split.files[i] for i in samples], plan)
        return {self._index[f]: reason for f, reason in found.items()}


def subset_loader(
    sub: Any, plan: Any, *, train: bool, seed: int, rank: int, checkpoint: str | bytes | None
) -> Any:
    """A source's loader over ``sub``, its samples' split in reading order (a folder's
    :class:`~dalikd.data.Split` or a shard set's subset): :meth:`SampleSource.loader`."""
    from dalikd import loaders

    if not train:
        return loaders.val_loader(sub, plan)
    return loaders.train_loader(sub, plan, seed=seed, shard_id=rank, checkpoint=checkpoint,
                                indexed=True, ordered=True)  # fmt: skip


def source_of(split: Any) -> SampleSource:
    """The :class:`SampleSource` of ``split``: a folder's :class:`~dalikd.data.Split` or a
    shard set's :class:`~dalikd.shards.ShardSplit` (dalikd.sources.open_dataset gives either)."""
    from dalikd.shards import ShardSplit

    if isinstance(split, ShardSplit):
        from dalikd.recovery.shards import ShardSource

        return ShardSource(split)
    return FileSource(split)

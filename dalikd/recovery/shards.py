"""A shard set's split as a :class:`~dalikd.recovery.source.SampleSource`: recovery plans and
reads a shard set exactly as it does a folder (the same epoch order rule, each rank its own
list in order, a sample that fails to decode left out and reported, exact resume).

A sample's identity is its position in the split (the shards in manifest order, each shard's
samples in stored order); its name in ``data_report.tsv`` and the messages is
``<shard path>:<key>``. Its group is its shard: an epoch's order shuffles the shards, then the
samples inside each (:mod:`.epochs`), so a rank's list reads each shard it touches in one run.

A loader over a list of samples reads the same tars through index files dalikd writes for it
(:meth:`dalikd.shards.ShardSplit.subset`: DALI's webdataset reader reads the samples an index
lists, in its order), in a folder of its own under ``$DALIKD_CACHE/shard-index/``
(:func:`index_folder`) removed with the source; the folders a killed run left there are removed
by the next source made. A sample that fails is found by decoding the unseen ones again, a batch
at a time, from their bytes (:func:`dalikd.recovery.culprits.bytes_failure`; DALI's error names
neither the sample nor the tar).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dalikd.cache import cache_dir, private_dir
from dalikd.recovery.culprits import bisect_failures, bytes_failure
from dalikd.recovery.source import subset_loader
from dalikd.shards import ShardSplit, sample_key

INDEX_DIR = "shard-index"  # under cache_dir(): the loaders' index folders, one per live source


def index_folder(base: Path | None = None) -> tuple[Path, int | None]:
    """A new private folder for a source's index files and the descriptor of the lock that
    marks it in use: ``base/<name>/`` (default ``cache_dir()/shard-index``) beside
    ``base/<name>.lock``, locked (``flock``) until the process ends or releases it. Folders
    whose lock no process holds (a run killed by SIGKILL, whose finalizers never ran) are
    removed first, so requeued runs do not pile them up. Where the cache cannot be written or
    locked: a temporary folder (None: no lock)."""
    base = cache_dir() / INDEX_DIR if base is None else base
    try:
        private_dir(base)
        sweep_index_folders(base)
        while True:
            fd, lock = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".lock", dir=base)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(OSError):  # a sweep may have taken it before the lock
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        folder = Path(lock.removesuffix(".lock"))
        folder.mkdir(mode=0o700)
        return folder, fd
    except OSError:
        return Path(tempfile.mkdtemp(prefix="dalikd-shards-")), None


def sweep_index_folders(base: Path) -> list[Path]:
    """Remove the index folders under ``base`` that no live source holds; returns them."""
    removed = []
    for entry in sorted(base.iterdir()):
        if entry.suffix == ".lock":
            try:
                fd = os.open(entry, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live source's
                os.close(fd)
                continue
            folder = entry.with_suffix("")
            shutil.rmtree(folder, ignore_errors=True)
            entry.unlink(missing_ok=True)
            os.close(fd)
            removed.append(folder)
        elif entry.is_dir() and not entry.with_name(entry.name + ".lock").exists():
            shutil.rmtree(entry, ignore_errors=True)  # its lock is gone: nobody's
            removed.append(entry)
    return removed


def _release(folder: Path, fd: int | None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if fd is not None:
        Path(f"{folder}.lock").unlink(missing_ok=True)
        os.close(fd)


class ShardSource:
    """``split``'s samples by identity (``index_root``: where the loaders' index files go; by
    default a new folder of :func:`index_folder`, removed when the source is)."""

    what = "sample"

    def __init__(self, split: ShardSplit, index_root: str | Path | None = None) -> None:
        self.split = split
        sizes = [s.samples for s in split.shards]
        self._starts = np.cumsum([0, *sizes])  # identity of each shard's first sample
        self._first = np.asarray(split.first, dtype=np.int64)  # its sample number
        self.groups = np.repeat(np.arange(len(sizes)), sizes)
        self._shard = {str(split.folder / s.name): k for k, s in enumerate(split.shards)}
        if index_root is None:
            index_root, lock = index_folder()
            weakref.finalize(self, _release, index_root, lock)
        self._root = Path(index_root)
        self._loaders = 0

    def __len__(self) -> int:
        return len(self.split)

    def number(self, i: int) -> int:
        """The sample number (its key) of identity ``i``."""
        return int(self.numbers([i])[0])

    def numbers(self, samples: Sequence[int]) -> np.ndarray:
        """The sample numbers of identities ``samples``."""
        ids = np.asarray(samples, dtype=np.int64)
        k = np.searchsorted(self._starts, ids, side="right") - 1
        return self._first[k] + ids - self._starts[k]

    def name(self, i: int) -> str:
        shard, key = self.split.locate(self.number(i))
        return f"{self.split.folder / shard}:{key}"

    def index(self, name: str) -> int | None:
        shard, _, key = name.rpartition(":")
        k = self._shard.get(shard)
        if k is None or not key.isdigit():
            return None
        offset = int(key) - self.split.first[k]
        if not 0 <= offset < self.split.shards[k].samples or sample_key(int(key)) != key:
            return None
        return int(self._starts[k]) + offset

    def subset(self, samples: Sequence[int]) -> ShardSplit:
        """The samples ``samples``, in this order, as a split DALI's reader reads (its index
        files in a folder of their own)."""
        self._loaders += 1
        where = self._root / f"{self._loaders:06d}"
        return self.split.subset(self.numbers(samples).tolist(), where)

    def loader(
        self, samples: Sequence[int], plan: Any, *, train: bool, seed: int = 0, rank: int = 0,
        checkpoint: str | bytes | None = None,
    ) -> Any:  # fmt: skip
        shutil.rmtree(self._root / f"{self._loaders:06d}", ignore_errors=True)  # the last one's
        return subset_loader(self.subset(samples), plan, train=train, seed=seed, rank=rank,
                             checkpoint=checkpoint)  # fmt: skip

    def culprits(self, error: BaseException, samples: Sequence[int], plan: Any) -> dict[int, str]:
        def fails(part: list[int]) -> str | None:
            return bytes_failure([self.split.image(n) for n in self.numbers(part).tolist()], plan)

        return bisect_failures(list(samples), fails, plan.data.batch_size)

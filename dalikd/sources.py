"""Where a run's images come from: an ImageNet-style folder of image files, or a shard set (tar
shards in the WebDataset layout with their manifest, :mod:`dalikd.shards`). This is the one
place that tells the two apart (:func:`source_kind`; the data plan records the answer) and
opens either as a :class:`dalikd.data.Dataset` (:func:`open_dataset`): a folder's splits are
:class:`dalikd.data.Split` (its files, listed and scanned), a shard set's are
:class:`dalikd.shards.ShardSplit` (from the manifest: nothing is listed). The graphs read
either through :func:`dalikd.loaders.read`.

What a command needs of a dataset (the class names, the counts, the train listing a resume
checks, the teacher cache's listing) comes from here for both kinds. No DALI, no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from dalikd.cache import cache_dir
from dalikd.config import MAX_PIXELS
from dalikd.data import Dataset, class_names, scan_dataset, train_listing
from dalikd.errors import DalikdError
from dalikd.manifest import Manifest, read_manifest
from dalikd.shardcheck import verify_shards
from dalikd.shards import ShardSplit, is_glob, shard_manifest, shard_set_of, shard_split

SourceKind = Literal["folder", "shards"]
SOURCES: tuple[str, ...] = ("folder", "shards")


def source_kind(path: str | Path) -> SourceKind:
    """The kind of ``--data path``: "shards" where it names a shard set (a folder whose
    dataset.json has layout shards, or a glob of its tars), else "folder"."""
    return "shards" if shard_set_of(path) is not None else "folder"


def data_path(path: str | Path) -> str:
    """``path`` absolute, as a run saves it: a folder resolved; a glob's folder resolved and
    its pattern kept."""
    found = shard_set_of(path)
    if found is not None and found[1]:
        return str(found[0] / found[1])
    return str(Path(path).expanduser().resolve())


def root_of(path: str | Path) -> str:
    """The folder of the dataset ``path`` names, absolute (a glob's: the folder of its tars)."""
    where = Path(path).expanduser()
    return str((where.parent if is_glob(path) else where).resolve())


def exists(path: str | Path) -> bool:
    """The dataset ``path`` names is there (a glob: its folder)."""
    where = Path(path).expanduser()
    return where.parent.is_dir() if is_glob(path) else where.is_dir()


def manifest_of(path: str | Path) -> Manifest | None:
    """The manifest of the dataset ``--data path`` names, whichever its kind: a folder's own
    dataset.json (``dalikd data import``), a shard set's (its folder's, for a glob too); None
    for a plain folder of images. E.g. for a dataset's ``data_defaults``: a shard set written
    from an imported folder carries the folder's."""
    found = shard_set_of(path)
    return shard_manifest(found[0]) if found is not None else read_manifest(path)


def names(path: str | Path) -> tuple[str, ...]:
    """The class index of ``path``: a shard set's manifest's class names, else the folder's
    class folders (:func:`dalikd.data.class_names`)."""
    found = shard_set_of(path)
    if found is None:
        return class_names(path)
    return shard_manifest(found[0]).classes  # type: ignore[union-attr]


def open_dataset(
    path: str | Path,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    classes: tuple[str, ...] | None = None,
    max_pixels: int = MAX_PIXELS,
    verify: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> Dataset:
    """The dataset ``path`` names, with ``splits`` read (the others empty).

    A folder is listed and scanned (:func:`dalikd.data.scan_dataset`: bad files left out).
    A shard set is taken from its manifest: class names, counts and shard lists, each shard
    checked to be there at its manifest size (a truncated one is one line); ``verify`` also
    checks the shards' sha256 (rank ``rank`` of ``world_size`` hashes its share; a verified
    shard is cached by size and mtime, so only the first start reads them all; ``note`` hears
    how much is hashed, ``progress`` how far it got). ``classes``:
    the class names the caller expects (a checkpoint's): a shard set's labels are its
    manifest's, so other names are refused."""
    found = shard_set_of(path)
    if found is None:
        return scan_dataset(path, splits=splits, classes=classes, max_pixels=max_pixels,
                            progress=progress)  # fmt: skip
    folder, pattern = found
    manifest = shard_manifest(folder)
    assert manifest is not None, "shard_set_of found it"
    if classes is not None and tuple(classes) != manifest.classes:
        raise DalikdError(
            f"the shard set {folder} has other classes ({len(manifest.classes)}) than the "
            f"ones expected ({len(classes)}): its labels are its manifest's"
        )
    parts = {
        name: shard_split(folder, name, pattern) if name in splits
        else ShardSplit(folder, name, manifest.classes, ())
        for name in ("train", "val")
    }  # fmt: skip
    if verify:
        noted: list[bool] = []

        def hashing(_phase: str, done: int, total: int) -> None:
            if done == 0 and note and not noted:
                noted.append(True)
                note(f"checking the sha256 of {folder}'s shards (once: later starts skip the "
                     "shards that did not change)")  # fmt: skip
            if progress:
                progress(done, total)

        for part in parts.values():
            verify_shards(part, cache_root=cache_dir(), rank=rank, world_size=world_size,
                          progress=hashing)  # fmt: skip
    return Dataset(folder, manifest.classes, parts["train"], parts["val"])  # type: ignore[arg-type]


def is_shards(dataset: Dataset) -> bool:
    return isinstance(dataset.train, ShardSplit)


def listing(dataset: Dataset) -> dict[str, Any]:
    """What the training reader's sample numbers refer to, as a checkpoint records it and a
    resume compares it: a folder's train listing (:func:`dalikd.data.train_listing`); a shard
    set's train shards by name, numbers and sha256 (:meth:`ShardSplit.digest`, from the
    manifest: a copy of the set elsewhere is the same, a re-shard is not)."""
    if not is_shards(dataset):
        return train_listing(dataset)
    train = dataset.train
    return {"classes": dataset.num_classes, "train_files": len(train), "sha256": train.digest(),
            "source": "shards"}  # fmt: skip


def mean_sample_kb(dataset: Dataset, sample: int = 2000) -> float:
    """The mean size of a training image (a shard set's: its shards' bytes per sample,
    members' headers included)."""
    train = dataset.train
    if isinstance(train, ShardSplit):
        return sum(s.bytes for s in train.shards) / max(len(train), 1) / 1024
    sizes = [os.path.getsize(f) for f in train.files[:sample]]
    return sum(sizes) / max(len(sizes), 1) / 1024

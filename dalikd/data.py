"""The ImageNet-style folder: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``.

Class index = position of the folder name in the sorted list of train classes, the torchvision
ImageFolder convention, so a teacher trained elsewhere lines up with the labels here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalikd.cache import cache_dir
from dalikd.datacheck import check_files
from dalikd.errors import DalikdError

# What DALI's image decoder reads; other files (.txt, .csv, ...) are left out.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".jp2",
)  # fmt: skip


@dataclass(frozen=True)
class Split:
    files: tuple[str, ...]  # absolute paths, grouped by class, sorted within a class
    labels: tuple[int, ...]  # class index of each file

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Dataset:
    root: Path
    classes: tuple[str, ...]
    train: Split
    val: Split
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of every file left out

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop: ELOOP
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(split_dir) if _is_dir(e) and not e.name.startswith(".")
    )


def _utf8(path: str) -> bool:
    """DALI takes file names as UTF-8 strings only ("Unsupported argument type")."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    """A path whose undecodable bytes show as U+FFFD, for messages and reports."""
    return path.encode(errors="surrogateescape").decode(errors="replace")


def _scan_split(
    split_dir: Path,
    classes: tuple[str, ...],
    others: list[str],
    bad_names: list[str],
    broken: list[str],
    empty: list[str],
) -> Split:
    """Image files by extension; other files go to ``others``, names DALI cannot take (not
    UTF-8) to ``bad_names``, symlinks that lead nowhere to ``broken``, class folders without
    an image file to ``empty``."""
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in _class_dirs(split_dir):
        if name not in index:
            raise DalikdError(
                f"{split_dir}/{name} is a class that train/ does not have; "
                "val/ classes must be a subset of train/ classes"
            )
        found = []
        for entry in os.scandir(split_dir / name):
            if _is_file(entry):
                is_image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
                if is_image and not _utf8(entry.path):
                    bad_names.append(entry.path)
                    continue
                (found if is_image else others).append(entry.path)
            elif entry.is_symlink() and not _is_dir(entry):  # dangling, or a loop
                broken.append(entry.path)
        if not found:
            empty.append(str(split_dir / name))
        found.sort()
        files += found
        labels += [index[name]] * len(found)
    return Split(tuple(files), tuple(labels))


def _dataset_root(root: str | Path) -> Path:
    if not str(root):
        raise DalikdError("no dataset given: pass --data DIR (a folder with train/ and val/)")
    root = Path(root).expanduser().resolve()
    if root.is_file():
        raise DalikdError(f"{root} is a file, not a dataset folder (one with train/ and val/)")
    if not root.is_dir():
        raise DalikdError(f"dataset folder not found: {root}")
    return root


def _require_split(root: Path, split: str) -> None:
    if not (root / split).is_dir():
        raise DalikdError(
            f"{root} has no {split}/ folder; expected {root}/train/<class>/*.JPEG "
            f"and {root}/val/<class>/*.JPEG"
        )


def class_names(root: str | Path) -> tuple[str, ...]:
    """The class index of a dataset: its train/ class folders, sorted; val/'s where there is
    no train/ (evaluation only)."""
    root = _dataset_root(root)
    split = "train" if (root / "train").is_dir() or not (root / "val").is_dir() else "val"
    _require_split(root, split)
    classes = tuple(_class_dirs(root / split))
    if not classes:
        raise DalikdError(f"{root}/{split} has no class folders")
    return classes


def scan_dataset(
    root: str | Path,
    *,
    check: bool = True,
    decode: bool = False,
    cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    strict: bool = True,
    splits: tuple[str, ...] = ("train", "val"),
    classes: tuple[str, ...] | None = None,
) -> Dataset:
    """List the classes and usable image files of an ImageNet-style folder.

    ``splits``: the ones scanned (the others come back empty); ``classes``: the class index
    (default: :func:`class_names`), e.g. the names a checkpoint was trained on.

    ``check`` runs the data scan of :mod:`dalikd.datacheck` (cached): files that would kill
    the DALI pipeline are left out and listed in ``Dataset.skipped``. A split with no usable
    image, or a train class with none (as torchvision's ImageFolder), is an error unless
    ``strict`` is False (check-data lists what it found first).
    """
    root = _dataset_root(root)
    for split in splits:
        _require_split(root, split)
    classes = classes or class_names(root)
    others: list[str] = []
    bad_names: list[str] = []
    broken: list[str] = []
    empty: dict[str, list[str]] = {"train": [], "val": []}
    found = {
        name: _scan_split(root / name, classes, others, bad_names, broken, empty[name])
        if name in splits
        else Split((), ())
        for name in ("train", "val")
    }
    bad: dict[str, str] = {}
    if check:
        bad = check_files(
            [f for split in found.values() for f in split.files],
            root=root, cache_root=cache_dir() if cache else None, decode=decode,
            progress=progress,
        )  # fmt: skip
    for name, split in found.items():
        keep = [i for i, f in enumerate(split.files) if f not in bad]
        if not keep and strict and name in splits:
            left = f"; {len(split)} left out, see: dalikd check-data {root}" if len(split) else ""
            raise DalikdError(
                f"{root}/{name} holds no usable images{left} "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        found[name] = Split(
            tuple(split.files[i] for i in keep), tuple(split.labels[i] for i in keep)
        )
    if strict and empty["train"]:
        raise DalikdError(
            f"{len(empty['train'])} train class folder(s) hold no image file, e.g. "
            f"{empty['train'][0]}; add images or remove the folder (as torchvision's ImageFolder)"
        )
    skipped = (
        sorted(bad.items())
        + [(p, "not an image (file extension)") for p in sorted(others)]
        + [
            (_printable(p), "file name is not valid UTF-8 (DALI cannot open it)")
            for p in sorted(bad_names)
        ]  # fmt: skip
        + [(_printable(p), "broken symbolic link (its target is missing or a loop)")
           for p in sorted(broken)]
        + [(_printable(p) + "/", "empty class folder (no image file)")
           for p in empty["train"] + empty["val"]]
    )  # fmt: skip
    return Dataset(root, classes, found["train"], found["val"], tuple(skipped))


def train_listing(dataset: Dataset) -> dict[str, Any]:
    """What the training reader's indices refer to: the classes and the train files relative
    to the root, in order; a copy of the dataset in another folder has the same listing."""
    h = hashlib.sha256(("\n".join(dataset.classes) + "\n").encode())
    for path, label in zip(dataset.train.files, dataset.train.labels, strict=True):
        rel = os.path.relpath(path, dataset.root)
        h.update(f"{rel}\t{label}\n".encode(errors="surrogateescape"))
    return {"classes": dataset.num_classes, "train_files": len(dataset.train),
            "sha256": h.hexdigest()}  # fmt: skip

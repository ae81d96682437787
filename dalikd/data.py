"""The ImageNet-style folder: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``.

Class index = position of the folder name in the sorted list of train classes, the torchvision
ImageFolder convention, so a teacher trained elsewhere lines up with the labels here.

A folder that ``dalikd data import`` wrote has a ``dataset.json`` (:mod:`dalikd.manifest`,
layout "folder"): its classes are the manifest's, in its label order (each in the folder
:func:`dalikd.manifest.class_folders` names, which sort into that order), and with codec "raw"
its images are ``.hwc`` files of exactly H·W·C bytes (``Dataset.raw_shape``), checked by size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dalikd.cache import cache_dir
from dalikd.datacheck import MAX_PIXELS, check_files, not_regular
from dalikd.errors import DalikdError
from dalikd.manifest import RAW_EXTENSION, Manifest, class_folders, read_manifest
from dalikd.rundir import LOCK, RUN_FILES

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
    # val class folders without an image: those classes are not validated (no file left out)
    empty_val: tuple[str, ...] = ()
    # (H, W, C) of a raw dataset's images (dataset.json's codec "raw"); (): encoded files
    raw_shape: tuple[int, ...] = ()

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
    """A path whose undecodable bytes show as U+FFFD: what Dataset.skipped holds for names
    that are not UTF-8 (a listing hash encodes it; such a file is never read)."""
    return path.encode(errors="surrogateescape").decode(errors="replace")


@dataclass
class _Found:
    """What a split's listing left out, by kind (:func:`_scan_split`)."""

    others: list[str] = field(default_factory=list)  # regular files without an image extension
    bad_names: list[str] = field(default_factory=list)  # not UTF-8: DALI cannot take the name
    broken: list[str] = field(default_factory=list)  # symlinks that lead nowhere (or a loop)
    special: list[tuple[str, str]] = field(default_factory=list)  # FIFOs, sockets, devices
    empty: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": []})


def _special(entry: os.DirEntry) -> str:
    """'not a regular file (a FIFO)' and the like for an entry that is neither a file nor a
    folder but exists (a FIFO, socket or device, or a link to one); '' otherwise."""
    try:
        return not_regular(entry.stat().st_mode)
    except OSError:
        return ""


def _scan_split(
    split_dir: Path, split: str, index: dict[str, int], found: _Found, extensions: tuple[str, ...]
) -> Split:
    """Image files by extension (``extensions``); what is left out goes to ``found`` by kind.
    ``index``: class folder name -> label. Only regular files are listed: a FIFO or device
    would block or never end when DALI reads it."""
    files: list[str] = []
    labels: list[int] = []
    for name in _class_dirs(split_dir):
        if name not in index:
            raise DalikdError(
                f"{split_dir}/{name} is a class that train/ does not have; "
                "val/ classes must be a subset of train/ classes"
            )
        images = []
        for entry in os.scandir(split_dir / name):
            if _is_file(entry):
                is_image = entry.name.lower().endswith(extensions)
                if is_image and not _utf8(entry.path):
                    found.bad_names.append(entry.path)
                    continue
                (images if is_image else found.others).append(entry.path)
            elif _is_dir(entry):
                continue
            elif _special(entry):
                found.special.append((entry.path, _special(entry)))
            elif entry.is_symlink():  # dangling, or a loop
                found.broken.append(entry.path)
        if not images:
            found.empty[split].append(str(split_dir / name))
        images.sort()
        files += images
        labels += [index[name]] * len(images)
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


def folder_manifest(root: Path) -> Manifest | None:
    """The manifest of an imported folder (layout "folder"); None for a plain folder."""
    manifest = read_manifest(root)
    return manifest if manifest is not None and manifest.layout == "folder" else None


def _manifest_classes(root: Path, manifest: Manifest | None) -> bool:
    """The manifest's classes name the class folders: each is in the folder
    :func:`dalikd.manifest.class_folders` gives it (as ``dalikd data import`` writes them).
    A manifest written beside folders of other names leaves the folder names the classes."""
    if manifest is None:
        return False
    split = "train" if (root / "train").is_dir() else "val"
    found = _class_dirs(root / split) if (root / split).is_dir() else []
    return set(found) <= set(class_folders(manifest.classes))


def class_names(root: str | Path) -> tuple[str, ...]:
    """The class index of a dataset: an imported folder's manifest classes, in label order;
    else its train/ class folders, sorted; val/'s where there is no train/ (evaluation only)."""
    root = _dataset_root(root)
    manifest = folder_manifest(root)
    if _manifest_classes(root, manifest):
        return manifest.classes
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
    max_pixels: int = MAX_PIXELS,
) -> Dataset:
    """List the classes and usable image files of an ImageNet-style folder.

    ``splits``: the ones scanned (the others come back empty); ``classes``: the class index
    (default: :func:`class_names`), e.g. the names a checkpoint was trained on.

    ``check`` runs the data scan of :mod:`dalikd.datacheck` (cached): files that would kill
    the DALI pipeline, or whose header claims more than ``max_pixels`` pixels (0: no limit),
    are left out and listed in ``Dataset.skipped``. A split with no usable image, or a train
    class with none (as torchvision's ImageFolder), is an error unless ``strict`` is False
    (check-data lists what it found first).
    """
    root = _dataset_root(root)
    for split in splits:
        _require_split(root, split)
    classes = classes or class_names(root)
    index, extensions, raw_shape = _layout(root, classes)
    listed = _Found()
    found = {
        name: _scan_split(root / name, name, index, listed, extensions)
        if name in splits else Split((), ())
        for name in ("train", "val")
    }  # fmt: skip
    bad: dict[str, str] = {}
    if check:
        bad = check_files(
            [f for split in found.values() for f in split.files],
            root=root, cache_root=cache_dir() if cache else None, decode=decode,
            progress=progress, max_pixels=max_pixels, raw_shape=raw_shape,
        )  # fmt: skip
    for name, split in found.items():
        keep = [i for i, f in enumerate(split.files) if f not in bad]
        if not keep and strict and name in splits:
            left = f"; {len(split)} left out, see: dalikd check-data {root}" if len(split) else ""
            raise DalikdError(
                f"{root}/{name} holds no usable images{left} (looked for {', '.join(extensions)})"
            )
        found[name] = Split(
            tuple(split.files[i] for i in keep), tuple(split.labels[i] for i in keep)
        )
    if strict and listed.empty["train"]:
        _refuse_empty_classes(listed.empty["train"])
    skipped = (
        sorted(bad.items())
        + [(p, "not an image (file extension)") for p in sorted(listed.others)]
        + sorted(listed.special)
        + [(_printable(p), "file name is not valid UTF-8 (DALI cannot open it)")
           for p in sorted(listed.bad_names)]
        + [(_printable(p), "broken symbolic link (its target is missing or a loop)")
           for p in sorted(listed.broken)]
        + [(p + "/", "empty class folder (no image file)") for p in listed.empty["train"]]
    )  # fmt: skip
    return Dataset(root, classes, found["train"], found["val"], tuple(skipped),
                   empty_val=tuple(listed.empty["val"]), raw_shape=raw_shape)  # fmt: skip


def _layout(
    root: Path, classes: tuple[str, ...]
) -> tuple[dict[str, int], tuple[str, ...], tuple[int, ...]]:
    """(class folder -> label, the image file extensions, the raw image shape or ()) of the
    dataset at ``root``: a plain folder's class folders are the class names; an imported one's
    are :func:`dalikd.manifest.class_folders` of its classes, and its raw images ``.hwc``."""
    manifest = folder_manifest(root)
    index = {name: i for i, name in enumerate(classes)}
    if manifest is None:
        return index, IMAGE_EXTENSIONS, ()
    if _manifest_classes(root, manifest):
        folder_of = dict(zip(manifest.classes, class_folders(manifest.classes), strict=True))
        index = {folder_of.get(name, name): i for i, name in enumerate(classes)}
    if manifest.codec != "raw":
        return index, IMAGE_EXTENSIONS, ()
    return index, (RAW_EXTENSION,), tuple(manifest.image_shape or ())


_RUN_MARKS = (LOCK, *RUN_FILES)  # what a dalikd run folder holds: a class folder with one is a run


def _refuse_empty_classes(empty: list[str]) -> None:
    """One line for train class folders without an image; a run folder there is named so."""
    runs = [p for p in empty if any(os.path.lexists(os.path.join(p, m)) for m in _RUN_MARKS)]
    if runs:
        raise DalikdError(
            f"{runs[0]} is a dalikd run folder inside the dataset's train/, where "
            "every folder is a class; move it (and --out) outside the dataset"
        )
    raise DalikdError(
        f"{len(empty)} train class folder(s) hold no image file, e.g. {empty[0]}; "
        "add images or remove the folder (as torchvision's ImageFolder)"
    )


def train_listing(dataset: Dataset) -> dict[str, Any]:
    """What the training reader's indices refer to: the classes and the train files relative
    to the root, in order; a copy of the dataset in another folder has the same listing."""
    h = hashlib.sha256(("\n".join(dataset.classes) + "\n").encode())
    for path, label in zip(dataset.train.files, dataset.train.labels, strict=True):
        rel = os.path.relpath(path, dataset.root)
        h.update(f"{rel}\t{label}\n".encode(errors="surrogateescape"))
    return {"classes": dataset.num_classes, "train_files": len(dataset.train),
            "sha256": h.hexdigest()}  # fmt: skip

"""The ImageNet-style folder: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``.

Class index = position of the folder name in the sorted list of train classes, the torchvision
ImageFolder convention, so a teacher trained elsewhere lines up with the labels here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _scan_split(split_dir: Path, classes: tuple[str, ...]) -> Split:
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in _class_dirs(split_dir):
        if name not in index:
            raise DalikdError(
                f"{split_dir}/{name} is a class that train/ does not have; "
                "val/ classes must be a subset of train/ classes"
            )
        found = sorted(
            entry.path
            for entry in os.scandir(split_dir / name)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        files += found
        labels += [index[name]] * len(found)
    return Split(tuple(files), tuple(labels))


def scan_dataset(root: str | Path) -> Dataset:
    """List the classes and image files of an ImageNet-style folder (no image is opened)."""
    if not str(root):
        raise DalikdError("no dataset given: pass --data DIR (a folder with train/ and val/)")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DalikdError(f"dataset folder not found: {root}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DalikdError(
                f"{root} has no {split}/ folder; expected {root}/train/<class>/*.JPEG "
                f"and {root}/val/<class>/*.JPEG"
            )
    classes = tuple(_class_dirs(root / "train"))
    if not classes:
        raise DalikdError(f"{root}/train has no class folders")
    train = _scan_split(root / "train", classes)
    val = _scan_split(root / "val", classes)
    for split_name, split in (("train", train), ("val", val)):
        if len(split) == 0:
            raise DalikdError(
                f"{root}/{split_name} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
    return Dataset(root=root, classes=classes, train=train, val=val)

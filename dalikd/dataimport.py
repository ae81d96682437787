"""``dalikd data import``: an official CIFAR-10/100 or Tiny-ImageNet archive into a dataset
folder that dalikd reads with no per-image Python.

The output keeps the ImageNet-style layout, ``OUT/{train,val}/<class>/<stem>.hwc``, one file per
image, and adds ``OUT/dataset.json`` (:mod:`dalikd.manifest`). A ``.hwc`` file is the image's
uint8 pixels in HWC order and nothing else (``image_shape`` bytes, no header): the training
graph reads it with ``fn.readers.file`` and reshapes it, so nothing is decoded. Measured against
PNG (CIFAR) and the original JPEG (Tiny-ImageNet) through the training pipeline's data path,
raw gave 1.5-2.1x the images per CPU second (``benchmarks/cifar_format.py``). Class folders are
the class names where those sort into label order (all three datasets), else ``NNN_name``
(:func:`dalikd.manifest.class_folders`); file stems are the image's row in the CIFAR split
(``00042``), or its name in the zip (``n01443537_0``, ``val_42``).

Atomic: everything is written into ``.OUT.importing`` beside OUT, the manifest last, then
renamed to OUT in one step, so a killed import leaves nothing at OUT. Ctrl-C and SIGTERM remove
the temporary folder; one left by a SIGKILL or a crash is removed (with one line) by the next
import to the same OUT.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dalikd.archives import ARCHIVE_NAMES, OFFICIAL_COUNTS, Archive, open_archive
from dalikd.atomic import fsync_folder
from dalikd.errors import DalikdError
from dalikd.manifest import (
    MANIFEST_NAME,
    RAW_EXTENSION,
    Manifest,
    SplitInfo,
    class_folders,
    write_manifest,
)

DATASETS: tuple[str, ...] = ("cifar100", "cifar10", "tiny-imagenet")

# The reference's normalization (Good-DA-in-KD: dataset/cifar100.py, dataset/tinyimagenet.py),
# on the 0-1 scale; stored x255 in data_defaults. CIFAR-10: our choice, its train set's own
# statistics (the reference trains no CIFAR-10).
_MEAN_STD = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "tiny-imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_PAD = {32: 4, 64: 8}  # px, RandomCrop(size, padding) of the reference at each image size


class ImportReporter(Protocol):
    def progress(self, phase: str, done: int, total: int) -> None:
        """``phase`` (e.g. "writing train") has ``done`` of ``total`` units (bytes, images)."""

    def message(self, text: str) -> None:
        """One line for the user (a warning, a leftover removed)."""


class _Quiet:
    def progress(self, phase: str, done: int, total: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def data_defaults(name: str, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The dataset's own [data] settings, as the reference trains and tests on it."""
    mean, std = _MEAN_STD[name]
    size = image_shape[0]
    return {
        "image_size": size,
        "base_view": "pad_crop",
        "pad": _PAD[size],
        "mean": [round(v * 255, 4) for v in mean],
        "std": [round(v * 255, 4) for v in std],
        "val_transform": "none",  # images used as stored: no resize, no crop
    }


def _sha256(path: Path, reporter: ImportReporter) -> dict[str, Any]:
    h, size, done = hashlib.sha256(), path.stat().st_size, 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                done += len(chunk)
                reporter.progress(f"checksum of {path.name}", done, size)
    except OSError as e:  # not a write error: said here, not by import_dataset's handler
        raise DalikdError(f"cannot read {path}: {e.strerror or e}") from None
    return {"archive": path.name, "bytes": size, "sha256": h.hexdigest()}


def _check_out(out: Path) -> None:
    if out.is_symlink():  # the temporary folder beside it may be on another disk than its target
        raise DalikdError(
            f"{out} is a symbolic link; give a new or empty folder to import into (e.g. the "
            f"link's target, {out.resolve()})"
        )
    if out.is_file():
        raise DalikdError(f"{out} is a file; give a new or empty folder to import into")
    if out.is_dir() and any(out.iterdir()):
        raise DalikdError(f"{out} is not empty; give a new or empty folder to import into")


def temp_folder(out: Path) -> Path:
    """Where an import into ``out`` is written before it is renamed into place."""
    return out.parent / f".{out.name}.importing"


def _claim(out: Path, reporter: ImportReporter) -> Path:
    """The temporary folder, new; a leftover of a killed import is removed with one line, one
    of an import still running (its pid alive) is an error."""
    tmp = temp_folder(out)
    if tmp.exists():
        try:
            pid = int((tmp / ".pid").read_text())
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (OSError, ValueError):  # no pid file, or no such process
            alive = False
        if alive:
            raise DalikdError(
                f"another import into {out} is running (pid {pid}, writing {tmp}); "
                f"if it is not, remove {tmp}"
            )
        reporter.message(f"removing {tmp}, left by an import that did not finish")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / ".pid").write_text(str(os.getpid()))
    return tmp


def _write_split(archive: Archive, split: str, folder: Path, reporter: ImportReporter) -> None:
    images = archive.splits[split]
    folders = class_folders(archive.classes)
    for label in np.unique(images.labels):
        (folder / folders[label]).mkdir(parents=True)
    for i in range(images.count):
        label, stem, pixels = images.read(i)
        if pixels.shape != archive.image_shape or pixels.dtype != np.uint8:
            raise AssertionError(f"{split} image {i}: {pixels.shape} {pixels.dtype}")
        with open(folder / folders[label] / f"{stem}{RAW_EXTENSION}", "xb") as f:
            f.write(np.ascontiguousarray(pixels).data)
        if i % 256 == 255 or i + 1 == images.count:
            reporter.progress(f"writing {split}", i + 1, images.count)


def _publish(tmp: Path, out: Path) -> None:
    """Make the written files durable, then rename the folder into place (one step). An OUT
    that exists (empty: checked before the work) is kept, as a shell may stand in it (``import
    ... .``): the folders move in, and the manifest, which makes the dataset whole, last."""
    (tmp / ".pid").unlink()
    os.sync()  # the files' data on disk before the rename makes them visible as a dataset
    if not out.is_dir():
        os.rename(tmp, out)
    else:
        for entry in sorted(tmp.iterdir(), key=lambda e: e.name == MANIFEST_NAME):
            os.rename(entry, out / entry.name)
        tmp.rmdir()
        fsync_folder(out)
    fsync_folder(out.parent)


def _counts_warning(archive: Archive, path: Path) -> str:
    train, val, classes = OFFICIAL_COUNTS[archive.name]
    got = (archive.splits["train"].count, archive.splits["val"].count, len(archive.classes))
    if got == (train, val, classes):
        return ""
    return (
        f"{path.name} holds {got[0]:,} train and {got[1]:,} val images of {got[2]} classes; "
        f"the official archive holds {train:,}, {val:,} and {classes}: imported as it is"
    )


def _write(arc: Archive, tmp: Path, source: dict, reporter: ImportReporter) -> Manifest:
    """Every image of ``arc`` into ``tmp``; the manifest that describes them (not written)."""
    for split in ("train", "val"):
        _write_split(arc, split, tmp / split, reporter)
    splits = {
        split: SplitInfo(
            images.count,
            tuple(int(n) for n in np.bincount(images.labels, minlength=len(arc.classes))),
        )
        for split, images in arc.splits.items()
    }
    return Manifest(
        name=arc.name, layout="folder", codec="raw", classes=arc.classes, splits=splits,
        image_shape=arc.image_shape, data_defaults=data_defaults(arc.name, arc.image_shape),
        source=source,
    )  # fmt: skip


def import_dataset(
    name: str, archive: str | Path, out: str | Path, reporter: ImportReporter | None = None
) -> Manifest:
    """Import the official archive of dataset ``name`` (one of :data:`DATASETS`) into the new
    or empty folder ``out``; returns the manifest written there."""
    reporter = reporter or _Quiet()
    if name not in DATASETS:
        raise DalikdError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    path, out = Path(archive).expanduser(), Path(out).expanduser().absolute()
    if path.is_dir():
        raise DalikdError(f"{path} is a folder; give the archive file ({ARCHIVE_NAMES[name]})")
    if not path.is_file():
        raise DalikdError(f"archive not found: {path}")
    _check_out(out)
    with _term_as_interrupt():
        return _import(name, path, out, reporter)


@contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a job scheduler) interrupts the import as Ctrl-C does, so
    its temporary folder is removed too (SIGKILL leaves it to the next import into OUT)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _import(name: str, path: Path, out: Path, reporter: ImportReporter) -> Manifest:
    try:
        tmp = _claim(out, reporter)
    except OSError as e:  # OUT's parent missing as a folder, read-only, not writable
        raise DalikdError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
    try:
        source = _sha256(path, reporter)
        with open_archive(name, path, reporter.progress) as arc:
            if warning := _counts_warning(arc, path):
                reporter.message(warning)
            manifest = _write(arc, tmp, source, reporter)
        write_manifest(manifest, tmp)  # the last file: a folder with it is complete
        _publish(tmp, out)
    except OSError as e:  # a full or read-only disk: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise DalikdError(f"cannot write {e.filename or tmp}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

"""The official archives of CIFAR-10, CIFAR-100 and Tiny-ImageNet, read with the standard
library, numpy and Pillow (Tiny-ImageNet's JPEGs): what :mod:`dalikd.dataimport` writes out.

- ``cifar-100-python.tar.gz``: ``cifar-100-python/{train,test,meta}``, Python pickles of a dict
  (``data``: N x 3072 uint8 rows, the R, G and B planes of a 32x32 image; ``fine_labels``; the
  meta file's ``fine_label_names``). Labels are the fine labels, as torchvision's CIFAR100.
- ``cifar-10-python.tar.gz``: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
  (``labels``; ``label_names``); train rows are the five batches in order, as torchvision's.
- ``tiny-imagenet-200.zip``: ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt``, ``wnids.txt``. Class i = the i-th wnid in sorted order (the order
  of torchvision's ImageFolder over train/). The test split has no labels and is not read.

CIFAR's pickles come from the internet: :class:`RestrictedUnpickler` builds numpy arrays, lists,
dicts and strings and refuses every other global, so a malicious pickle cannot run code.

Every problem with an archive (wrong kind, damaged, truncated, a member missing, labels that do
not add up) is one :class:`DalikdError` line naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dalikd.errors import DalikdError

Progress = Callable[[str, int, int], None]  # (phase, done, total)

# name -> (archive file name, member folder, train members, test members, meta member, label key,
# names key). Official counts: train, val images.
CIFAR = {
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), "meta",
                 "fine_labels", "fine_label_names"),
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                "labels", "label_names"),
}  # fmt: skip
TINY = ("tiny-imagenet-200.zip", "tiny-imagenet-200")
ARCHIVE_NAMES = {**{name: spec[0] for name, spec in CIFAR.items()}, "tiny-imagenet": TINY[0]}
OFFICIAL_COUNTS = {  # images per split and classes of the official archives
    "cifar100": (50_000, 10_000, 100),
    "cifar10": (50_000, 10_000, 10),
    "tiny-imagenet": (100_000, 10_000, 200),
}


@dataclass(frozen=True)
class Images:
    """One split as it will be written: ``count`` images, read one at a time by ``read(i)``
    -> (label, file stem, uint8 HWC pixels). Stems are unique within the split."""

    count: int
    labels: np.ndarray  # int64 (count,): the label of each image, known before any is read
    read: Callable[[int], tuple[int, str, np.ndarray]]


@dataclass(frozen=True)
class Archive:
    name: str  # "cifar100" | "cifar10" | "tiny-imagenet"
    classes: tuple[str, ...]  # the dataset's class names in label order
    image_shape: tuple[int, int, int]  # (H, W, C) of every image
    splits: dict[str, Images]  # "train", "val"


# -- the restricted unpickler --------------------------------------------------------------------

# numpy's array reconstruction function, taken from an array instead of imported by its module
# path (numpy.core in NumPy 1, numpy._core in NumPy 2; pickles name either)
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # bytes in a protocol-2 pickle written by Python 3 (e.g. a re-saved file): str -> bytes
    ("_codecs", "encode"): __import__("codecs").encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles what the official CIFAR files hold (dicts, lists, strings, ints and numpy
    arrays) and refuses any other global: the pickle names its module and name, which is
    where code execution would come from."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: CIFAR files hold only numpy arrays, lists, dicts "
                "and strings"
            )
        return found


def restricted_load(data: bytes) -> Any:
    """``data`` unpickled with :class:`RestrictedUnpickler`; Python 2 strings as latin-1 (the
    official files were written by Python 2; numpy needs latin-1 for its array bytes)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# -- CIFAR ---------------------------------------------------------------------------------------


def _kind_of(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "a zip file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    return "neither a gzip nor a zip file"


class _Counting(io.RawIOBase):
    """A file that reports how many bytes were read (the progress of a streamed tar.gz)."""

    def __init__(self, f: Any, total: int, progress: Progress, phase: str) -> None:
        self._f, self._total, self._progress, self._phase = f, total, progress, phase

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        self._progress(self._phase, self._f.tell(), self._total)
        return n


def _tar_members(path: Path, wanted: set[str], progress: Progress) -> dict[str, bytes]:
    """The bytes of the members named in ``wanted`` (full paths), in one streamed pass; also the
    names of every member seen, under the key "" (a newline-joined listing)."""
    found: dict[str, bytes] = {}
    seen: list[str] = []
    size = path.stat().st_size
    try:
        with open(path, "rb", buffering=0) as raw:
            counted = io.BufferedReader(_Counting(raw, size, progress, f"reading {path.name}"))
            # gzip's reader, not tarfile's "r|gz": only it checks the stream's CRC-32, at its
            # end, which the loop below must reach (corrupt stored blocks decode without error)
            with gzip.GzipFile(fileobj=counted, mode="rb") as gz:
                with tarfile.open(fileobj=gz, mode="r|") as tar:
                    for member in tar:
                        name = member.name.removeprefix("./")  # a re-packed archive's prefix
                        seen.append(name)
                        if name in wanted and member.isfile():
                            f = tar.extractfile(member)
                            found[name] = f.read() if f else b""
                while gz.read(1 << 20):  # the rest (end-of-archive padding), then the CRC
                    pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        kind = _kind_of(path)
        if kind != "a gzip file":
            raise DalikdError(f"{path} is {kind}, not the tar.gz archive expected") from None
        raise DalikdError(f"{path} is damaged or truncated: {e}") from None
    found[""] = "\n".join(seen).encode()
    return found


def _cifar_dict(path: Path, member: str, blob: bytes, keys: tuple[str, ...]) -> dict:
    try:
        value = restricted_load(blob)
    except Exception as e:  # a refused global, or bytes that are no pickle at all
        raise DalikdError(f"{path}: member {member} is not a CIFAR pickle: {e}") from None
    missing = [k for k in keys if not isinstance(value, dict) or k not in value]
    if missing:
        raise DalikdError(f"{path}: member {member} has no '{missing[0]}' entry")
    return value


def _cifar_rows(path: Path, member: str, d: dict, label_key: str, classes: int) -> tuple:
    data, labels = d["data"], np.asarray(d[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:  # fmt: skip
        raise DalikdError(f"{path}: member {member}'s data is not N x 3072 uint8 rows")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DalikdError(
            f"{path}: member {member} has {len(data)} images but {labels.size} labels"
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
        raise DalikdError(
            f"{path}: member {member} has a label outside 0..{classes - 1} (the meta file's "
            f"{classes} classes)"
        )
    return data, labels.astype(np.int64)


def read_cifar(name: str, path: Path, progress: Progress) -> Archive:
    """CIFAR-100 (``name`` "cifar100") or CIFAR-10 ("cifar10") from its official tar.gz."""
    archive, folder, train, test, meta, label_key, names_key = CIFAR[name]
    wanted = [f"{folder}/{m}" for m in (*train, *test, meta)]
    members = _tar_members(path, set(wanted), progress)
    listing = members.pop("").decode().split("\n")
    missing = [m for m in wanted if m not in members]
    if missing:
        tops = {m.split("/")[0] for m in listing if m}
        other = next((n for n, spec in CIFAR.items() if spec[1] in tops and n != name), None)
        hint = f" (it holds {CIFAR[other][1]}/: import it as {other})" if other else ""
        raise DalikdError(
            f"{path} has no member {missing[0]}; expected the official {archive}{hint}"
        )
    m = f"{folder}/{meta}"
    names = _cifar_dict(path, m, members[m], (names_key,))[names_key]
    if not isinstance(names, list) or not all(isinstance(c, str) and c for c in names) \
            or len(set(names)) != len(names):  # fmt: skip
        raise DalikdError(f"{path}: member {m}'s {names_key} are not distinct class names")
    splits = {}
    for split, parts in (("train", train), ("val", test)):
        rows = []
        for part in parts:
            member = f"{folder}/{part}"
            d = _cifar_dict(path, member, members.pop(member), ("data", label_key))
            rows.append(_cifar_rows(path, member, d, label_key, len(names)))
        if len(rows) == 1:  # CIFAR-100: no copy of its 150 MB
            data, labels = rows[0]
        else:
            data, labels = (
                np.concatenate([r[0] for r in rows]),
                np.concatenate([r[1] for r in rows]),
            )
        splits[split] = _cifar_images(data, labels)
    return Archive(name, tuple(names), (32, 32, 3), splits)


def _cifar_images(data: np.ndarray, labels: np.ndarray) -> Images:
    # a row is the R, G, B planes of 32 x 32: as (3, 32, 32) -> HWC, as torchvision does
    hwc = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    width = len(str(max(len(data) - 1, 0)))

    def read(i: int) -> tuple[int, str, np.ndarray]:
        return int(labels[i]), f"{i:0{width}d}", hwc[i]

    return Images(len(data), labels, read)


# -- Tiny-ImageNet -------------------------------------------------------------------------------

_TRAIN = re.compile(r"train/([^/]+)/images/([^/]+)\.jpe?g", re.IGNORECASE)
_VAL = re.compile(r"val/images/([^/]+)\.jpe?g", re.IGNORECASE)


def _zip_text(z: zipfile.ZipFile, path: Path, member: str) -> str:
    try:
        return z.read(member).decode("utf-8")
    except KeyError:
        raise DalikdError(
            f"{path} has no member {member}; expected the official {TINY[0]}"
        ) from None
    except (zipfile.BadZipFile, zlib.error, UnicodeDecodeError, EOFError, OSError) as e:
        raise DalikdError(f"{path}: member {member} is damaged: {e}") from None


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        kind = _kind_of(path)
        if kind != "a zip file":
            raise DalikdError(f"{path} is {kind}, not the zip archive expected") from None
        raise DalikdError(f"{path} is damaged or truncated: {e}") from None


def _tiny_val(z: zipfile.ZipFile, path: Path, root: str, index: dict[str, int],
              files: dict[str, str]) -> list[tuple[int, str, str]]:  # fmt: skip
    """(label, stem, member) of every val image, by val_annotations.txt."""
    member = f"{root}val/val_annotations.txt"
    out = []
    for n, line in enumerate(_zip_text(z, path, member).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        image, wnid = fields[0], fields[1] if len(fields) > 1 else ""
        stem = os.path.splitext(image)[0]
        if wnid not in index or stem not in files:
            what = f"class {wnid!r}" if wnid not in index else f"image {image!r}"
            raise DalikdError(f"{path}: {member} line {n} names an unknown {what}")
        out.append((index[wnid], stem, files.pop(stem)))
    if files:
        raise DalikdError(f"{path}: {files.popitem()[1]} has no line in {member}")
    return out


def read_tiny(z: zipfile.ZipFile, path: Path) -> Archive:
    """Tiny-ImageNet from its open official zip; images are decoded as they are read."""
    names = z.namelist()
    root = f"{TINY[1]}/" if any(n.startswith(f"{TINY[1]}/") for n in names) else ""
    wnids = _zip_text(z, path, f"{root}wnids.txt").split()
    train: list[tuple[str, str, str]] = []  # (wnid, stem, member)
    val_files: dict[str, str] = {}
    for member in names:
        rel = member[len(root) :]
        if m := _TRAIN.fullmatch(rel):
            train.append((m[1], m[2], member))
        elif m := _VAL.fullmatch(rel):
            val_files[m[1]] = member
    folders = {wnid for wnid, _, _ in train}
    if not train:
        raise DalikdError(f"{path} has no train/<wnid>/images/*.JPEG; expected the official "
                          f"{TINY[0]}")  # fmt: skip
    if sorted(folders) != sorted(set(wnids)) or len(set(wnids)) != len(wnids):
        extra = sorted(folders ^ set(wnids)) or ["(a repeated line)"]
        raise DalikdError(f"{path}: wnids.txt and the train/ class folders differ, e.g. {extra[0]}")
    classes = tuple(sorted(wnids))  # torchvision's ImageFolder order over train/
    index = {c: i for i, c in enumerate(classes)}
    train_rows = sorted((index[w], stem, member) for w, stem, member in train)
    val_rows = sorted(_tiny_val(z, path, root, index, val_files))
    return Archive(
        "tiny-imagenet", classes, (64, 64, 3),
        {"train": _tiny_images(z, path, train_rows), "val": _tiny_images(z, path, val_rows)},
    )  # fmt: skip


def decode_jpeg(data: bytes) -> np.ndarray:
    """uint8 HWC RGB pixels of an encoded image (Pillow; greyscale images become RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _tiny_images(z: zipfile.ZipFile, path: Path, rows: list[tuple[int, str, str]]) -> Images:
    def read(i: int) -> tuple[int, str, np.ndarray]:
        label, stem, member = rows[i]
        try:
            pixels = decode_jpeg(z.read(member))
        except Exception as e:  # a damaged member (CRC, truncated) or an unreadable image
            raise DalikdError(f"{path}: member {member} is damaged: {e}") from None
        if pixels.shape != (64, 64, 3):
            raise DalikdError(
                f"{path}: member {member} is {pixels.shape[1]}x{pixels.shape[0]} px; "
                "Tiny-ImageNet's images are 64x64"
            )
        return label, stem, pixels

    return Images(len(rows), np.array([r[0] for r in rows], np.int64), read)


@contextmanager
def open_archive(name: str, path: Path, progress: Progress) -> Iterator[Archive]:
    """The official archive of dataset ``name`` ("cifar100", "cifar10", "tiny-imagenet") at
    ``path``; Tiny-ImageNet's zip stays open (its images are read as they are written)."""
    if name == "tiny-imagenet":
        with open_zip(path) as z:
            yield read_tiny(z, path)
    else:
        yield read_cifar(name, path, progress)

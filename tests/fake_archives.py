"""Small archives in the official layouts of CIFAR-100, CIFAR-10 and Tiny-ImageNet, for tests.

The CIFAR pickles are written as the official files are (Python 2, protocol 2: strings are
py2 ``str``, the array's module ``numpy.core.multiarray``). Each builder returns the path and
the source the importer must reproduce exactly: the classes in label order and, per split,
the HWC pixels and labels in the archive's row order (Tiny: the image file name and bytes).
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


class Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 strings (SHORT_BINSTRING / BINSTRING), as cPickle did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = bytes([n]) if n < 256 else struct.pack("<i", n)
        self.write((pickle.SHORT_BINSTRING if n < 256 else pickle.BINSTRING) + head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # NumPy 2 names its array module numpy._core; the official files (NumPy 1) numpy.core
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _py2(d: dict) -> dict:
    """Keys and string lists as py2 strings (bytes here)."""

    def conv(v):
        if isinstance(v, str):
            return v.encode()
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return {k.encode(): conv(v) for k, v in d.items()}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _split(rng, classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """CHW rows (N, 3072) of random pixels and shuffled labels, ``per_class`` of each."""
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    rows = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return rows, labels


def hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def make_cifar100(
    path: Path,
    classes: tuple[str, ...] = ("apple", "aquarium_fish", "bear", "worm"),
    train_per_class: int = 3,
    test_per_class: int = 2,
    *,
    seed: int = 0,
    drop: str = "",
    edit=None,
) -> tuple[Path, dict]:
    """A cifar-100-python.tar.gz; ``drop`` leaves that member out, ``edit(member, dict)`` may
    change a pickled dict before it is written."""
    rng = np.random.default_rng(seed)
    source = {"classes": classes}
    members = {}
    for member, n in (("train", train_per_class), ("test", test_per_class)):
        rows, labels = _split(rng, len(classes), n)
        source["train" if member == "train" else "val"] = (hwc(rows), labels)
        members[member] = {
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
            "batch_label": f"{member} batch 1 of 1",
            "fine_labels": [int(v) for v in labels],
            "coarse_labels": [int(v) // 2 for v in labels],
            "data": rows,
        }
    members["meta"] = {
        "fine_label_names": list(classes),
        "coarse_label_names": [f"super_{i}" for i in range(len(classes))],
    }
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_dir("cifar-100-python"))
        _add(tar, "cifar-100-python/file.txt~", b"")
        for member, d in members.items():
            if member == drop:
                continue
            if edit:
                edit(member, d)
            _add(tar, f"cifar-100-python/{member}", py2_pickle(_py2(d)))
    return path, source


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def make_cifar10(
    path: Path,
    classes: tuple[str, ...] = ("airplane", "automobile", "bird"),
    batch_per_class: int = 1,
    test_per_class: int = 2,
    *,
    seed: int = 0,
) -> tuple[Path, dict]:
    """A cifar-10-python.tar.gz: five data batches (train rows: batch 1..5 in order)."""
    rng = np.random.default_rng(seed)
    batches, train = {}, []
    for b in range(1, 6):
        rows, labels = _split(rng, len(classes), batch_per_class)
        batches[f"data_batch_{b}"] = (rows, labels)
        train.append((rows, labels))
    batches["test_batch"] = _split(rng, len(classes), test_per_class)
    rows = np.concatenate([r for r, _ in train])
    source = {
        "classes": classes,
        "train": (hwc(rows), np.concatenate([lb for _, lb in train])),
        "val": (hwc(batches["test_batch"][0]), batches["test_batch"][1]),
    }
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_dir("cifar-10-batches-py"))
        _add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        meta = {"label_names": list(classes), "num_cases_per_batch": 10000, "num_vis": 3072}
        _add(tar, "cifar-10-batches-py/batches.meta", py2_pickle(_py2(meta)))
        for name, (rows, labels) in batches.items():
            d = {"batch_label": name, "labels": [int(v) for v in labels], "data": rows,
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}  # fmt: skip
            _add(tar, f"cifar-10-batches-py/{name}", py2_pickle(_py2(d)))
    return path, source


def _jpeg(rng, grey: bool = False, size: int = 64) -> bytes:
    pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    (image.convert("L") if grey else image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_tiny(
    path: Path,
    wnids: tuple[str, ...] = ("n09999999", "n01443537", "n02085620"),  # wnids.txt is unsorted
    train_per_class: int = 3,
    val_per_class: int = 2,
    *,
    seed: int = 0,
    drop: str = "",
    odd_size: bool = False,
) -> tuple[Path, dict]:
    """A tiny-imagenet-200.zip; ``drop``: a member (path under tiny-imagenet-200/) left out.
    The first train image of the first class is greyscale; ``odd_size`` makes it 32x32."""
    rng = np.random.default_rng(seed)
    root = "tiny-imagenet-200/"
    files: dict[str, bytes] = {
        "wnids.txt": "".join(f"{w}\n" for w in wnids).encode(),
        "words.txt": "".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)).encode(),
    }
    train: dict[str, tuple[str, bytes]] = {}  # stem -> (wnid, jpeg)
    for k, w in enumerate(wnids):
        files[f"train/{w}/{w}_boxes.txt"] = b""
        for i in range(train_per_class):
            first = k == 0 and i == 0
            data = _jpeg(rng, grey=first, size=32 if first and odd_size else 64)
            files[f"train/{w}/images/{w}_{i}.JPEG"] = data
            train[f"{w}_{i}"] = (w, data)
    val: dict[str, tuple[str, bytes]] = {}
    order = rng.permutation([w for w in wnids for _ in range(val_per_class)])
    lines = []
    for i, w in enumerate(order):
        data = _jpeg(rng)
        files[f"val/images/val_{i}.JPEG"] = data
        val[f"val_{i}"] = (str(w), data)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n")
    files["val/val_annotations.txt"] = "".join(lines).encode()
    files["test/images/test_0.JPEG"] = _jpeg(rng)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            if name != drop:
                z.writestr(root + name, data)
    return path, {"classes": tuple(sorted(wnids)), "train": train, "val": val}

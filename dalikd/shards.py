"""Tar shards in the WebDataset layout: what ``dalikd data shard`` writes and how a reader finds
them. No DALI here (the DALI graph piece is :mod:`dalikd.shard_source`; the check is
:mod:`dalikd.shardcheck`).

A shard set is a folder::

    OUT/dataset.json                 the manifest (layout "shards"), written last
    OUT/train-00000.tar, .idx ...    shards of a split, each with DALI's index file beside it
    OUT/val-00000.tar, .idx ...

Each sample is three members with one key, in this order (docs/shards.md says why):

- ``<key>.<ext>``: the image file's bytes unchanged; ``ext`` from its content (jpg, png, ...).
- ``<key>.cls``: the class index as ASCII decimal (the WebDataset convention other tools read).
- ``<key>.dalikd``: two little-endian int32, the class index and the sample's number in its
  split. DALI hands a member over as raw bytes, so the label it reads must be binary, and the
  number is how a failed sample is named: DALI's decoder errors do not say which sample failed,
  and a sample's key cannot be a reader output.

Samples are numbered 0.. in the split's order (the source listing shuffled once with the seed);
the key is the number, zero-padded; shards hold consecutive numbers.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from dalikd.datacheck import sniff
from dalikd.errors import DalikdError
from dalikd.manifest import Manifest, Shard, read_manifest

SPLITS = ("train", "val")
BLOCK = 512  # tar's block: every header and every member's data start on one
ID_EXT = "dalikd"  # the member holding (label, sample number) as int32
# image extension by format (datacheck.sniff's names); the reader maps all of them to images
IMAGE_EXTS = {"jpeg": "jpg", "png": "png", "bmp": "bmp", "tiff": "tiff", "webp": "webp",
              "jp2": "jp2", "pnm": "pnm"}  # fmt: skip
KEY_DIGITS = 9  # keys 000000000..999999999
INDEX_VERSION = "v1.2"  # DALI's index format: "<ext> <offset> <size> <member name>" per member
GiB = 1 << 30

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def sample_key(number: int) -> str:
    return f"{number:0{KEY_DIGITS}d}"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.tar"


def index_name(shard: str) -> str:
    """DALI's index file of shard ``x.tar``: ``x.idx`` beside it."""
    return shard.removesuffix(".tar") + ".idx"


def parse_size(text: str) -> int:
    """Bytes from "1GiB", "512MiB", "500MB", "2G" (K/M/G and KiB/MiB/GiB are powers of 1024,
    KB/MB/GB of 1000) or a plain number."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m or (m[3].lower() == "i" or (m[3].lower() == "ib" and not m[2])):
        raise DalikdError(f"cannot read the size {text!r}: write e.g. 1GiB, 512MiB or 500MB")
    power = " KMGT".index(m[2].upper() or " ")
    base = 1000 if m[3].upper() == "B" and m[2] else 1024
    size = int(float(m[1]) * base**power)
    if size < 1:
        raise DalikdError(f"the size {text!r} is not positive")
    return size


# -- reading a shard set's manifest -------------------------------------------------------------


@dataclass(frozen=True)
class ShardSplit:
    """One split of a shard set, as a reader needs it: the shard files in order and how to name
    a sample from its number."""

    folder: Path
    split: str
    classes: tuple[str, ...]
    shards: tuple[Shard, ...]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def tar_paths(self) -> list[str]:
        return [str(self.folder / s.name) for s in self.shards]

    def index_paths(self) -> list[str]:
        return [str(self.folder / index_name(s.name)) for s in self.shards]

    def locate(self, number: int) -> tuple[str, str]:
        """(shard file name, key) of sample ``number``."""
        return self.shards[self._shard_of(number)].name, sample_key(number)

    def image(self, number: int) -> bytes:
        """The image bytes of sample ``number``, found through its shard's index file (e.g. to
        decode the samples of a failed batch one by one)."""
        i = self._shard_of(number)
        line = number - sum(s.samples for s in self.shards[:i]) + 1  # line 0: the header
        with open(self.folder / index_name(self.shards[i].name), encoding="utf-8") as f:
            fields = next(islice(f, line, None)).split()
        offset, size = fields[1:3]  # the image is a sample's first member: ext offset size name
        with open(self.folder / self.shards[i].name, "rb") as f:
            f.seek(int(offset))
            return f.read(int(size))

    def _shard_of(self, number: int) -> int:
        ends = np.cumsum([s.samples for s in self.shards]).tolist()
        if not 0 <= number < (ends[-1] if ends else 0):
            raise DalikdError(f"{self.folder}: {self.split} has no sample number {number}")
        return bisect.bisect_right(ends, number)


def shard_manifest(folder: str | Path) -> Manifest | None:
    """``folder``'s manifest where it describes a shard set; None for any other folder."""
    manifest = read_manifest(folder)
    return manifest if manifest is not None and manifest.layout == "shards" else None


def shard_split(folder: str | Path, split: str) -> ShardSplit:
    """The shards of ``split``, checked cheaply (each file there, each tar of its manifest size:
    a truncated or missing shard is one line here, not a pipeline error mid-epoch)."""
    folder = Path(folder).expanduser().resolve()
    manifest = shard_manifest(folder)
    if manifest is None:
        raise DalikdError(f"{folder} holds no shard set (no dataset.json of layout shards)")
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise DalikdError(f"the shard set {folder} has no {split} split")
    shards = manifest.splits[split].shards
    for shard in shards:
        path = folder / shard.name
        try:
            size = path.stat().st_size
            (folder / index_name(shard.name)).stat()
        except OSError as e:
            raise DalikdError(f"{e.filename} is missing: the shard set is incomplete") from None
        if size != shard.bytes:
            raise DalikdError(_size_problem(path, size, shard.bytes))
    return ShardSplit(folder, split, manifest.classes, shards)


def _size_problem(path: Path, size: int, expected: int) -> str:
    what = "is truncated" if size < expected else "is longer than the manifest says"
    return f"{path} {what}: {size:,} bytes, the manifest lists {expected:,} (dalikd check-data)"


# -- tar bytes ----------------------------------------------------------------------------------


def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def tar_header(name: str, size: int) -> bytes:
    """A ustar header: regular file, mode 0644, owner 0, mtime 0, so the same input always
    gives the same bytes (and checksum)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def sample_members(number: int, label: int, image: bytes) -> list[tuple[str, str, bytes]]:
    """(extension, member name, bytes) of one sample, in the order they are written."""
    fmt = sniff(image[:16])
    if fmt not in IMAGE_EXTS:
        raise ValueError("not an image format DALI decodes")
    key = sample_key(number)
    parts = [
        (IMAGE_EXTS[fmt], image),
        ("cls", str(label).encode()),
        (ID_EXT, np.array([label, number], "<i4").tobytes()),
    ]
    return [(ext, f"{key}.{ext}", data) for ext, data in parts]


def sample_tar_bytes(image_size: int) -> int:
    """What one sample adds to a shard: three headers, the image padded to a block, two data
    blocks (the label text and the 8-byte id)."""
    return 3 * BLOCK + padded(image_size) + 2 * BLOCK


def index_line(members: list[tuple[str, int, int, str]]) -> str:
    """One sample's line of DALI's index file from (ext, data offset, size, name) per member."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

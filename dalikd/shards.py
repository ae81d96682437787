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
import fnmatch
import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np

from dalikd.atomic import write_text_atomic
from dalikd.datacheck import sniff
from dalikd.errors import DalikdError
from dalikd.manifest import MANIFEST_NAME, Manifest, Shard, read_manifest

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
    a sample from its number. ``first``: the number of each shard's first sample (the shards
    of a whole split: 0, then running totals; a glob's or a subset's pick of them: their own).
    ``index_dir``: where the index files DALI reads are (None: beside the shards; a
    :meth:`subset` writes its own there, named ``index_files``, one per entry of ``shards``:
    a subset may read one shard in several runs, each through its own index file)."""

    folder: Path
    split: str
    classes: tuple[str, ...]
    shards: tuple[Shard, ...]
    first: tuple[int, ...] = ()
    index_dir: Path | None = None
    picked: int = -1  # samples read (a subset's); -1: every sample of the shards
    index_files: tuple[str, ...] = ()  # a subset's index file per entry, in ``index_dir``

    def __post_init__(self) -> None:
        if not self.first:
            starts = np.cumsum([0] + [s.samples for s in self.shards])[:-1].tolist()
            object.__setattr__(self, "first", tuple(starts))

    @property
    def samples(self) -> int:
        return self.picked if self.picked >= 0 else sum(s.samples for s in self.shards)

    def __len__(self) -> int:
        return self.samples

    def tar_paths(self) -> list[str]:
        return [str(self.folder / s.name) for s in self.shards]

    def index_paths(self) -> list[str]:
        if self.index_dir is not None and self.index_files:
            return [str(self.index_dir / name) for name in self.index_files]
        where = self.index_dir or self.folder
        return [str(where / index_name(s.name)) for s in self.shards]

    def locate(self, number: int) -> tuple[str, str]:
        """(shard file name, key) of sample ``number``."""
        return self.shards[self._shard_of(number)].name, sample_key(number)

    def image(self, number: int) -> bytes:
        """The image bytes of sample ``number``, found through its shard's index file (e.g. to
        decode the samples of a failed batch one by one)."""
        i = self._shard_of(number)
        line = number - self.first[i] + 1  # line 0: the header
        with open(self.folder / index_name(self.shards[i].name), encoding="utf-8") as f:
            text = next(islice(f, line, None), "")
        fields = self._index_line(i, number, text).split()
        offset, size = fields[1:3]  # the image is a sample's first member: ext offset size name
        with open(self.folder / self.shards[i].name, "rb") as f:
            f.seek(int(offset))
            return f.read(int(size))

    def digest(self) -> str:
        """sha256 of what this split reads: the class names, then each shard's name, first
        number, samples and sha256 (from the manifest: nothing is read), and a subset's pick.
        The same shards copied elsewhere have the same digest; a re-shard (another seed,
        size or source) another."""
        h = hashlib.sha256(("\n".join(self.classes) + f"\n[{self.split}]\n").encode())
        for shard, first in zip(self.shards, self.first, strict=True):
            h.update(f"{shard.name}\t{first}\t{shard.samples}\t{shard.sha256}\n".encode())
        if self.index_dir is not None:  # a subset: its filtered index files say which samples
            for path in self.index_paths():
                h.update(Path(path).read_bytes())
        return h.hexdigest()

    def subset(self, numbers: Iterable[int], index_dir: str | Path) -> ShardSplit:
        """The samples ``numbers`` of this split, **in this order** (repeats allowed), read from
        the same tars through index files written to ``index_dir``: DALI reads the samples an
        index lists, in the index's order, gaps allowed, and the same tar may be listed again
        with another index (docs/shards.md, "DALI 2.4 facts"). Consecutive samples of one
        shard make one entry (one tar opened, one index file); a list that returns to a shard
        later makes another. This is how dalikd gives a rank its own sample list of an epoch
        (dalikd.recovery.ShardSource)."""
        numbers = list(numbers)
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        lines: dict[int, list[str]] = {}  # shard position -> its index file's sample lines
        runs: list[tuple[int, list[int]]] = []  # (shard position, numbers in order)
        for n in numbers:
            i = self._shard_of(n, asked=True)
            if runs and runs[-1][0] == i:
                runs[-1][1].append(n)
            else:
                runs.append((i, [n]))
        files = []
        for k, (i, run) in enumerate(runs):
            if i not in lines:
                lines[i] = self._index_lines(i)
            kept = [self._index_line(i, n, lines[i][n - self.first[i]]) for n in run]
            text = f"{INDEX_VERSION} {len(kept)}\n" + "".join(line + "\n" for line in kept)
            files.append(f"{k:06d}-{index_name(self.shards[i].name)}")
            write_text_atomic(text, index_dir / files[-1])
        return replace(self, shards=tuple(self.shards[i] for i, _ in runs),
                       first=tuple(self.first[i] for i, _ in runs), index_dir=index_dir,
                       picked=len(numbers), index_files=tuple(files))  # fmt: skip

    def _index_lines(self, i: int) -> list[str]:
        """The sample lines of entry ``i``'s index file, as many as the manifest's samples."""
        path = self.folder / index_name(self.shards[i].name)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DalikdError(f"cannot read {path}: {e}") from None
        if lines[:1] != [f"{INDEX_VERSION} {self.shards[i].samples}"] or len(lines) < 2:
            raise DalikdError(self._stale(path, "its header does not match the manifest"))
        return lines[1:]

    def _index_line(self, i: int, number: int, line: str) -> str:
        """``line`` of entry ``i``'s index file, checked to be sample ``number``'s (its first
        member named ``<key>.<ext>``): DALI trusts an index blindly, so a stale or foreign one
        would feed it another sample's bytes."""
        fields = line.split(" ", 4)
        if len(fields) < 4 or fields[3] != f"{sample_key(number)}.{fields[0]}":
            path = self.folder / index_name(self.shards[i].name)
            raise DalikdError(self._stale(path, f"it does not list sample {sample_key(number)}"))
        return line

    def _stale(self, path: Path, why: str) -> str:
        return (f"{path} is stale or damaged ({why}): DALI would read wrong bytes through it; "
                f"dalikd check-data {self.folder} names every problem")  # fmt: skip

    def _shard_of(self, number: int, asked: bool = False) -> int:
        """The entry of ``shards`` that holds sample ``number`` (the first such entry)."""
        i = bisect.bisect_right(self.first, number) - 1
        if self.index_files:  # a subset's entries need not be in order: look at each
            i = next((j for j, f in enumerate(self.first)
                      if f <= number < f + self.shards[j].samples), -1)  # fmt: skip
        if i < 0 or number >= self.first[i] + self.shards[i].samples:
            what = "every sample asked for" if asked else f"sample number {number}"
            raise DalikdError(
                f"{self.folder}: {self.split} {'does not hold' if asked else 'has no'} {what}"
            )
        return i


def shard_manifest(folder: str | Path) -> Manifest | None:
    """``folder``'s manifest where it describes a shard set; None for any other folder."""
    manifest = read_manifest(folder)
    return manifest if manifest is not None and manifest.layout == "shards" else None


def is_glob(path: str | Path) -> bool:
    """``--data`` given as a path glob (``OUT/train-0000[0-3].tar``) rather than a folder."""
    return any(c in str(path) for c in "*?[") and not Path(path).expanduser().is_dir()


def shard_set_of(path: str | Path) -> tuple[Path, str] | None:
    """``(folder, pattern)`` where ``--data path`` names a shard set: a folder whose
    dataset.json has layout "shards" (pattern ""), or a glob of its tar files (pattern: the
    glob's file part); None for anything else (a folder of image files).

    A glob picks shards of one shard set: its tars must sit in one folder beside their
    manifest (the class names, counts and checksums come from there). A glob of tars without
    one is refused: without it there are no class names, no class count short of reading every
    sample's label, no split and no checksums a resume can check.
    """
    if not str(path):
        return None
    if not is_glob(path):
        folder = Path(path).expanduser()
        return (folder.resolve(), "") if shard_manifest(folder) is not None else None
    glob = Path(os.path.abspath(Path(path).expanduser()))
    if is_glob(glob.parent) or not glob.name.endswith(".tar"):
        raise DalikdError(
            f"--data {path}: a glob picks the .tar shards of one folder, e.g. "
            "OUT/train-0000[0-3].tar (its folder part without * ? [)"
        )
    folder = glob.parent.resolve()
    if shard_manifest(folder) is None:
        raise DalikdError(
            f"--data {path}: {folder} has no dataset.json of layout shards beside the tars; "
            "dalikd reads shards with their manifest (class names, counts, checksums): write "
            "them with dalikd data shard, or copy its dataset.json there"
        )
    return folder, glob.name


def shard_split(folder: str | Path, split: str, pattern: str = "") -> ShardSplit:
    """The shards of ``split``, checked cheaply (each file there, each tar of its manifest size:
    a truncated or missing shard is one line here, not a pipeline error mid-epoch).
    ``pattern``: a glob of shard file names (:func:`shard_set_of`): the split's shards it
    matches, or every shard of the split where it matches none of them."""
    folder = Path(folder).expanduser().resolve()
    manifest = shard_manifest(folder)
    if manifest is None:
        raise DalikdError(f"{folder} holds no shard set (no dataset.json of layout shards)")
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise DalikdError(f"the shard set {folder} has no {split} split")
    whole = ShardSplit(folder, split, manifest.classes, manifest.splits[split].shards)
    picked = [i for i, s in enumerate(whole.shards) if fnmatch.fnmatchcase(s.name, pattern)]
    if pattern:
        _check_pattern(folder, pattern, manifest)
    if picked:
        whole = replace(whole, shards=tuple(whole.shards[i] for i in picked),
                        first=tuple(whole.first[i] for i in picked))  # fmt: skip
    for shard in whole.shards:
        path = folder / shard.name
        try:
            size = path.stat().st_size
            (folder / index_name(shard.name)).stat()
        except OSError as e:
            raise DalikdError(f"{e.filename} is missing: the shard set is incomplete") from None
        if size != shard.bytes:
            raise DalikdError(_size_problem(path, size, shard.bytes))
    return whole


def _check_pattern(folder: Path, pattern: str, manifest: Manifest) -> None:
    """A glob must match shards of the manifest, and only those."""
    names = {s.name for info in manifest.splits.values() for s in info.shards}
    found = sorted(p.name for p in folder.glob(pattern))
    if not found:
        raise DalikdError(f"--data {folder / pattern} matches no file")
    foreign = [name for name in found if name not in names]
    if foreign:
        raise DalikdError(
            f"--data {folder / pattern} matches {foreign[0]}, which is not a shard of "
            f"{folder / MANIFEST_NAME}"
        )


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

"""check-data for a shard set: every shard against the manifest (size, sha256), its index file
against the shard, every sample's members (key, label, number), the split's counts, and with
``decode`` every image decoded with PIL. No DALI: the shards are read once each, with Python's
tarfile, hashed while read.

Each problem is one line naming the file; a damaged shard's first problem is reported and its
remaining checks skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dalikd.cache import private_dir, untrusted
from dalikd.datacheck import sniff
from dalikd.errors import DalikdError
from dalikd.manifest import Manifest, Shard
from dalikd.shards import (
    ID_EXT,
    IMAGE_EXTS,
    INDEX_VERSION,
    Progress,
    ShardSplit,
    index_line,
    index_name,
    sample_key,
    shard_manifest,
)


@dataclass(frozen=True)
class ShardCheck:
    folder: Path
    manifest: Manifest
    problems: tuple[str, ...]  # one line each
    shards: int  # shards checked
    samples: dict[str, int]  # split -> samples found in its good shards


class _Hashing:
    """A read-only file wrapper that hashes and counts what is read through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha256, self.read_bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        self.read_bytes += len(data)
        return data


class _Bad(Exception):
    """One problem of one shard (its message is the line)."""


def check_shard_set(
    folder: str | Path, *, decode: bool = False, progress: Progress | None = None
) -> ShardCheck:
    """Check the shard set in ``folder`` (see the module docstring). ``progress(phase, done,
    total)`` counts samples."""
    folder = Path(folder).expanduser().resolve()
    manifest = shard_manifest(folder)
    if manifest is None:
        raise DalikdError(f"{folder} holds no shard set (no dataset.json of layout shards)")
    report = progress or (lambda phase, done, total: None)
    total = sum(s.samples for s in manifest.splits.values())
    problems: list[str] = []
    found: dict[str, int] = {}
    done = shards = 0
    for split, info in manifest.splits.items():
        number, labels = 0, Counter()
        for shard in info.shards:
            try:
                labels += _check_shard(folder, shard, number, len(manifest.classes), decode)
            except _Bad as e:
                problems.append(str(e))
            number += shard.samples
            done += shard.samples
            shards += 1
            report("checking shards", done, total)
        found[split] = labels.total()
        if labels.total() == info.samples:  # every shard read: the counts must add up
            per_class = tuple(labels.get(c, 0) for c in range(len(manifest.classes)))
            if per_class != info.per_class:
                problems.append(f"{folder}: {split}'s samples per class differ from the manifest's")
    return ShardCheck(folder, manifest, tuple(problems), shards, found)


def _check_shard(folder: Path, shard: Shard, first: int, classes: int, decode: bool) -> Counter:
    """Labels of ``shard``'s samples, numbered from ``first``; _Bad at its first problem (a
    checksum that differs first: it says more than what it breaks). One sample in memory at a
    time."""
    path = folder / shard.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _Bad(f"{path}: missing ({e.strerror})") from None
    if size != shard.bytes:
        what = "truncated" if size < shard.bytes else "longer than the manifest says"
        raise _Bad(f"{path}: {what}: {size:,} bytes, the manifest lists {shard.bytes:,}")
    labels, index, problem = Counter(), [], None
    with open(path, "rb") as f:
        stream = _Hashing(f)
        try:
            for j, members in enumerate(_samples(stream, path)):
                index.append([(e, offset, len(data), name) for e, offset, data, name in members])
                if problem is None:
                    try:
                        labels[_check_sample(path, members, first + j, classes, decode)] += 1
                    except _Bad as e:
                        problem = e
        except (tarfile.TarError, OSError) as e:
            problem = problem or _Bad(f"{path}: not a readable tar file ({e})")
        except _Bad as e:
            problem = problem or e
        while stream.read(1 << 20):  # the end blocks and padding count in the checksum too
            pass
    if stream.sha256.hexdigest() != shard.sha256:
        raise _Bad(f"{path}: sha256 differs from the manifest's (the file changed or is damaged)")
    if problem is not None:
        raise problem
    if len(index) != shard.samples:
        raise _Bad(f"{path}: {len(index)} samples, the manifest lists {shard.samples}")
    _check_index(folder / index_name(shard.name), index)
    return labels


def _samples(stream: _Hashing, path: Path) -> Iterator[list[tuple[str, int, bytes, str]]]:
    """The shard's samples, one at a time: its members (ext, data offset, bytes, name), grouped
    by key as DALI groups them (consecutive members, key up to the first dot)."""
    sample: list[tuple[str, int, bytes, str]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            if not member.isfile():
                raise _Bad(f"{path}: {member.name} is not a regular file")
            key, _, ext = member.name.partition(".")
            if sample and sample[0][3].partition(".")[0] != key:
                yield sample
                sample = []
            sample.append((ext, member.offset_data, tar.extractfile(member).read(), member.name))
    if sample:
        yield sample


def _check_sample(path: Path, members, number: int, classes: int, decode: bool) -> int:
    """The label of sample ``number``, checked: its key, one image, its .cls and its .dalikd
    ids agreeing."""
    key = sample_key(number)
    where = f"{path}: sample {key}"
    exts = {ext: data for ext, _, data, _ in members}
    if {name.partition(".")[0] for *_, name in members} != {key} or len(exts) != len(members):
        raise _Bad(f"{where}: members {[name for *_, name in members]} (expected key {key})")
    images = [ext for ext in exts if ext in IMAGE_EXTS.values()]
    if len(images) != 1 or set(exts) != {images[0], "cls", ID_EXT}:
        raise _Bad(f"{where}: members {sorted(exts)}; expected one image, cls and {ID_EXT}")
    try:
        label = int(exts["cls"].decode("ascii"))
    except ValueError:
        raise _Bad(f"{where}: its .cls is not a decimal class index") from None
    ids = np.frombuffer(exts[ID_EXT], "<i4") if len(exts[ID_EXT]) == 8 else None
    if ids is None or ids.tolist() != [label, number]:
        raise _Bad(f"{where}: its .{ID_EXT} does not hold (label {label}, number {number})")
    if not 0 <= label < classes:
        raise _Bad(f"{where}: class index {label} is out of range (the set has {classes})")
    image = exts[images[0]]
    if IMAGE_EXTS.get(sniff(image[:16]) or "") != images[0]:
        raise _Bad(f"{where}: its .{images[0]} does not hold that image format")
    if decode:
        reason = _decode(image)
        if reason:
            raise _Bad(f"{where}: {reason}")
    return label


def _decode(image: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
    except Exception as e:
        return f"undecodable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _check_index(path: Path, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """The index file must be the one the shard's own members (ext, offset, size, name) give
    (DALI trusts its offsets and sizes blindly: a stale one feeds wrong bytes, or kills the
    pipeline mid-epoch)."""
    expected = f"{INDEX_VERSION} {len(samples)}\n" + "".join(
        index_line(members) + "\n" for members in samples
    )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise _Bad(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    if text != expected:
        got, want = text.splitlines(), expected.splitlines()
        diff = [i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b]
        line = diff[0] if diff else min(len(got), len(want))
        raise _Bad(f"{path}: does not match its shard (line {line + 1}): DALI reads wrong bytes")


# -- the checksums a run checks when it starts ---------------------------------------------------

VERIFY_FORMAT = 1  # the layout of the checksum cache; another is rebuilt


def verify_shards(
    split: ShardSplit,
    *,
    cache_root: Path | None,
    rank: int = 0,
    world_size: int = 1,
    progress: Progress | None = None,
) -> None:
    """Each shard of ``split`` against its manifest sha256, one line at the first that differs.
    Rank ``rank`` of ``world_size`` hashes every world_size-th shard from its own (together the
    ranks hash each shard once). A shard's verified checksum is cached under ``cache_root``
    (None: no cache) with its size and mtime: later runs hash only shards that changed since.
    ``progress(phase, done, total)`` counts bytes."""
    mine = split.shards[rank::world_size]
    cache_file = _verify_cache_path(cache_root, split.folder) if cache_root else None
    cached = _read_verified(cache_file, cache_root) if cache_file else {}
    todo = []
    for shard in mine:
        st = (split.folder / shard.name).stat()
        if cached.get(shard.name) != [st.st_size, st.st_mtime_ns, shard.sha256]:
            todo.append((shard, st))
    total, done = sum(st.st_size for _, st in todo), 0
    if todo and progress:
        progress("checking shard checksums", 0, total)
    for shard, st in todo:
        path = split.folder / shard.name
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                done += len(chunk)
                if progress:
                    progress("checking shard checksums", done, total)
        if h.hexdigest() != shard.sha256:
            raise DalikdError(
                f"{path}: sha256 differs from the manifest's (the file changed or is damaged; "
                f"dalikd check-data {split.folder} lists every problem)"
            )
        cached[shard.name] = [st.st_size, st.st_mtime_ns, shard.sha256]
    if todo and cache_file:
        _write_verified(cache_file, split.folder, cached)


def _verify_cache_path(cache_root: Path, folder: Path) -> Path:
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_root / "shards" / f"{digest}.json"


def _read_verified(path: Path, cache_root: Path) -> dict[str, list]:
    """shard name -> [size, mtime_ns, sha256] verified before; {} where the cache is missing,
    damaged, of another format or not the user's own (dalikd.cache.untrusted)."""
    if not path.is_file() or untrusted(path, cache_root):
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != VERIFY_FORMAT:
            return {}
        return {str(k): list(v) for k, v in data["shards"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_verified(path: Path, folder: Path, verified: dict[str, list]) -> None:
    """Best effort: a cache that cannot be written only costs the next start a hash."""
    from dalikd.atomic import write_text_atomic

    data = {"format": VERIFY_FORMAT, "folder": str(folder), "shards": verified}
    try:
        private_dir(path.parent)
        write_text_atomic(json.dumps(data), path)
    except (OSError, DalikdError):
        pass

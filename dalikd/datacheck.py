"""The data scan: find files that would kill a DALI pipeline before any of them is read.

DALI's file reader dies on an empty file and its decoder on a truncated image, and a dead
pipeline cannot continue (DALI_NOTES). So before training every listed file is checked once:
empty files, files whose first bytes are no image format DALI decodes, and images whose end
marker is missing (JPEG EOI, PNG IEND, RIFF/BMP sizes) are left out. Reading 16 head bytes and
a 4 KiB tail per file keeps this I/O-bound and fast. ``decode=True`` also decodes every image
with PIL (JPEGs at 1/8 scale), for corruption in the middle of a file; it is far slower.

Verdicts are cached per dataset, keyed by each file's size and mtime: a re-scan only stats the
files and checks the new or changed ones. The cache is plain JSON (never pickle: a cache file is
data, not code), checked entry by entry on read and rebuilt when anything in it is off; its
folders are created private (0700).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dalikd.cache import private_dir

TAIL = 4096  # bytes read from the end of each file to find its end marker

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"RIFF", "riff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
    (b"\xff\x4f\xff\x51", "jp2"),
    *((f"P{i}".encode(), "pnm") for i in range(1, 7)),
)


def sniff(head: bytes) -> str | None:
    """Image format from a file's first bytes (never from its name)."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return (
                "webp"
                if fmt == "riff" and head[8:12] == b"WEBP"
                else (None if fmt == "riff" else fmt)
            )
    return None


def check_file(path: str, decode: bool = False) -> str | None:
    """Why ``path`` must be left out, or None when it looks decodable."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - TAIL))
            tail = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    fmt = sniff(head)
    if fmt is None:
        return "not an image (unknown file header)"
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "png" and b"IEND" not in tail[-32:]:
        return "truncated PNG (no IEND chunk)"
    if fmt == "webp" and int.from_bytes(head[4:8], "little") + 8 > size:
        return "truncated WebP"
    if fmt == "bmp" and int.from_bytes(head[2:6], "little") > size:
        return "truncated BMP"
    if decode:
        return _decode_check(path)
    return None


def _decode_check(path: str) -> str | None:
    from PIL import Image  # only the slow, thorough mode needs it

    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as e:
        return f"undecodable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _cache_path(cache_root: Path, root: Path, decode: bool) -> Path:
    digest = hashlib.sha1(f"{root.resolve()}|{decode}".encode()).hexdigest()[:16]
    return cache_root / "scans" / f"{digest}.json"


CACHE_FORMAT = 1  # bumped when the cache layout changes; another value is rebuilt


def _read_cache(path: Path, root: Path, decode: bool) -> dict[str, tuple[int, int, str | None]]:
    """The cached verdicts in ``path``, or {} when it is missing, damaged or of another shape:
    every entry must be ``path: [size, mtime_ns, reason or null]``."""
    try:
        data = json.loads(path.read_text())
        if (
            data.get("format") != CACHE_FORMAT
            or data.get("root") != str(root.resolve())
            or data.get("decode") is not decode
        ):
            return {}
        cached = {}
        for file, (size, mtime, reason) in data["verdicts"].items():
            if not (
                isinstance(file, str)
                and type(size) is int
                and type(mtime) is int
                and (reason is None or isinstance(reason, str))
            ):
                return {}
            cached[file] = (size, mtime, reason)
        return cached
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # a damaged cache is rebuilt, never trusted


def check_files(
    files: Iterable[str],
    *,
    root: Path,
    cache_root: Path | None,
    decode: bool = False,
    threads: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Path -> reason for every file of ``files`` that must be left out.

    ``cache_root`` None disables the cache. Checks run in a thread pool (the work is file I/O,
    which releases the GIL).
    """
    files = list(files)
    cache_file = _cache_path(cache_root, root, decode) if cache_root else None
    cached: dict[str, tuple[int, int, str | None]] = {}
    if cache_file and cache_file.is_file():
        cached = _read_cache(cache_file, root, decode)
    verdicts: dict[str, tuple[int, int, str | None]] = {}
    todo: list[tuple[str, int, int]] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            verdicts[path] = (-1, -1, "unreadable: cannot stat")
            continue
        key = (st.st_size, st.st_mtime_ns)
        hit = cached.get(path)
        if hit is not None and hit[:2] == key:
            verdicts[path] = hit
        else:
            todo.append((path, *key))
    if todo:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(lambda item: check_file(item[0], decode), todo, chunksize=256)
            for done, ((path, size, mtime), reason) in enumerate(zip(todo, results, strict=True)):
                verdicts[path] = (size, mtime, reason)
                if progress and (done % 1000 == 0 or done + 1 == len(todo)):
                    progress(done + 1, len(todo))
        if cache_file:
            _write_cache(cache_file, root, decode, verdicts)
    return {path: v[2] for path, v in verdicts.items() if v[2] is not None}


def _write_cache(path: Path, root: Path, decode: bool, verdicts: dict) -> None:
    """Best effort: a cache that cannot be written only costs the next scan time. Each process
    writes its own temporary file (torchrun ranks scan at once) and renames it into place."""
    data = {
        "format": CACHE_FORMAT,
        "root": str(root.resolve()),
        "decode": decode,
        "verdicts": {file: list(v) for file, v in verdicts.items()},
    }
    try:
        private_dir(path.parent)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, suffix=".tmp", delete=False
        ) as f:  # NamedTemporaryFile is created 0600
            json.dump(data, f)
        os.replace(f.name, path)
    except OSError:
        pass

"""The data scan: find files that would kill (or silently spoil) a DALI pipeline before any of
them is read.

DALI's file reader dies on an empty file and its decoder on a truncated image, and a dead
pipeline cannot continue (DALI_NOTES); nvJPEG (``--device gpu``) decodes a JPEG cut inside its
entropy-coded data as a partly grey image and reports success. So before training every listed
file is checked once and left out, with its reason, when it is:

- not a regular file (a FIFO, socket or device: opening one could block forever), or empty;
- no image format DALI decodes, by its first bytes (never by its name);
- an image whose end is missing: a JPEG with no end-of-image marker (FF D9) in its last 32
  bytes once trailing 0x00/0xFF padding is stripped, a PNG without IEND, a WebP or BMP shorter
  than its header says;
- an image whose header claims more than ``max_pixels`` pixels (a decompression bomb: a few KB
  on disk, gigabytes once decoded);
- in a raw dataset (``raw_shape``: ``dalikd data import``'s headerless uint8 pixels), a file
  whose size is not H·W·C bytes: a stat tells, nothing is opened or cached.

Each file costs one open, one fstat and two small reads at most for the common case: 4 KiB at
the head (the format and the image size) and 512 bytes at the tail (the end marker), one read
when the file is smaller than that. A JPEG whose metadata (Exif, ICC) push the frame header
past the first 4 KiB, or a TIFF whose directory sits elsewhere, costs one more small read.
``decode=True`` also decodes every image with PIL (JPEGs at 1/8 scale), for corruption in the
middle of a file; it is far slower.

Verdicts and image sizes are cached per dataset, keyed by each file's size and mtime: a re-scan
only stats the files and checks the new or changed ones; the pixel limit is applied after the
cache, so changing it re-checks nothing. The cache is plain JSON (never pickle: a cache file is
data, not code), checked entry by entry on read and rebuilt when anything in it is off, and
trusted only when it and its folders are the user's own and no one else can write them
(:func:`dalikd.cache.untrusted`); its folders are created private (0700).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dalikd.cache import private_dir, untrusted
from dalikd.config import MAX_PIXELS  # PIL's Image.MAX_IMAGE_PIXELS
from dalikd.errors import DalikdError

HEAD = 4096  # bytes read from the start of each file: its format and image size
TAIL = 512  # bytes read from the end: its end marker
EOI_WINDOW = 32  # a JPEG's FF D9 must lie in its last this many bytes (padding stripped)
PADDING = b"\x00\xff"  # what some writers append after the end marker
MAX_PADDING = 1 << 20  # bytes of trailing padding looked through, at most

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"RIFF", "riff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
    (b"\xff\x4f\xff\x51", "j2k"),
    *((f"P{i}".encode(), "pnm") for i in range(1, 7)),
)
# JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)

Verdict = tuple[int, int, str | None, int, int]  # size, mtime_ns, reason, width, height


def sniff(head: bytes) -> str | None:
    """Image format from a file's first bytes (never from its name)."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            if fmt == "riff":
                return "webp" if head[8:12] == b"WEBP" else None
            return "jp2" if fmt == "j2k" else fmt
    return None


def not_regular(mode: int) -> str:
    """'not a regular file (a FIFO)' and the like for a stat mode, or '' for a regular file."""
    if stat.S_ISREG(mode):
        return ""
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind})"


def too_many_pixels(width: int, height: int, max_pixels: int) -> str | None:
    """The reason a header's claimed size is refused, or None (``max_pixels`` 0: no limit)."""
    if not max_pixels or width * height <= max_pixels:
        return None
    return (f"image header claims {width}x{height} ({width * height / 1e6:,.0f} Mpx), above the "
            f"limit of {max_pixels / 1e6:,.1f} Mpx (a decompression bomb? the limit: "
            "--max-pixels, data.max_pixels)")  # fmt: skip


# -- reading a file: the head, the tail, and more only where needed --------------------------


class _File:
    """Bytes of an open file at any offset, from the head block or one more small read."""

    def __init__(self, fd: int, size: int, head: bytes) -> None:
        self.fd, self.size, self.base, self.block = fd, size, 0, head

    def at(self, offset: int, n: int) -> bytes:
        if not (self.base <= offset and offset + n <= self.base + len(self.block)):
            if offset < 0 or offset >= self.size:
                return b""
            self.base, self.block = offset, os.pread(self.fd, max(n, HEAD), offset)
        return self.block[offset - self.base : offset - self.base + n]


def _jpeg_ends(f: _File, tail: bytes) -> bool:
    """An end-of-image marker lies in the last EOI_WINDOW bytes, trailing padding stripped."""
    body, start = tail.rstrip(PADDING), f.size - len(tail)
    while not body and start > 0 and f.size - start < MAX_PADDING:  # padding all along: rare
        n = min(start, 64 * 1024)
        start -= n
        body = os.pread(f.fd, n, start).rstrip(PADDING)
    return b"\xff\xd9" in body[-EOI_WINDOW:]


# DALI 2.4's image decoder can crash the process (SIGSEGV, while the batch runs or when the
# failed pipeline is freed) on such a JPEG in a batch of ~50 or more, instead of raising: it must
# never reach DALI (docs/reliability.md; tests/test_scan_faults.py)
NO_SCAN = "truncated JPEG: its header ends before any image data (no start-of-scan)"


def _jpeg_segments(f: _File) -> tuple[tuple[int, int] | None, bool | None]:
    """(the frame header's (width, height) or None, whether a start-of-scan follows it): the
    header's segments walked by their lengths from the start to the first scan (a few, seldom
    dozens; one more small read where an APP segment is large). ``False``: the segments end
    (an end-of-image marker, or the file's end) before any scan; ``None``: unknown (a byte that
    is no marker, or too many segments)."""
    pos, size = 2, None
    for _ in range(512):
        seg = f.at(pos, 9)
        if len(seg) < 4:
            return size, False if pos >= f.size - 2 else None
        if seg[0] != 0xFF:
            return size, None
        marker = seg[1]
        if marker == 0xFF:  # a fill byte
            pos += 1
        elif marker == 0xDA:  # a scan: a frame header must have come before it
            return size, size is not None
        elif marker == 0xD9:  # the end, before any scan
            return size, False
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            if marker in _SOF and size is None:
                size = (
                    (int.from_bytes(seg[7:9]), int.from_bytes(seg[5:7])) if len(seg) == 9 else None
                )
            pos += 2 + int.from_bytes(seg[2:4])
    return size, None


def _tiff_size(f: _File) -> tuple[int, int] | None:
    order = "little" if f.at(0, 2) == b"II" else "big"
    ifd = int.from_bytes(f.at(4, 4), order)
    count = min(int.from_bytes(f.at(ifd, 2), order), 1024)
    entries, dims = f.at(ifd + 2, 12 * count), {}
    for i in range(0, len(entries) - 11, 12):
        tag, kind = int.from_bytes(entries[i : i + 2], order), entries[i + 2 : i + 4]
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG
            short = int.from_bytes(kind, order) == 3
            dims[tag] = int.from_bytes(entries[i + 8 : i + (10 if short else 12)], order)
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X":  # the canvas, 24 bits each, minus one
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and len(head) >= 25:  # 14 bits each, minus one
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(head) >= 30:  # lossy: 14 bits each after the start code
        return (int.from_bytes(head[26:28], "little") & 0x3FFF,
                int.from_bytes(head[28:30], "little") & 0x3FFF)  # fmt: skip
    return None


def _pnm_size(head: bytes) -> tuple[int, int] | None:
    fields = re.sub(rb"#[^\n]*", b" ", head[2:512]).split()[:2]  # comments may come between
    if len(fields) < 2 or not all(x.isdigit() for x in fields):
        return None
    return int(fields[0]), int(fields[1])


def _jp2_size(head: bytes) -> tuple[int, int] | None:
    if head.startswith(b"\xff\x4f\xff\x51"):  # a bare codestream: the SIZ segment
        x, y, x0, y0 = (int.from_bytes(head[i : i + 4]) for i in (8, 12, 16, 20))
        return max(0, x - x0), max(0, y - y0)
    at = head.find(b"ihdr")  # the JP2 header box: height, then width
    if at < 0:
        return None
    return int.from_bytes(head[at + 8 : at + 12]), int.from_bytes(head[at + 4 : at + 8])


def image_size(fmt: str, f: _File) -> tuple[int, int] | None:
    """(width, height) as the header of a ``fmt`` file (not a JPEG: :func:`_jpeg_segments`)
    claims it, or None where unknown."""
    head = f.block
    try:
        if fmt == "png":
            return int.from_bytes(head[16:20]), int.from_bytes(head[20:24])
        if fmt == "bmp":
            if int.from_bytes(head[14:18], "little") == 12:  # the old OS/2 header: 16 bits
                return int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
            w, h = (int.from_bytes(head[i : i + 4], "little", signed=True) for i in (18, 22))
            return abs(w), abs(h)  # a negative height: rows stored top-down
        if fmt == "tiff":
            return _tiff_size(f)
        if fmt == "webp":
            return _webp_size(head)
        if fmt == "pnm":
            return _pnm_size(head)
        return _jp2_size(head)
    except (ValueError, IndexError, OSError):
        return None


def _inspect(path: str, decode: bool) -> tuple[str | None, int, int]:
    """(why ``path`` must be left out or None, width, height; 0, 0 where unknown)."""
    try:
        # O_NONBLOCK: a FIFO that slipped in after the listing must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        return f"unreadable: {e.strerror or e}", 0, 0
    try:
        st = os.fstat(fd)
        if not_regular(st.st_mode):
            return not_regular(st.st_mode), 0, 0
        if st.st_size == 0:
            return "empty file", 0, 0
        f = _File(fd, st.st_size, os.pread(fd, HEAD, 0))
        tail = f.block[-TAIL:] if f.size <= HEAD else os.pread(fd, TAIL, f.size - TAIL)
        fmt = sniff(f.block)
        reason = _end_missing(fmt, f, tail)
        if fmt == "jpeg":  # one walk of the header's segments: the size, and a scan after it
            size, scan = _jpeg_segments(f)
            reason = reason or (NO_SCAN if scan is False else None)
        else:
            size = image_size(fmt, f) if fmt else None
    except OSError as e:
        return f"unreadable: {e.strerror or e}", 0, 0
    finally:
        os.close(fd)
    w, h = size or (0, 0)
    if reason is None and decode:
        reason = _decode_check(path)
    return reason, w, h


def _end_missing(fmt: str | None, f: _File, tail: bytes) -> str | None:
    head = f.block
    if fmt is None:
        return "not an image (unknown file header)"
    if fmt == "jpeg" and not _jpeg_ends(f, tail):
        return "truncated JPEG? no end-of-image marker (FF D9) at its end"
    if fmt == "png" and b"IEND" not in tail[-32:]:
        return "truncated PNG (no IEND chunk)"
    if fmt == "webp" and int.from_bytes(head[4:8], "little") + 8 > f.size:
        return "truncated WebP"
    if fmt == "bmp" and int.from_bytes(head[2:6], "little") > f.size:
        return "truncated BMP"
    return None


def raw_size_reason(size: int, raw_shape: tuple[int, ...]) -> str | None:
    """Why a raw image file of ``size`` bytes must be left out (not H·W·C), or None."""
    h, w, c = raw_shape
    if size == h * w * c:
        return None
    if size == 0:
        return "empty file"
    return (f"raw image of {size:,} bytes; the dataset's images are {h}x{w}x{c} = "
            f"{h * w * c:,} bytes (dataset.json's image_shape): truncated or foreign")  # fmt: skip


def check_file(path: str, decode: bool = False, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` must be left out, or None when it looks decodable."""
    reason, w, h = _inspect(path, decode)
    return reason or too_many_pixels(w, h, max_pixels)


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


# -- the cache ---------------------------------------------------------------------------------


def _cache_path(cache_root: Path, root: Path, decode: bool) -> Path:
    digest = hashlib.sha1(f"{root.resolve()}|{decode}".encode()).hexdigest()[:16]
    return cache_root / "scans" / f"{digest}.json"


# 2: each verdict also holds the header's image size; JPEG's end marker must be at the very end
# 3: a JPEG's header must reach a start-of-scan
CACHE_FORMAT = 3  # bumped when the cache layout or a rule changes; another value is rebuilt


def _read_cache(path: Path, root: Path, decode: bool) -> dict[str, Verdict]:
    """The cached verdicts in ``path``, or {} when it is missing, damaged or of another shape:
    every entry must be ``path: [size, mtime_ns, reason or null, width, height]``."""
    try:
        data = json.loads(path.read_text())
        if (
            data.get("format") != CACHE_FORMAT
            or data.get("root") != str(root.resolve())
            or data.get("decode") is not decode
        ):
            return {}
        cached = {}
        for file, (size, mtime, reason, w, h) in data["verdicts"].items():
            if not (
                isinstance(file, str)
                and all(type(n) is int for n in (size, mtime, w, h))
                and (reason is None or isinstance(reason, str))
            ):
                return {}
            cached[file] = (size, mtime, reason, w, h)
        return cached
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # a damaged cache is rebuilt, never trusted


def _trusted_cache(path: Path, cache_root: Path, root: Path, decode: bool) -> dict[str, Verdict]:
    """The cached verdicts where the cache file is the user's own (else one warning, {})."""
    if not path.is_file() and not path.is_symlink():
        return {}
    why = untrusted(path, cache_root)
    if why:
        warnings.warn(f"scan cache not trusted, every file is checked again: {why}",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return {}
    return _read_cache(path, root, decode)


def check_files(
    files: Iterable[str],
    *,
    root: Path,
    cache_root: Path | None,
    decode: bool = False,
    threads: int = 16,
    progress: Callable[[int, int], None] | None = None,
    max_pixels: int = MAX_PIXELS,
    raw_shape: tuple[int, ...] = (),
) -> dict[str, str]:
    """Path -> reason for every file of ``files`` that must be left out.

    ``cache_root`` None disables the cache. Checks run in a thread pool (the work is file I/O,
    which releases the GIL). ``max_pixels``: the most pixels an image header may claim (0: no
    limit). ``raw_shape``: (H, W, C) where the files are raw pixels, checked by size alone.
    """
    files = list(files)
    cache_file = _cache_path(cache_root, root, decode) if cache_root else None
    cached = _trusted_cache(cache_file, cache_root, root, decode) if cache_file else {}
    verdicts: dict[str, Verdict] = {}
    todo: list[tuple[str, int, int]] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            verdicts[path] = (-1, -1, "unreadable: cannot stat", 0, 0)
            continue
        if not_regular(st.st_mode):  # never opened; never cached (it may become a file)
            verdicts[path] = (-1, -1, not_regular(st.st_mode), 0, 0)
            continue
        key = (st.st_size, st.st_mtime_ns)
        if raw_shape:  # a stat is the whole check: nothing to cache
            verdicts[path] = (*key, raw_size_reason(st.st_size, raw_shape), 0, 0)
            continue
        hit = cached.get(path)
        if hit is not None and hit[:2] == key:
            verdicts[path] = hit
        else:
            todo.append((path, *key))
    if todo:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(lambda item: _inspect(item[0], decode), todo, chunksize=256)
            for done, ((path, size, mtime), found) in enumerate(zip(todo, results, strict=True)):
                verdicts[path] = (size, mtime, *found)
                if progress and (done % 1000 == 0 or done + 1 == len(todo)):
                    progress(done + 1, len(todo))
        if cache_file:
            _write_cache(cache_file, root, decode, verdicts)
    bad = {}
    for path, (_, _, reason, w, h) in verdicts.items():
        reason = reason or too_many_pixels(w, h, max_pixels)
        if reason:
            bad[path] = reason
    return bad


def _write_cache(path: Path, root: Path, decode: bool, verdicts: dict[str, Verdict]) -> None:
    """Best effort: a cache that cannot be written only costs the next scan time. Written
    through dalikd.atomic (each process its own temporary file: torchrun ranks scan at once),
    0600 whatever the umask."""
    from dalikd.atomic import write_bytes_atomic

    data = {
        "format": CACHE_FORMAT,
        "root": str(root.resolve()),
        "decode": decode,
        "verdicts": {file: list(v) for file, v in verdicts.items() if v[0] >= 0},
    }
    text = json.dumps(data).encode()
    try:
        private_dir(path.parent)
        write_bytes_atomic(text, path, mode=0o600)
    except (OSError, DalikdError):
        pass

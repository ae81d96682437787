"""The one reader and writer of a teacher cache's files (key.json, chunks, validation logits),
and the faults they survive.

- **Damage.** Every chunk and validation file carries a checksum (sha256 of its tensors' bytes
  and its other fields) verified on read: a flipped bit, a NaN written over a logit, a file cut
  short is a miss that the run recomputes (with one note), never a hit. A file that checks out
  and still holds a non-finite logit (written by a teacher that produced one) is a miss too.
- **Not a regular file.** A file is opened ``O_NONBLOCK | O_NOFOLLOW`` and looked at (``fstat``)
  before it is read: a FIFO, device or socket where a chunk should be is a miss, never a hang.
- **Trust.** As every cache dalikd reads (:func:`dalikd.cache.untrusted`): a file owned by
  another user, writable by others, or a link, or under such a folder of the cache, is not read.
- **Writes** go through :mod:`dalikd.atomic` (no temporary file is left on any failure); a
  failure is a :class:`CacheWriteError` naming its cause ("disk full", "read-only file system").
  Folders are made 0700 and files 0600, whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import torch

from dalikd.atomic import reason, write_atomic
from dalikd.cache import private_dir, untrusted
from dalikd.errors import DalikdError

FILE_MODE = 0o600
CHECKSUM = "checksum"
MAX_READ = 1 << 34  # 16 GiB: larger than any chunk dalikd writes


class CacheWriteError(DalikdError):
    """A cache file could not be written (the message names why: disk full, read-only, ...)."""


def checksum(obj: dict[str, Any]) -> str:
    """sha256 over ``obj``'s fields but the checksum itself, in name order: a tensor by its
    dtype, shape and bytes, anything else by its JSON."""
    h = hashlib.sha256()
    for name in sorted(k for k in obj if k != CHECKSUM):
        value = obj[name]
        h.update(str(name).encode() + b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            h.update(checksum({f"{i:09d}": t for i, t in enumerate(value)}).encode())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def write_file(root: Path, path: Path, obj: dict[str, Any]) -> None:
    """``obj`` with its checksum, torch.save'd to ``path`` atomically (folders made 0700 up from
    the cache ``root``); CacheWriteError on failure, with no temporary file left."""
    try:
        private_dir(path.parent)
    except OSError as e:
        raise CacheWriteError(f"cannot write {path}: {reason(e)}") from None
    obj = {**obj, CHECKSUM: checksum(obj)}
    try:
        write_atomic(path, lambda f: torch.save(obj, f), mode=FILE_MODE)
    except DalikdError as e:
        raise CacheWriteError(str(e)) from None


def read_bytes(path: Path, root: Path) -> tuple[bytes | None, str]:
    """(the file's bytes, "") or (None, why it is not read): missing, untrusted, not a regular
    file, unreadable. Never blocks on a FIFO."""
    why = untrusted(path, root)
    if why:
        return None, f"is not trusted ({why})"
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        return None, f"cannot be opened ({e.strerror or e})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "is not a regular file"
        if st.st_size > MAX_READ:
            return None, f"is larger than any cache file ({st.st_size:,} bytes)"
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(), ""
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    finally:
        os.close(fd)


def read_file(path: Path, root: Path) -> tuple[dict[str, Any] | None, str]:
    """(the dict, "") or (None, why it cannot be used: unread (:func:`read_bytes`), not a cache
    file, or its checksum does not match). A file without a checksum (written before it was
    kept) is read as it is."""
    data, why = read_bytes(path, root)
    if data is None:
        return None, why
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        return None, "is unreadable (truncated or not a cache file)"
    if not isinstance(obj, dict):
        return None, "is unreadable (truncated or not a cache file)"
    if CHECKSUM in obj and obj[CHECKSUM] != checksum(obj):
        return None, "is damaged (its checksum does not match)"
    return obj, ""


def finite(obj: dict[str, Any], names: tuple[str, ...]) -> bool:
    """Whether the floating-point tensors ``names`` of ``obj`` hold no NaN and no +inf (a -inf
    logit is a class the teacher rules out; top-K's remainder of nothing is -inf too)."""
    for name in names:
        value = obj.get(name)
        parts = value if isinstance(value, list) else [value]
        for t in parts:
            is_float = isinstance(t, torch.Tensor) and t.is_floating_point()
            if is_float and (t.isnan().any() or (t == float("inf")).any()):
                return False
    return True


def writable(folder: Path) -> str:
    """ "" when files can be made in ``folder`` (made if missing), else why not."""
    try:
        private_dir(folder)
    except OSError as e:
        return reason(e)
    probe = folder / f".dalikd-write-check.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return ""
        return reason(e)
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()
    return ""

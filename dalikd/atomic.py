"""Files written whole or not at all: the one atomic-write helper of dalikd.

:func:`write_atomic` writes under a temporary name in the target's own folder, then renames
over the target (``os.replace``: readers see the old file or the new one, never half of one).
The temporary file is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) under a name
nobody chose before (``.NAME.PID.RANDOM.tmp``): a file or a symlink planted at a predictable
name (``last.pt.tmp``) is never opened, followed or overwritten. Its mode is 0o644, narrowed
only by a stricter umask. The data is fsynced before the rename and the folder after it. On any
failure the temporary file is removed and the error is one line that names a full disk
("disk full") or a read-only one as such.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from dalikd.errors import DalikdError

FILE_MODE = 0o644  # rw-r--r--; a stricter umask narrows it, a looser one (000) cannot widen it
TMP_SUFFIX = ".tmp"  # every temporary file ends so (rundir counts such names as leftovers)
_TEMP_NAME = re.compile(r"\.(.+)\.(\d+)\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX))

# errno -> how the one-line error names it
_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class _Recorder:
    """A file object that remembers the OSError of a failed write: torch.save reports one as
    a RuntimeError ("unexpected pos ...") that no longer says the disk was full."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _create_temp(path: Path, mode: int) -> tuple[Path, int]:
    """A new temporary file beside ``path``: (its path, an fd open for writing)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            return tmp, os.open(tmp, flags, mode)
        except FileExistsError:  # someone holds that name (even as a link): take another
            continue
    raise OSError(errno.EEXIST, "no free temporary name", str(path.parent))


def temporary_of(name: str) -> tuple[str, int] | None:
    """(the target's name, the writer's pid) where ``name`` is one of :func:`write_atomic`'s
    temporary files (``.NAME.PID.RANDOM.tmp``), else None: for the sweeps of what a killed
    writer left."""
    match = _TEMP_NAME.fullmatch(name)
    return (match[1], int(match[2])) if match else None


def reason(error: BaseException, recorded: OSError | None = None) -> str:
    """What went wrong, in a few words: "disk full", "read-only file system", ..."""
    e = recorded or error
    if isinstance(e, OSError):
        return _REASONS.get(e.errno, e.strerror or str(e))
    return (str(e).splitlines() or [type(e).__name__])[0]


def write_atomic(
    path: str | Path, write: Callable[[BinaryIO], None], mode: int = FILE_MODE
) -> None:
    """Call ``write(f)`` with a binary file object, then make what it wrote ``path`` atomically.
    ``path`` keeps its previous content on any failure, which raises DalikdError (one line)."""
    path = Path(path)
    recorder: _Recorder | None = None
    tmp: Path | None = None
    try:
        tmp, fd = _create_temp(path, mode)
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            write(recorder)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_folder(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        raise DalikdError(
            f"cannot write {path}: {reason(e, recorder.error if recorder else None)}"
        ) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def fsync_folder(folder: Path) -> None:
    """The rename itself survives a crash once the folder's entry is on disk."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:  # some filesystems cannot fsync a folder; the data itself is synced
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(data: bytes, path: str | Path, mode: int = FILE_MODE) -> None:
    write_atomic(path, lambda f: f.write(data), mode=mode)


def write_text_atomic(text: str, path: str | Path, mode: int = FILE_MODE) -> None:
    write_bytes_atomic(text.encode("utf-8"), path, mode=mode)


def write_json_atomic(value: Any, path: str | Path) -> None:
    write_text_atomic(json.dumps(value, indent=2, sort_keys=True) + "\n", path)


def write_jsonl_atomic(records: list[dict[str, Any]], path: str | Path) -> None:
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), path)

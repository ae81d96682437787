"""One run per run directory: a lock file holding the owner's pid and host.

Two runs on one ``--out`` would overwrite each other's checkpoints (or crash renaming
``last.pt.tmp`` the other one just renamed). The lock is created with O_EXCL; a lock left by
a process that is gone (same host, pid not alive) is taken over with a note.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dalikd.errors import DalikdError

LOCK = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def prepare(run_dir: Path) -> None:
    """Create ``run_dir``; one clear line when it cannot be a run directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DalikdError(f"--out {run_dir} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DalikdError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise DalikdError(f"run directory {run_dir} is not writable")


@contextmanager
def locked(run_dir: Path, note: Callable[[str], None]) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; another live run there is refused."""
    path = run_dir / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                pid_text, _, host = path.read_text().strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = -1, ""
            if host == socket.gethostname() and pid > 0 and not _alive(pid):
                note(f"took over the lock of {run_dir} left by process {pid}, which is gone")
                path.unlink(missing_ok=True)
                continue
            if pid <= 0:  # empty or damaged: a run that died while writing it
                note(f"replaced a damaged lock file {path}")
                path.unlink(missing_ok=True)
                continue
            raise DalikdError(
                f"{run_dir} is in use by another run (process {pid} on {host or '?'}); "
                f"wait for it, or pick another --out (remove {path} if that run is gone)"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise DalikdError(f"cannot take the lock {path}")
    try:
        yield
    finally:
        try:
            if path.read_text() == me:
                path.unlink()
        except OSError:
            pass

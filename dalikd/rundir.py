"""One run per run directory: a lock file holding the owner's pid and host.

Two runs on one ``--out`` would overwrite each other's checkpoints (or crash renaming
``last.pt.tmp`` the other one just renamed). The lock is created with O_EXCL; a lock left by
a process that is gone (same host, pid not alive) is taken over with a note.

A fresh run starts only in a new or empty folder (a run there is continued with ``--resume``),
and a fresh run that fails before its first checkpoint leaves no folder behind: it removes
what it wrote and the folders it made (:func:`claimed`).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dalikd.errors import DalikdError

LOCK = "run.lock"
RUN_FILES = ("config.json", "last.pt", "metrics.jsonl")  # what makes a folder a run's
# What a fresh run writes before its first checkpoint: where a run was killed before it (a
# lost node, the OOM killer: no cleanup ran), the same command starts again there.
LEFTOVERS = ("config.json", "metrics.jsonl", "data_report.tsv", "tb")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def prepare(run_dir: Path, fresh: bool = False) -> list[Path]:
    """Create ``run_dir``; one clear line when it cannot be a run directory. ``fresh``: a new
    run, refused in a folder that holds anything but a lock. Returns the folders it made,
    deepest first."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DalikdError(f"--out {run_dir} is a file, not a directory")
    if fresh and run_dir.is_dir():
        _refuse_taken(run_dir)
    missing = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DalikdError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise DalikdError(f"run directory {run_dir} is not writable")
    return missing


def _refuse_taken(run_dir: Path) -> None:
    """A new run would overwrite what ``run_dir`` holds: one line saying what to do instead."""
    try:
        names = {entry.name for entry in os.scandir(run_dir)} - {LOCK}  # a lock: see locked()
    except OSError as e:
        raise DalikdError(f"cannot read run directory {run_dir}: {e.strerror or e}") from None
    if _leftovers(names):
        return  # taken over once the lock is held (claimed)
    if any(name in names for name in RUN_FILES):
        raise DalikdError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
            "or give another --out"
        )
    if names:
        raise DalikdError(f"--out {run_dir} is not empty; give a new or empty folder")


def _leftovers(names: set[str]) -> bool:
    """``names`` (a folder's, the lock aside) are only what a fresh run killed before its first
    checkpoint leaves."""
    return bool(names) and all(n in LEFTOVERS or n.endswith(".tmp") for n in names)


def unique(run_dir: Path) -> Path:
    """Make a new folder ``run_dir``, else ``run_dir-2``, ``-3``, ...: two runs started in the
    same second without ``--out`` get two folders (mkdir is atomic)."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DalikdError(f"cannot create {run_dir.parent} for the run: {e.strerror or e}; "
                          "give --out") from None  # fmt: skip
    for n in range(1, 1000):
        path = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise DalikdError(f"cannot create run directory {path}: {e.strerror or e}") from None
        return path
    raise DalikdError(f"cannot find a free run directory name beside {run_dir}")


@contextmanager
def locked(run_dir: Path, note: Callable[[str], None], resume: bool = False) -> Iterator[None]:
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
            if resume:
                raise DalikdError(
                    f"{run_dir} is in use by another process ({pid} on {host or '?'}): that "
                    f"run is still going; wait for it to end (remove {path} if it is gone)"
                ) from None
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


@contextmanager
def claimed(
    run_dir: Path | None,
    default: Path,
    note: Callable[[str], None],
    resume: bool = False,
    overwrite: bool = False,
) -> Iterator[Path]:
    """Prepare and lock the run directory for the block; yields it. ``run_dir`` None: a new
    folder named ``default`` (made unique). ``overwrite``: a new run may replace one there
    (the demo's own runs). A new run that fails before its first checkpoint
    (last.pt) removes what it wrote and the folders this call made; a folder the user made is
    left as it was (empty: a new run starts only in an empty one)."""
    fresh = not (resume or overwrite)
    if run_dir is None:
        made_parents = [d for d in default.parents if not d.exists()]
        run_dir = unique(default)
        made = [run_dir, *made_parents]
    else:
        made = prepare(run_dir, fresh=fresh)
    try:
        with locked(run_dir, note, resume):
            if fresh and _leftovers({e.name for e in run_dir.iterdir()} - {LOCK}):
                note(f"{run_dir}: cleared what a run stopped before its first checkpoint left")
                _remove_contents(run_dir)
            try:
                yield run_dir
            except BaseException:
                if not resume and not (run_dir / "last.pt").exists():
                    _remove_contents(run_dir)
                raise
    except BaseException:
        for folder in made:  # deepest first; rmdir removes only what is left empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _remove_contents(run_dir: Path) -> None:
    """Everything in ``run_dir`` but the lock: it held nothing else when the run started."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)

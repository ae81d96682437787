"""One run per run directory: a lock file holding the owner's pid, host, boot and start time.

Two runs on one ``--out`` would overwrite each other's checkpoints (or crash renaming
``last.pt.tmp`` the other one just renamed). The lock is created with O_EXCL and renewed (its
mtime) every HEARTBEAT_S seconds while the run holds it; a lock left by a process that is gone
(on this host: pid not alive, or reused since; on another: not renewed for STALE_BEATS
heartbeats, a lost node) is taken over with a note.

A fresh run starts only in a new or empty folder (a run there is continued with ``--resume``),
and a fresh run that fails before its first checkpoint leaves no folder behind: it removes
what it wrote and the folders it made (:func:`claimed`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dalikd.atomic import temporary_of
from dalikd.errors import DalikdError

LOCK = "run.lock"
RUN_FILES = ("config.json", "last.pt", "metrics.jsonl")  # what makes a folder a run's
# What a fresh run writes before its first checkpoint: where a run was killed before it (a
# lost node, the OOM killer: no cleanup ran), the same command starts again there.
LEFTOVERS = ("config.json", "metrics.jsonl", "data_report.tsv", "tb")
# Run folders dalikd makes: readable by all, writable by the user only, whatever the umask
# (mkdir's mode is narrowed by the umask, never widened: umask 000 gives 0755, not 0777).
FOLDER_MODE = 0o755


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
        for folder in reversed(missing):
            folder.mkdir(mode=FOLDER_MODE, exist_ok=True)
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
        for folder in reversed([d for d in run_dir.parents if not d.exists()]):
            folder.mkdir(mode=FOLDER_MODE, exist_ok=True)
        if not run_dir.parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    except OSError as e:
        raise DalikdError(f"cannot create {run_dir.parent} for the run: {e.strerror or e}; "
                          "give --out") from None  # fmt: skip
    for n in range(1, 1000):
        path = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        try:
            path.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            continue
        except OSError as e:
            raise DalikdError(f"cannot create run directory {path}: {e.strerror or e}") from None
        return path
    raise DalikdError(f"cannot find a free run directory name beside {run_dir}")


# The lock's holder renews its mtime every HEARTBEAT_S seconds; a lock from another host not
# renewed for STALE_BEATS periods is a lost node's (generous: clocks of two hosts differ).
HEARTBEAT_S = 60
STALE_BEATS = 5


def _boot_id() -> str:
    """This machine's boot identity (Linux); '' where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (Linux); '' where unknown. With
    the boot id it tells a process from a later one that reuses its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _lock_text(heartbeat_s: float) -> str:
    """'pid host key=value ...': the owner's pid and host first (what older dalikd wrote),
    then its boot, start time and heartbeat period."""
    pid = os.getpid()
    return (f"{pid} {socket.gethostname()} boot={_boot_id() or '-'} "
            f"start={_start_time(pid) or '-'} heartbeat={heartbeat_s:g}\n")  # fmt: skip


def _parse_lock(text: str) -> dict[str, str]:
    """The fields of a lock's text; {} where it is empty or damaged (no pid)."""
    words = text.split()
    if len(words) < 2 or not words[0].isdigit() or int(words[0]) <= 0:
        return {}
    fields = dict(w.partition("=")[::2] for w in words[2:] if "=" in w)
    return {k: v for k, v in fields.items() if v != "-"} | {"pid": words[0], "host": words[1]}


def stale_reason(lock: dict[str, str], age_s: float) -> str:
    """Why a lock (its fields, renewed ``age_s`` seconds ago) belongs to no running process,
    or '' where its run may still be going."""
    pid = int(lock["pid"])
    try:  # older dalikd: no heartbeat, never stale on another host
        period = float(lock.get("heartbeat", 0))
    except ValueError:
        period = 0.0
    here = lock["host"] == socket.gethostname()
    if here and lock.get("boot", _boot_id()) == _boot_id():
        if not _alive(pid):
            return f"left by process {pid}, which is gone"
        now = _start_time(pid)  # '' where /proc hides it: then the pid alone decides
        if lock.get("start") and now and lock["start"] != now:
            return f"left by process {pid}, which is gone (its pid now names another process)"
        return ""
    # Another boot under this host name: this machine restarted, unless another machine bears
    # the same name; its holder would have renewed it within one heartbeat.
    if here and period > 0 and age_s > period:
        return f"left by process {pid} before this machine restarted"
    if period > 0 and age_s > STALE_BEATS * period:
        return (f"left by process {pid} on {lock['host']}, which has not renewed it for "
                f"{age_s:,.0f} s (it renews every {period:g} s)")  # fmt: skip
    return ""


def _read_lock(path: Path) -> tuple[str, dict[str, str], float]:
    """(text, fields, seconds since it was last renewed) of the lock at ``path``."""
    try:
        text, mtime = path.read_text(errors="replace"), path.stat().st_mtime
    except FileNotFoundError:
        return "", {"gone": "1"}, 0.0
    except OSError:
        return "", {}, 0.0
    return text, _parse_lock(text), time.time() - mtime


def _take(path: Path, run_dir: Path, note: Callable[[str], None]) -> bool:
    """Remove the lock at ``path`` when it is stale or damaged, with a note; False when its run
    may still be going.

    The lock is moved aside (one atomic rename) and judged again there: of two runs taking the
    same stale lock over, one moves it and the other finds none (it then meets the winner's new
    lock), and a lock renewed or replaced between the judgement and the move is put back."""
    text, lock, age = _read_lock(path)
    if lock.get("gone"):
        return True
    why = stale_reason(lock, age) if lock else ""
    if lock and not why:
        return False
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.taken")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another run took it first: look again
        return True
    moved, moved_lock, moved_age = _read_lock(aside)
    if moved != text or (moved_lock and not stale_reason(moved_lock, moved_age)):
        with contextlib.suppress(OSError):
            os.link(aside, path)  # back where it was, unless a new lock is there already
        aside.unlink(missing_ok=True)
        return True
    aside.unlink(missing_ok=True)
    note(f"took over the lock of {run_dir} {why}" if why else f"replaced a damaged lock {path}")
    return True


def _refuse_locked(path: Path, run_dir: Path, resume: bool) -> None:
    _, lock, age = _read_lock(path)
    pid, host = lock.get("pid", "?"), lock.get("host", "?")
    renewed = f", renewed {age:,.0f} s ago" if lock.get("heartbeat") else ""
    if resume:
        raise DalikdError(
            f"{run_dir} is in use by another process ({pid} on {host}{renewed}): that run is "
            f"still going; wait for it to end (remove {path} if it is gone)"
        )
    raise DalikdError(
        f"{run_dir} is in use by another run (process {pid} on {host}{renewed}); wait for it, "
        f"or pick another --out (remove {path} if that run is gone)"
    )


def check_held(run_dir: Path) -> None:
    """Raise DalikdError where another process now holds ``run_dir``'s lock: it took it over
    from this one, thought lost (a node cut off for STALE_BEATS heartbeats), and this one must
    write nothing more there. A lock removed by hand is nobody's: this run goes on."""
    _, lock, _ = _read_lock(run_dir / LOCK)
    if not lock or lock.get("gone"):
        return
    me = _parse_lock(_lock_text(HEARTBEAT_S))
    fields = ("pid", "host", "boot", "start")
    if any(lock.get(k) != me.get(k) for k in fields):
        raise DalikdError(
            f"{run_dir} was taken over by process {lock['pid']} on {lock['host']} (this run "
            f"did not renew its lock for {STALE_BEATS} heartbeats and was taken for lost); "
            "this run stops without writing there"
        )


def _renew(path: Path, me: str, period: float, stop: threading.Event) -> None:
    """The heartbeat: touch our lock every ``period`` seconds until ``stop``."""
    while not stop.wait(period):
        try:
            if path.read_text() == me:
                os.utime(path)
        except OSError:
            pass


@contextmanager
def locked(
    run_dir: Path,
    note: Callable[[str], None],
    resume: bool = False,
    heartbeat_s: float = HEARTBEAT_S,
) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block, renewed every ``heartbeat_s`` seconds; another
    live run there is refused. A stale lock is taken over with a note: one left on this host by
    a process that is gone (its pid dead, or reused since: another start time or boot), or one
    from another host not renewed for STALE_BEATS heartbeats (a lost node)."""
    path = run_dir / LOCK
    me = _lock_text(heartbeat_s)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            if not _take(path, run_dir, note):
                _refuse_locked(path, run_dir, resume)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise DalikdError(f"cannot take the lock {path}")
    stop = threading.Event()
    beat = threading.Thread(target=_renew, args=(path, me, heartbeat_s, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
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
            _remove_temporaries(run_dir, note)
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


# the files a run writes through dalikd.atomic, whose temporaries a killed run may leave
_WRITTEN = frozenset({"config.json", "last.pt", "best.pt", "metrics.jsonl", "data_report.tsv"})


def _remove_temporaries(run_dir: Path, note: Callable[[str], None]) -> None:
    """The temporary files of a run's atomic writes that a killed run left (a SIGKILL
    mid-checkpoint leaves a partial checkpoint, as large as one): the lock's holder is the only
    writer of a run's files, so every one is a leftover. Said in one note."""
    temps = ((e, temporary_of(e.name)) for e in os.scandir(run_dir))
    found = [e for e, t in temps if t and t[0] in _WRITTEN and t[1] != os.getpid()]
    for entry in found:
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
    if found:
        note(f"{run_dir}: removed {len(found)} temporary file(s) a stopped run left")


def _remove_contents(run_dir: Path) -> None:
    """Everything in ``run_dir`` but the lock: it held nothing else when the run started."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# -- what a run folder may name: the dataset outside it, the code and weights it was started with


def refuse_inside_data(out: str, data: str) -> None:
    """A run folder inside the dataset's train/ or val/ would be read as a class: refused."""
    if not data:
        return
    out_path = Path(os.path.abspath(Path(out).expanduser())).resolve()
    for split in ("train", "val"):
        folder = Path(data).expanduser().resolve() / split
        if out_path.is_relative_to(folder):
            raise DalikdError(
                f"--out {out} is inside the dataset's {split}/ ({folder}), where every folder "
                "is a class; put the run outside the dataset"
            )


# Settings that name code a run imports (a recipe file, a model's module): a resume takes them
# from the checkpoint, never from an edited config.json alone.
CODE_KEYS = ("kd.aug", "model.student", "model.teacher")


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config


def check_code_names(saved: dict[str, Any], trained: Any, run_dir: Path) -> None:
    """One line where config.json (``saved``) names other code than last.pt's config
    (``trained``): a resume never imports code the user did not give on a command line."""
    if not isinstance(trained, dict):
        return  # a checkpoint from before configs were saved in it
    pairs = [(k, _get(trained, k), _get(saved, k)) for k in CODE_KEYS]
    differs = [f"{k} {then!r} -> {now!r}" for k, then, now in pairs
               if isinstance(then, str) and isinstance(now, str) and then != now]  # fmt: skip
    if differs:
        raise DalikdError(
            f"{run_dir / 'config.json'} names other code than {run_dir / 'last.pt'} was trained "
            f"with: {', '.join(differs)}; a resume imports nothing the run was not started with "
            "(restore config.json, or start a new run with the new setting)"
        )


WEIGHTS_KEYS = ("model.teacher_weights", "model.student_weights")


def absolute_weights(model: Any) -> dict[str, str]:
    """Overrides that save weights files absolute (a resume from another working directory
    finds them); torchvision weights names stay as they are."""
    paths = {}
    for key in WEIGHTS_KEYS:
        value = getattr(model, key.split(".")[1])
        if value and Path(value).expanduser().is_file():
            paths[key] = os.path.abspath(Path(value).expanduser())
    return paths


def same_weights(saved: Any, overrides: dict[str, Any]) -> dict[str, str]:
    """Weights files given again on resume that are the saved ones (the same file, however
    spelled: relative, absolute, through a link), as the saved spelling: not a change."""
    same = {}
    for key in WEIGHTS_KEYS:
        given, was = overrides.get(key), getattr(saved, key.split(".")[1])
        if given and was and given != was:
            try:
                if os.path.samefile(Path(given).expanduser(), Path(was).expanduser()):
                    same[key] = was
            except OSError:  # either is no file (a torchvision name): compared as written
                pass
    return same

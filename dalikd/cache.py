"""Where dalikd keeps files between runs (the scan verdicts, the native build, the demo's
data set), how those folders are made, and which cache files are trusted.

Whoever can write a cache decides what the next run trusts (a scan verdict, a library that is
loaded and run). So folders are created private (0700, whatever the umask), and a cache file
is read only when it and every folder from the cache root down to it are owned by the user
and writable by no one else (:func:`untrusted`); otherwise it is recomputed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def cache_dir() -> Path:
    """$DALIKD_CACHE, else $XDG_CACHE_HOME/dalikd, else ~/.cache/dalikd; always absolute (a
    relative one would move with the working directory, and compilers run elsewhere)."""
    if os.environ.get("DALIKD_CACHE"):
        path = Path(os.environ["DALIKD_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "dalikd"
    return Path(os.path.abspath(path.expanduser()))


def private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents readable and writable by the user only (0700):
    whoever can write a cache decides what the next run trusts."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)  # the umask can only narrow 0700


def untrusted(path: Path, root: Path | None = None) -> str:
    """Why the cache file (or folder) ``path`` must not be trusted, or "": it and each folder
    above it up to ``root`` (included) must be owned by this user and not group- or
    world-writable; ``path`` itself must not be a symbolic link."""
    path = Path(os.path.abspath(path))
    chain = [path]
    if root is not None:
        root = Path(os.path.abspath(root))
        chain += [p for p in path.parents if p.is_relative_to(root)]
    uid = os.getuid()
    for item in chain:
        try:
            st = os.lstat(item) if item == path else os.stat(item)  # folders: where they lead
        except OSError as e:
            return f"{item}: {e.strerror or e}"
        if item == path and stat.S_ISLNK(st.st_mode):
            return f"{item} is a symbolic link"
        if st.st_uid != uid:
            return f"{item} is owned by another user (uid {st.st_uid})"
        if st.st_mode & 0o022:
            return f"{item} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""

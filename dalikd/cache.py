"""Where dalikd keeps files between runs (the scan verdicts, the native build, the demo's
data set), and how those folders are made: private to the user, since whoever can write a
cache decides what the next run trusts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$DALIKD_CACHE, else $XDG_CACHE_HOME/dalikd, else ~/.cache/dalikd."""
    if os.environ.get("DALIKD_CACHE"):
        return Path(os.environ["DALIKD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dalikd"


def private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents readable and writable by the user only (0700):
    whoever can write a cache decides what the next run trusts."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)

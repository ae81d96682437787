"""Output files that a command writes after minutes of work (``--json``, ``--plot``, ``--out``):
checked before the work starts, their missing folders made, so a typo costs nothing."""

from __future__ import annotations

import os
from pathlib import Path

from dalikd.errors import DalikdError


def output_file(path: str | Path, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` ready to be written: its folder made where missing and writable, not itself a
    folder, and ending in one of ``suffixes`` (lower case, e.g. ``(".png",)``) when given.
    One-line errors name ``flag``."""
    path = Path(path).expanduser()
    if suffixes and path.suffix.lower() not in suffixes:
        kinds = " or ".join(f"*{s}" for s in suffixes)
        raise DalikdError(f"{flag} {path}: this output is written as {kinds}; name it so")
    if path.is_dir():
        raise DalikdError(f"{flag} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DalikdError(
            f"{flag} {path}: cannot make folder {path.parent}: {e.strerror}"
        ) from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DalikdError(f"{flag} {path}: folder {path.parent} is not writable")
    return path

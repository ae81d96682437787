"""Atomic files: a crash while writing never leaves a half-written checkpoint or metrics file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dalikd.errors import DalikdError


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to ``path.tmp``, fsync, rename over ``path``; a full or read-only disk is
    one clear line and leaves no ``.tmp`` behind (``path`` keeps its previous content)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise DalikdError(f"cannot write {path}: {reason}") from None


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to ``path.tmp``, fsync, then rename over ``path``."""
    _write(Path(path), lambda tmp: torch.save(obj, tmp))


def write_text_atomic(text: str, path: str | Path) -> None:
    _write(Path(path), lambda tmp: tmp.write_text(text))


def write_jsonl_atomic(records: list[dict[str, Any]], path: str | Path) -> None:
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), path)

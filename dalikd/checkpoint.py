"""Atomic files: a crash while writing never leaves a half-written checkpoint or metrics file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to ``path.tmp``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    _replace(tmp, path)


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _replace(tmp, path)


def write_jsonl_atomic(records: list[dict[str, Any]], path: str | Path) -> None:
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), path)

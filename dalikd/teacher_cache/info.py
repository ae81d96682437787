"""What ``dalikd cache-info DIR`` reports: the key, the steps covered per epoch and rank, the size
on disk and per row, what the format changed of the soft targets (mean and p99 KL per epoch, as
measured when the chunks were written), and the projected ImageNet size of each format."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dalikd.config import TrainConfig
from dalikd.errors import DalikdError
from dalikd.teacher_cache.files import read_bytes, read_file
from dalikd.teacher_cache.formats import Format, imagenet_projection, kl_quantile
from dalikd.teacher_cache.store import CHUNK_NAME

DEFAULT_TOPK = TrainConfig().teacher_cache_topk  # the K of --teacher-cache-format topk
SIZE_TARGET = 20e9  # bytes: the ImageNet-100-epoch budget the default K is chosen for


def read_key(root: Path) -> dict[str, Any]:
    path = root / "key.json"
    if not path.exists():
        raise DalikdError(f"{root} is not a dalikd teacher cache (no key.json)")
    data, why = read_bytes(path, root)
    try:
        key = json.loads(data) if data is not None else None
    except ValueError:
        key = None
    if not isinstance(key, dict):
        raise DalikdError(f"{path} {why or 'is unreadable'}: not a teacher cache's key")
    return key


def cache_info(root: str | Path) -> dict[str, Any]:
    """The report of the cache in ``root`` (see the module docstring)."""
    root = Path(root)
    key = read_key(root)
    epochs: dict[int, dict[int, int]] = {}
    kl: dict[int, list[Any]] = {}  # epoch -> [Σ KL, rows, histogram]
    train_bytes, rows = 0, 0
    for chunk_path in sorted((root / "train").glob("e*/r*/c*.pt")):
        match = CHUNK_NAME.fullmatch(chunk_path.name)
        if not match:
            continue
        epoch, rank = int(chunk_path.parent.parent.name[1:]), int(chunk_path.parent.name[1:])
        steps = int(match[2]) - int(match[1])
        epochs.setdefault(epoch, {}).setdefault(rank, 0)
        epochs[epoch][rank] += steps
        train_bytes += chunk_path.stat().st_size
        chunk, _ = read_file(chunk_path, root)
        if chunk is None or "kl_rows" not in chunk:
            continue
        main = next((chunk[k] for k in ("logits", "codes", "values") if k in chunk), None)
        rows += steps * (main.shape[1] if main is not None else 0)
        acc = kl.setdefault(epoch, [0.0, 0, torch.zeros_like(chunk["kl_hist"])])
        acc[0] += float(chunk["kl_sum"])
        acc[1] += int(chunk["kl_rows"])
        acc[2] += chunk["kl_hist"]
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    recipe, kept, picked = projected_recipe(key)
    return {
        "key": key,
        "epochs": {e + 1: ranks for e, ranks in sorted(epochs.items())},
        "kl": {
            e + 1: {"mean": s / n if n else math.nan, "p99": kl_quantile(h, 0.99), "rows": n}
            for e, (s, n, h) in sorted(kl.items())
        },  # fmt: skip
        "size_bytes": total,
        "train_bytes": train_bytes,
        "rows": rows,
        "bytes_per_row": train_bytes / rows if rows else math.nan,
        "format": key.get("format", "exact"),
        "imagenet": imagenet_projection(_format(key), kept, picked),
        "imagenet_formats": projections(key, kept, picked),
        "imagenet_recipe": recipe,
    }


def _format(key: dict[str, Any]) -> Format:
    name = key.get("format", "topk" if int(key.get("topk", 0)) else "exact")
    return Format(name, int(key.get("topk", 0)), float(key.get("temperature") or 4.0))


def projections(key: dict[str, Any], kept: int, picked: bool) -> dict[str, dict[str, float]]:
    """The ImageNet projection of each format for the cache's recipe: exact in fp32 (a CPU or
    --precision fp32 run) and bf16 (the GPU default), compact, and top-K (the cache's K, else
    the default)."""
    k = int(key.get("topk", 0)) or DEFAULT_TOPK
    return {
        "exact fp32": imagenet_projection(Format("exact"), kept, picked, full_itemsize=4),
        "exact bf16": imagenet_projection(Format("exact"), kept, picked, full_itemsize=2),
        "compact": imagenet_projection(Format("compact"), kept, picked),
        f"topk {k}": imagenet_projection(Format("topk", k), kept, picked),
    }


def projected_recipe(key: dict[str, Any]) -> tuple[str, int, bool]:
    """The cache's own recipe at ImageNet's batch of 256: (its name for the projection, the x'
    rows kept per step, whether a pool's pick indices are stored). A key without ``aug`` (none
    written by dalikd) gets KD + CutMixPick, the default is chosen for."""
    aug = key.get("aug")
    if aug is None:
        return "KD + CutMixPick keeping 256 of 512", 256, True
    if aug == "none":
        return "plain KD, no x'", 0, False
    pool = int(key.get("pool_size", 1))
    if pool <= 1:
        return f"KD + {aug}", 256, False
    count, batch = int(key.get("pick_count", 0)), int(key.get("batch_size", 256))
    # the share of the pool the cache's run keeps (an absolute count is per its batch)
    share = count / (pool * batch) if count else float(key.get("pick_fraction", 0.5))
    kept = min(max(round(share * pool * 256), 1), pool * 256)
    return f"KD + {aug} keeping {kept} of {pool * 256}", kept, True

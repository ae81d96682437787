"""The cache key: every setting that decides the teacher's inputs and outputs, derived from the
data plan (:class:`dalikd.plan.DataPlan`), the teacher and the code.

Every field of the plan and of its ``data`` settings is in the key under its own name unless
:data:`NOT_IN_KEY` lists it with the reason it cannot change a teacher output; a new field is
therefore keyed by default, and ``tests/test_teacher_cache_key.py`` checks, field by field, that
changing a keyed one changes the key and changing an excluded one does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dalikd.plan import DataPlan
from dalikd.shards import ShardSplit

CACHE_FORMAT = 2  # the layout of key.json and the chunk files (2: formats, per-chunk KL)

# Fields of DataPlan / DataConfig that do not decide what the teacher sees or returns, each
# with the reason. Everything else in the plan is keyed.
NOT_IN_KEY: dict[str, str] = {
    # where the files are, not what they hold: the listing's hash (data_listing) stands for the
    # classes, files, sizes and labels (a shard set's: its manifest's shard checksums), so a
    # dataset copied to another folder keeps its cache
    "path": "the dataset's folder; data_listing keys its contents",
    # DALI's results do not depend on how many threads compute them
    "threads": "thread count",
    # the GPU decoder's buffer sizes: where it allocates, not what it decodes
    "preallocate_width_hint": "nvJPEG buffer size",
    "preallocate_height_hint": "nvJPEG buffer size",
    "device_memory_padding": "nvJPEG buffer padding",
    "host_memory_padding": "nvJPEG buffer padding",
    # the resolved recipe function: its --aug spec (aug) and its source (aug_source) are keyed
    "recipe": "the function of aug",
    # whether this loader's GPU decoder preallocates (training's does): memory, not pixels
    "preallocate": "nvJPEG preallocation on or off",
    # the scan's pixel limit decides which files are left out; data_listing keys what is kept
    "max_pixels": "the scan's guard; data_listing keys the files kept",
}

# Fields keyed only where they act; elsewhere their value changes nothing and is keyed as None.
KEYED_WHERE: dict[str, Callable[[DataPlan], bool]] = {
    "mixing": lambda plan: plan.mixes,  # only a mixing recipe has a mixing path
    "hw_decoder_load": lambda plan: plan.device == "gpu",  # the GPU ("mixed") decoder's only
}

# The code between the files and the teacher's logits: the graphs and their operators, the
# recipes, the normalization and hand-off, the input adaptation, the teacher pass and the pick.
PIXEL_MODULES = ("loaders", "ops", "autoaugment", "recipes", "plan", "batch", "device", "models",
                 "teacher", "step", "pick")  # fmt: skip


def _json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _json(v) for k, v in dataclasses.asdict(value).items()}
    if hasattr(value, "_asdict"):  # a NamedTuple (InputNorm)
        return {k: _json(v) for k, v in value._asdict().items()}
    if isinstance(value, tuple | list):
        return [_json(v) for v in value]
    return value


def plan_key(plan: DataPlan) -> dict[str, Any]:
    """The plan's part of the key: every field of ``plan.data`` and of ``plan`` by its name,
    less :data:`NOT_IN_KEY`, with :data:`KEYED_WHERE`'s None where they do not act."""
    out: dict[str, Any] = {}
    parts = [(f.name, getattr(plan.data, f.name)) for f in dataclasses.fields(plan.data)]
    parts += [(f.name, getattr(plan, f.name)) for f in dataclasses.fields(plan) if f.name != "data"]
    for name, value in parts:
        if name in NOT_IN_KEY:
            continue
        assert name not in out, f"{name} is both a DataPlan and a DataConfig field"
        acts = KEYED_WHERE.get(name)
        out[name] = _json(value) if acts is None or acts(plan) else None
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def listing_hash(dataset: Any, sizes: dict[str, int] | None = None) -> str:
    """sha256 of the data listing: classes, then per split each file (relative path, size in
    bytes, label), then the files left out and why. Sizes catch a replaced file cheaply; a
    moved dataset folder keeps its hash. ``sizes`` (relative path -> bytes): the sizes of the
    files a resumed run found failing (its checkpoint's), hashed for such a file the user removed
    since, so the run's listing (:func:`dalikd.recovery.with_reported`) keeps its hash. A shard
    set's split is its manifest's shards (names, sample numbers, sha256:
    :meth:`dalikd.shards.ShardSplit.digest`), nothing listed."""
    h = hashlib.sha256()
    root = Path(dataset.root)
    sizes = sizes or {}
    h.update(("\n".join(dataset.classes) + "\n").encode())
    for name in ("train", "val"):
        split = getattr(dataset, name)
        h.update(f"[{name}]\n".encode())
        if isinstance(split, ShardSplit):
            h.update(f"shards {split.digest()}\n".encode())
            continue
        for path, label in zip(split.files, split.labels, strict=True):
            rel = os.path.relpath(path, root)
            h.update(f"{rel}\t{_size(path, sizes.get(rel))}\t{label}\n".encode())
    h.update(b"[skipped]\n")
    for path, reason in dataset.skipped:
        h.update(f"{os.path.relpath(path, root)}\t{reason}\n".encode())
    return h.hexdigest()


def _size(path: str, saved: int | None) -> int | str:
    """A listed file's size; ``saved`` where it is gone ("?" where that is unknown too)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return "?" if saved is None else saved


def weights_id(weights: str) -> str:
    """A teacher's weights as the key holds them: the sha256 of a weights file, else the name
    (a torchvision weights name or a timm pretrained tag names fixed published weights)."""
    if weights and Path(weights).expanduser().is_file():
        return "sha256:" + _sha256_file(Path(weights).expanduser())
    return "name:" + weights


def data_source_hash() -> str:
    """sha256 of the sources of :data:`PIXEL_MODULES` and the native operators' C++/CUDA: a
    cache written by another dalikd version is a key mismatch, not wrong targets."""
    import importlib

    from dalikd import native

    h = hashlib.sha256()
    for name in PIXEL_MODULES:
        module = importlib.import_module(f"dalikd.{name}")
        h.update(Path(module.__file__).read_bytes() + b"\0")
    h.update(native.source_hash().encode())
    return h.hexdigest()


def recipe_hash(aug: str) -> str:
    """sha256 of the source files of the ``--aug`` recipes: their parameters live there."""
    from dalikd import recipes

    h = hashlib.sha256(aug.encode())
    for path in recipes.source_files(aug):
        h.update(path.read_bytes())
    return h.hexdigest()


def device_key(plan: DataPlan) -> dict[str, str]:
    """The GPU and its decoder where the plan decodes on a GPU (their JPEG decoders may
    differ in pixels); "" on CPU."""
    if plan.device != "gpu":
        return {"gpu": "", "decoder": "cpu"}
    import nvidia.dali as dali
    import torch

    return {"gpu": torch.cuda.get_device_name(), "decoder": f"mixed (DALI {dali.__version__})"}


def cache_key(
    plan: DataPlan,
    dataset: Any,
    *,
    teacher: str,
    teacher_weights: str,
    kd: Any,
    precision: str,
    world_size: int,
    channels_last: bool,
    graph_format: int,
    fmt: Any,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Every setting that decides the teacher's inputs and outputs: the plan (:func:`plan_key`),
    the data listing, the teacher and its weights, the pick (a pool's), the precision
    (resolved) and layout, the shard layout, the code, and the storage format ``fmt``
    (:class:`~dalikd.teacher_cache.formats.Format`). Flat, JSON-ready, compared key by key.
    ``sizes``: see :func:`listing_hash`."""
    import nvidia.dali as dali

    pool = plan.pool_size > 1
    return {
        "cache_format": CACHE_FORMAT,
        "graph_format": graph_format,
        "dali_version": dali.__version__,
        "data_listing": listing_hash(dataset, sizes),
        "num_classes": dataset.num_classes,
        **plan_key(plan),
        "data_source": data_source_hash(),
        "aug_source": recipe_hash(plan.aug),
        "pick_criterion": kd.pick_criterion if pool else "",
        "pick_count": kd.pick_count if pool else 0,
        "pick_fraction": kd.pick_fraction if pool else 0.0,
        "world_size": world_size,
        "teacher": teacher,
        "teacher_weights": weights_id(teacher_weights),
        "precision": precision,
        "channels_last": channels_last and plan.device == "gpu",
        **device_key(plan),
        "format": fmt.name,
        "topk": fmt.topk if fmt.name == "topk" else 0,
        # top-K's remainder log-sum-exp is taken at the KD temperature; the others keep logits
        "temperature": fmt.temperature if fmt.name == "topk" else 0.0,
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def key_difference(saved: dict[str, Any], key: dict[str, Any]) -> str:
    """'seed 0 -> 1, teacher resnet34 -> resnet50' for the settings that differ ('' if none)."""
    names = sorted(set(saved) | set(key))
    return ", ".join(
        f"{n} {_short(saved.get(n))} -> {_short(key.get(n))}"
        for n in names
        if saved.get(n) != key.get(n)
    )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:19] + "..." if len(text) > 22 else text

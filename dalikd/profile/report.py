"""The report: stage records, the bound of each scheme, the facts of the machine and
data, and the bar chart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dalikd import __version__
from dalikd.atomic import write_atomic
from dalikd.data import Dataset
from dalikd.profile.config import DALI_RESIZE, Timing
from dalikd.sources import is_shards, mean_sample_kb


def stage_record(name: str, timing: Timing, kind: str, aug: str | None = None, **extra) -> dict:
    return {
        "name": name,
        "aug": aug,
        "kind": kind,
        "img_per_s": timing.img_per_s,
        "cpu_ms_per_img": timing.cpu_ms_per_img,
        "windows": timing.windows,
        **extra,
    }


def dataset_facts(dataset: Dataset) -> dict[str, Any]:
    return {
        "path": str(dataset.root),
        "source": "shards" if is_shards(dataset) else "folder",
        "train_images": len(dataset.train),
        "classes": dataset.num_classes,
        "mean_file_kb": round(mean_sample_kb(dataset), 1),  # a shard set's: bytes per sample
    }


def cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def extra_ms(timing: Timing, before: Timing) -> float:
    """ms per sample a cumulative stage adds to the one before it (0 when within noise)."""
    return max(0.0, 1e3 / timing.img_per_s - 1e3 / before.img_per_s)


def cpu_vs_plain(timing: Timing, plain: Timing) -> dict[str, float]:
    """``{"vs_plain_cpu": plain CPU ms / this CPU ms per sample}`` from the same windows, or {}
    where CPU time was not measured. On a shared machine this is the steadier share: the wall
    rates of two pipelines can differ by how well each fills the cores, not by what it costs
    (a mixing pipeline's extra operators came out "faster" than the plain one in wall time)."""
    if not timing.cpu_ms_per_img or not plain.cpu_ms_per_img:
        return {}
    return {"vs_plain_cpu": plain.cpu_ms_per_img / timing.cpu_ms_per_img}


def bound(stages: list[dict], names: list[str]) -> dict[str, Any]:
    """The stage of a scheme's chain with the largest own cost (ms per sample). A cumulative
    data stage costs the difference of inverse rates to the data stage before it (unless its
    record already holds one measured in the same windows); a model stage its inverse rate.
    Sets ``own_ms_per_img`` on the stage records."""
    by_name = {st["name"]: st for st in stages}
    worst, previous = None, 0.0
    for name in names:
        st = by_name[name]
        cost = 1e3 / st["img_per_s"]
        own = cost if st["kind"] != "data" else max(0.0, cost - previous)
        if st["kind"] == "data":
            previous = cost
        own = st.setdefault("own_ms_per_img", own)
        if worst is None or own > worst[1]:
            worst = (name, own)
    assert worst is not None
    return {"stage": worst[0], "own_ms_per_img": worst[1]}


def mixing_path(plans: dict[str, Any]) -> str:
    """Which implementation the mixing recipes ran on (their plans' resolved path): dalikd's
    fused operator or stock ones."""
    native_path = any(plan.native_mixing for plan in plans.values())
    return "native (fn.dalikd_mix)" if native_path else "stock operators"


def resize_path(plan: Any) -> str:
    """Which resize the pipelines ran (the plan's): dalikd's operator, or DALI's and why."""
    from dalikd import native

    if plan.native_resize:
        return "native (fn.dalikd_resize, flip fused)"
    if not plan.data.antialias:
        return f"{DALI_RESIZE}, antialias=False (--no-antialias)"
    reason = native.resize_reason(plan.device) or "--resize dali"
    return f"{DALI_RESIZE}: {reason}"


def versions() -> dict[str, str]:
    import nvidia.dali
    import torchvision

    return {
        "dalikd": __version__,
        "dali": nvidia.dali.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """A horizontal bar chart of every stage's rate; each scheme's torchvision baseline sits
    under its DALI hand-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"data": "#4c72b0", "side": "#a0b4d6", "model": "#dd8452", "step": "#55a868"}
    base = {b["aug"]: b for b in report["baseline"]}
    rows = []
    for st in report["stages"]:
        rows.append((st["name"], st["img_per_s"], colours[st["kind"]]))
        if st["name"].startswith("hand-off") and st["aug"] in base:
            rows.append(
                (f"torchvision DataLoader ({st['aug']})", base[st["aug"]]["img_per_s"], "#c44e52")
            )
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(rows) + 1.0))
    ax.barh(range(len(rows)), [r[1] for r in rows], color=[r[2] for r in rows])
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training samples / s (log scale); red: torchvision DataLoader")
    ax.set_title(
        f"dalikd profile: {report['device']}, {report['cpu_count']} cores, "
        f"{report['threads']} threads, batch {report['batch_size']}, {report['image_size']} px"
    )
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path

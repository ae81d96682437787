"""`dalikd demo`: the whole method on a dataset that ships with an installed package.

scikit-learn carries 1,797 handwritten digits (8x8, 10 classes). They are rendered once to
32x32 JPEGs in the ImageNet layout (a user cache dir), then four runs go through the same
``train`` as any user's: a ResNet-18 teacher, a small student trained alone, and the same
student distilled from the teacher with a second view (the paper's two-view loss), once with
``flip`` and once with ``cutmixpick``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dalikd.cache import cache_dir, private_dir
from dalikd.config import build_config
from dalikd.plots import write_curves
from dalikd.train import Reporter, SilentReporter, train

DATASET_VERSION = "digits-v1"  # bump when the rendering changes, so caches rebuild
SIDE = 32  # px, rendered image side
VAL_EVERY = 5  # every 5th image of a class goes to val/ (20%)
CURVES = "curves.png"  # the four runs' curves (dalikd plot), in the demo's folder


def build_digits(root: Path | None = None) -> Path:
    """Render scikit-learn's digits to ``root/train|val/<digit>/*.JPEG`` once; return root.

    Written to a temporary folder and renamed into place, so an interrupted build leaves
    nothing half-made behind.
    """
    from sklearn.datasets import load_digits  # ships its data; imported only here

    root = Path(root) if root else cache_dir() / DATASET_VERSION
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    private_dir(root.parent)  # the cache root, user-only where this creates it
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root.parent))
    digits = load_digits()
    counts: dict[int, int] = {}
    for pixels, label in zip(digits.images, digits.target, strict=True):
        k = counts.get(int(label), 0)
        counts[int(label)] = k + 1
        split = "val" if k % VAL_EVERY == VAL_EVERY - 1 else "train"
        folder = tmp / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        gray = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)  # dark ink on white
        image = Image.fromarray(gray).resize((SIDE, SIDE), Image.BICUBIC).convert("RGB")
        image.save(folder / f"{k:04d}.JPEG", quality=95)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# Shared by the four runs: small images, short cosine schedule, CIFAR-like optimiser.
COMMON = {
    "data.image_size": SIDE,
    "data.batch_size": 64,
    "data.crop_scale": (0.35, 1.0),
    "optim.weight_decay": 5e-4,
    "optim.schedule": "cosine",
    "optim.warmup_epochs": 1.0,
}
TEACHER, STUDENT = "resnet18", "shufflenet_v2_x0_5"
EPOCHS = {"teacher": 15, "student": 15}
# The students (alone and distilled) share one learning rate, so the runs compare. At 0.05 the
# student alone trained erratically (val loss spikes; 57-75% top-1 depending on rounding); at
# 0.02 it trains smoothly.
LR = {"teacher": 0.05, "student": 0.02}


def run_demo(
    out: Path, reporter: Reporter | None = None, epochs: int | None = None, device: str = "auto"
) -> list[dict[str, Any]]:
    """Train the teacher, the student alone, and the student distilled with flip and with
    CutMixPick as x'; draw their curves to ``out/curves.png``; return one result row per run."""
    reporter = reporter or SilentReporter()
    data = build_digits()
    reporter.message(f"dataset: {data}")
    teacher = {"model.teacher": TEACHER, "model.teacher_weights": str(out / "teacher" / "best.pt")}
    # (role, run folder, model, settings)
    runs = [
        ("teacher", "teacher", TEACHER, {"model.student": TEACHER}),
        ("student alone", "student", STUDENT, {"model.student": STUDENT}),
        ("KD student (aug flip)", "kd", STUDENT,
         {"model.student": STUDENT, **teacher, "kd.aug": "flip"}),
        ("KD student (aug cutmixpick)", "kd_cutmixpick", STUDENT,
         {"model.student": STUDENT, **teacher, "kd.aug": "cutmixpick"}),
    ]  # fmt: skip
    rows = []
    for i, (role, folder, model, settings) in enumerate(runs):
        run_dir = out / folder
        kind = "teacher" if i == 0 else "student"
        n = epochs or EPOCHS[kind]
        reporter.message(f"[{i + 1}/{len(runs)}] {role}: {model}, {n} epochs -> {run_dir}")
        cfg = build_config(
            overrides={
                **COMMON, **settings, "data.path": str(data), "optim.epochs": n,
                "optim.lr": LR[kind],
                "out": str(run_dir), "device": device,
            }
        )  # fmt: skip
        summary = train(cfg, reporter, overwrite=True)  # a rerun replaces the demo's runs
        final = summary["final"]
        rows.append({"role": role, "model": model, "run": str(run_dir),
                     "val_top1": final["val_top1"], "val_loss": final["val_loss"]})  # fmt: skip
    write_curves([row["run"] for row in rows], out / CURVES)
    return rows

"""The training loop: distill a student from a frozen teacher (or train it supervised).

One function, read top to bottom: setup -> resume -> per epoch (lr -> forward -> backward ->
step -> log) -> validate -> checkpoint. The loss is in ``kd_step``; the schedule is a pure
function of the step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dalikd import pipeline, recipes
from dalikd.checkpoint import save_atomic, write_jsonl_atomic, write_text_atomic
from dalikd.config import OptimConfig, TrainConfig, build_config
from dalikd.data import Dataset, scan_dataset
from dalikd.device import amp_dtype, autocast, prepare_images, resolve_device
from dalikd.errors import DalikdError
from dalikd.evaluate import evaluate
from dalikd.losses import kd_divergence
from dalikd.models import build_model


class Reporter(Protocol):
    """What the loop tells the outside world; the CLI draws it with rich."""

    def message(self, text: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, step: int, loss: float, img_per_s: float, lr: float) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def message(self, text: str) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, step: int, loss: float, img_per_s: float, lr: float) -> None:
        pass

    def epoch_end(self, record: dict[str, Any]) -> None:
        pass


# -- schedule ----------------------------------------------------------------------------------


def lr_at(step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Learning rate at a global step: linear warmup, then step or cosine decay."""
    warmup = round(optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "cosine":
        total = optim.epochs * steps_per_epoch
        progress = (step - warmup) / max(1, total - warmup)
        return optim.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    epoch = step // steps_per_epoch
    return optim.lr * optim.gamma ** sum(epoch >= m for m in optim.milestones)


# -- the loss ----------------------------------------------------------------------------------


def kd_step(
    student: nn.Module, teacher: nn.Module | None, batch: pipeline.Batch, cfg: TrainConfig
) -> dict[str, torch.Tensor]:
    """Named losses of one step; ``loss`` is what to backpropagate.

    No teacher: supervised, loss = CE(s(x), y). With a teacher: the two-view KD loss of
    losses.py, with the x' term only when the batch carries aug_images.
    """
    kd = cfg.kd
    student_logits = student(batch.images)
    ce_loss = F.cross_entropy(student_logits, batch.labels)
    if teacher is None:
        return {"loss": ce_loss, "ce_loss": ce_loss}
    views = [batch.images] if batch.aug_images is None else [batch.images, batch.aug_images]
    with torch.no_grad():  # one teacher pass over x and x' together: eval mode, same numbers
        teacher_logits = teacher(torch.cat(views)).chunk(len(views))
    kd_loss = kd_divergence(student_logits, teacher_logits[0], kd.temperature)
    losses = {"ce_loss": ce_loss, "kd_loss": kd_loss}
    total_kd = kd_loss
    if batch.aug_images is not None:
        # A second, separate student pass: x' is a different batch for BatchNorm statistics.
        aug_student_logits = student(batch.aug_images)
        losses["kd_aug_loss"] = kd_divergence(aug_student_logits, teacher_logits[1], kd.temperature)
        total_kd = total_kd + losses["kd_aug_loss"]
    losses["loss"] = kd.ce_weight * ce_loss + kd.kd_weight * total_kd
    return losses


# -- run setup ---------------------------------------------------------------------------------


@dataclass
class Models:
    student: nn.Module
    teacher: nn.Module | None


def build_models(cfg: TrainConfig, dataset: Dataset) -> Models:
    m = cfg.model
    student = build_model(m.student, dataset.num_classes, m.student_weights, role="student")
    teacher = None
    if m.teacher:
        teacher = build_model(m.teacher, dataset.num_classes, m.teacher_weights, role="teacher")
        teacher.eval().requires_grad_(False)  # frozen once, never switched back to train
    return Models(student, teacher)


def default_run_dir() -> str:
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def load_resume(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config a run was started with, updated by flags given again (e.g. more epochs)."""
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.json").is_file():
        raise DalikdError(f"nothing to resume in {run_dir}: no last.pt and config.json there")
    saved = json.loads((run_dir / "config.json").read_text())
    return build_config(saved, {**overrides, "out": str(run_dir)})


def train(cfg: TrainConfig, reporter: Reporter | None = None, resume: bool = False) -> dict:
    """Train ``cfg.model.student`` and return the final summary.

    ``resume=True`` continues from ``cfg.out/last.pt`` (weights, optimizer, schedule step,
    metrics history). Writes config.json, metrics.jsonl, last.pt and best.pt in ``cfg.out``.
    """
    reporter = reporter or SilentReporter()
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device != "gpu":
        raise DalikdError("--precision fp16 needs a GPU; on CPU use fp32 (default) or bf16")
    torch.manual_seed(cfg.seed)
    dataset = scan_dataset(cfg.data.path)
    recipe = recipes.resolve(cfg.kd.aug)
    models = build_models(cfg, dataset)
    student, teacher = models.student, models.teacher
    run_dir = Path(cfg.out or default_run_dir())
    cfg = build_config(overrides={"out": str(run_dir)}, base=cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    tdev = pipeline.torch_device(device)
    student.to(tdev)
    if teacher is not None:
        teacher.to(tdev)
    if device == "gpu":
        for model in (student, teacher):
            if model is not None:
                model.to(memory_format=torch.channels_last)

    decay, no_decay = [], []
    for p in student.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)  # no weight decay on BN and biases
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
    )  # fmt: skip
    # Loss scaling only for fp16 autocast; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(enabled=amp_dtype(device, cfg.precision) == torch.float16)

    start_epoch, global_step, best_top1, history = 0, 0, -1.0, []
    if resume:
        ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        global_step = ckpt["scheduler"]["step"]
        start_epoch, best_top1, history = ckpt["epoch"] + 1, ckpt["best_top1"], ckpt["history"]
        reporter.message(f"resumed {run_dir} after epoch {start_epoch}")
    write_text_atomic(json.dumps(cfg.to_dict(), indent=2) + "\n", run_dir / "config.json")
    write_jsonl_atomic(history, run_dir / "metrics.jsonl")

    # A new seed per start keeps a resumed run from replaying the first epochs' augmentations.
    train_data = pipeline.train_loader(
        dataset.train,
        cfg.data,
        recipe,
        device=device,
        seed=cfg.seed * 1000 + start_epoch,
        granularity=cfg.kd.granularity,
    )
    val_data = pipeline.val_loader(dataset.val, cfg.data, device=device)
    steps_per_epoch = len(train_data)
    if steps_per_epoch == 0:
        raise DalikdError(
            f"{len(dataset.train)} training images make no full batch of {cfg.data.batch_size}; "
            "lower --batch-size"
        )
    if teacher is not None and cfg.eval_teacher:
        t = evaluate(teacher, val_data, device, cfg.precision)
        reporter.message(
            f"teacher {cfg.model.teacher}: val top-1 {t['top1']:.2f}%  top-5 {t['top5']:.2f}%  "
            f"loss {t['loss']:.4f}"
        )

    for epoch in range(start_epoch, cfg.optim.epochs):
        reporter.epoch_start(epoch, cfg.optim.epochs, steps_per_epoch)
        student.train()
        loss_sum = torch.zeros((), device=tdev)
        seen, t0 = 0, time.perf_counter()
        for step, batch in enumerate(train_data):
            # lr
            lr = lr_at(global_step, steps_per_epoch, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # forward
            batch.images = prepare_images(batch.images, device, cfg.precision)
            if batch.aug_images is not None:
                batch.aug_images = prepare_images(batch.aug_images, device, cfg.precision)
            with autocast(device, cfg.precision):
                losses = kd_step(student, teacher, batch, cfg)
            # backward + step
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            # log: .item() is a CPU-GPU sync point, so only every log_every steps
            loss_sum += losses["loss"].detach()
            seen += len(batch)
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                loss = losses["loss"].item()
                if not math.isfinite(loss):
                    raise DalikdError(
                        f"loss is {loss} at step {global_step} (epoch {epoch + 1}); "
                        "lower --lr; last.pt keeps the last good epoch"
                    )
                reporter.step(step + 1, loss, seen / (time.perf_counter() - t0), lr)
        train_seconds = time.perf_counter() - t0

        # validate
        val = evaluate(student, val_data, device, cfg.precision)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / steps_per_epoch,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "lr": lr,
            "img_per_s": seen / train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)

        # checkpoint: last.pt every epoch, best.pt when val top-1 improves
        ckpt = {
            "model": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"step": global_step},
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_top1": max(best_top1, val["top1"]),
            "history": history,
            "config": cfg.to_dict(),
            "classes": list(dataset.classes),
        }
        save_atomic(ckpt, run_dir / "last.pt")
        if val["top1"] > best_top1:
            best_top1 = val["top1"]
            save_atomic(ckpt, run_dir / "best.pt")
        write_jsonl_atomic(history, run_dir / "metrics.jsonl")
        reporter.epoch_end(record)

    last = history[-1] if history else {}
    return {
        "run_dir": str(run_dir),
        "device": device,
        "epochs": cfg.optim.epochs,
        "best_top1": best_top1,
        "final": last,
    }

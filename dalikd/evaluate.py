"""Validation: loss and top-1 / top-5 accuracy of a model over a whole validation split, and
(given a teacher) how closely the student agrees with it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dalikd import distributed, sources
from dalikd.batch import InputNorm, data_norm
from dalikd.config import flags_named_as_keys
from dalikd.device import autocast, prepare_images, resolve_device, torch_device
from dalikd.errors import DalikdError
from dalikd.losses import kl_divergence
from dalikd.models import build_model, check_classes, checkpoint_classes, input_norm
from dalikd.settings import command_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from dalikd.loaders import Loader


def agreement_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[rows where the student's top-1 class is the teacher's, sum over rows of
    KL(teacher || student) at T = 1], float64 on the logits' device.

    KL(p_t || p_s) = sum_c p_t (log p_t - log p_s), from log-softmax of float32 logits.
    """
    agree = (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).sum()
    kl = kl_divergence(student_logits, teacher_logits, 1.0, reduction="sum")
    return torch.stack([agree.double(), kl.double()])


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Loader,
    device: str,
    precision: str = "auto",
    ctx: distributed.Dist | None = None,
    teacher: nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    norm: InputNorm | None = None,
) -> dict[str, float]:
    """Validation loss and top-1 / top-5 accuracy (%) over every image of the loader, summed
    over all ranks when distributed (each rank holds one shard of the split).

    With a (frozen, eval-mode) ``teacher``, also ``agree_top1``: the % of images where the
    model's top-1 class is the teacher's, and ``kl_ts``: the mean KL(teacher || model) at T = 1
    (nats per image), a cheap signal of how far the distillation has come.

    ``progress(done, total)`` hears of each batch this rank has evaluated (no device sync).
    ``norm``: the normalization the model's inputs get (a trained student's: the data's where
    set, :func:`dalikd.models.student_norm`); default: its own (:func:`input_norm`).
    """
    model.eval()
    norm = norm or input_norm(model)  # a teacher takes the model's inputs (models.adapt_input)
    # Sums stay on the device: no CPU-GPU sync until the end.
    # [loss sum, top-1 hits, top-5 hits, images, agreeing images, KL sum]
    sums = torch.zeros(6, dtype=torch.float64, device=torch_device(device))
    total = len(loader) if progress is not None else 0
    for done, batch in enumerate(loader, 1):
        images = prepare_images(batch.images, device, norm)
        with autocast(device, precision):
            logits = model(images).float()
            teacher_logits = teacher(images).float() if teacher is not None else None
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == batch.labels[:, None]
        sums[:4] += torch.stack([
            F.cross_entropy(logits, batch.labels, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(len(batch), dtype=torch.float64, device=sums.device),
        ])  # fmt: skip
        if teacher_logits is not None:
            sums[4:] += agreement_sums(logits, teacher_logits)
        if progress is not None:
            progress(done, total)
    loss_sum, top1, top5, count, agree, kl_sum = distributed.all_sum(
        ctx or distributed.Dist(), sums
    ).tolist()
    if not count:
        raise DalikdError("no validation image could be decoded (see data_report.tsv)")
    result = {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "count": int(count),
    }
    if teacher is not None:
        result["agree_top1"] = 100.0 * agree / count
        result["kl_ts"] = kl_sum / count
    return result


def evaluate_model(
    data: str,
    model_name: str,
    weights: str,
    *,
    batch_size: int = 100,
    image_size: int | None = None,
    threads: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Build ``model_name`` with ``weights`` and evaluate it on ``data``/val (with ``plan``: the
    data plan the validation graph was built from).

    The data settings are the dataset's own (its dataset.json: an imported CIFAR's image size,
    validation transform and normalization) where no argument sets them; ``image_size`` None:
    the dataset's, else 224. The model sees its own normalization, else the data's (a cifar:
    model's pretrained weights were trained on the data's).

    The class index is the checkpoint's classes where it carries them, else train/'s class
    folders, else val/'s (a dataset may hold val/ only); names that differ are refused.
    """
    # the same checks as training's (a batch of 0 or a 0 px image is one line, not a traceback)
    given = {"data.path": data, "data.batch_size": batch_size, "data.threads": threads}
    if image_size is not None:
        given["data.image_size"] = image_size
    data_cfg = command_config(overrides=given, flags=flags_named_as_keys(*given)).data
    if not weights.strip():
        raise DalikdError(
            "--weights is empty: give a weights file or a torchvision weights name (evaluating "
            "random weights measures nothing)"
        )
    device = resolve_device(device)
    names = sources.names(data)  # a shard set's: its manifest's
    trained_on = checkpoint_classes(weights)
    train = Path(data).expanduser() / "train"
    val_only = sources.source_kind(data) == "folder" and not train.is_dir()
    check_classes(trained_on, names, f"weights {weights}", subset=val_only)
    dataset = sources.open_dataset(data, splits=("val",), classes=trained_on or names)
    model = build_model(model_name, dataset.num_classes, weights)
    from dalikd import recovery  # DALI: only where the loader is built
    from dalikd.plan import resolve_plan

    model.to(torch_device(device))
    norm = input_norm(model, data_norm(data_cfg.mean, data_cfg.std))
    plan = resolve_plan(data_cfg, device=device, norm=norm, raw_shape=dataset.raw_shape)
    # a sample that fails to decode is left out (one warning line) and the evaluation goes on
    source = recovery.source_of(dataset.val)  # a folder's files or a shard set's samples
    left_out = recovery.LeftOutWarning(f"validation {source.what}")
    val = recovery.ValData(source, plan, on_failure=left_out)
    result = evaluate(model, val, device, norm=norm)
    return {**result, "plan": plan.to_dict()}  # the data plan it ran

"""Validation: loss and top-1 / top-5 accuracy of a model over a whole validation split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dalikd import distributed
from dalikd.config import DataConfig, build_config
from dalikd.data import scan_dataset
from dalikd.device import autocast, prepare_images, resolve_device, torch_device
from dalikd.models import build_model

if TYPE_CHECKING:
    from dalikd.pipeline import Loader


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Loader,
    device: str,
    precision: str = "auto",
    ctx: distributed.Dist | None = None,
) -> dict[str, float]:
    """Validation loss and top-1 / top-5 accuracy (%) over every image of the loader, summed
    over all ranks when distributed (each rank holds one shard of the split)."""
    model.eval()
    # Sums stay on the device: no CPU-GPU sync until the end.
    # [loss sum, top-1 hits, top-5 hits, images]
    sums = torch.zeros(4, dtype=torch.float64, device=torch_device(device))
    for batch in loader:
        with autocast(device, precision):
            logits = model(prepare_images(batch.images, device)).float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == batch.labels[:, None]
        sums += torch.stack([
            F.cross_entropy(logits, batch.labels, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(len(batch), dtype=torch.float64, device=sums.device),
        ])  # fmt: skip
    loss_sum, top1, top5, count = distributed.all_sum(ctx or distributed.Dist(), sums).tolist()
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "count": int(count),
    }


def evaluate_model(
    data: str,
    model_name: str,
    weights: str,
    *,
    batch_size: int = 100,
    image_size: int = 224,
    threads: int = 0,
    device: str = "auto",
) -> dict[str, float]:
    """Build ``model_name`` with ``weights`` and evaluate it on ``data``/val."""
    # the same checks as training's (a batch of 0 or a 0 px image is one line, not a traceback)
    build_config(
        overrides={"data.batch_size": batch_size, "data.image_size": image_size,
                   "data.threads": threads}
    )  # fmt: skip
    device = resolve_device(device)
    dataset = scan_dataset(data)
    model = build_model(model_name, dataset.num_classes, weights)
    from dalikd import pipeline  # DALI: only where the loader is built

    model.to(torch_device(device))
    data_cfg = DataConfig(path=data, image_size=image_size, batch_size=batch_size, threads=threads)
    return evaluate(model, pipeline.val_loader(dataset.val, data_cfg, device=device), device)

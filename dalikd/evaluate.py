"""Validation: loss and top-1 / top-5 accuracy of a model over a whole validation split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalikd import pipeline
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.device import autocast, prepare_images, resolve_device
from dalikd.models import build_model


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: pipeline.Loader, device: str, precision: str = "auto"
) -> dict[str, float]:
    """Validation loss and top-1 / top-5 accuracy (%) over every image of the loader."""
    model.eval()
    # Sums stay on the device: no CPU-GPU sync until the end.
    loss_sum = torch.zeros((), dtype=torch.float64, device=pipeline.torch_device(device))
    correct = torch.zeros(2, dtype=torch.int64, device=loss_sum.device)
    count = 0
    for batch in loader:
        with autocast(device, precision):
            logits = model(prepare_images(batch.images, device, precision)).float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == batch.labels[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
        count += len(batch)
    return {
        "loss": float(loss_sum) / count,
        "top1": 100.0 * float(correct[0]) / count,
        "top5": 100.0 * float(correct[1]) / count,
        "count": count,
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
    device = resolve_device(device)
    dataset = scan_dataset(data)
    model = build_model(model_name, dataset.num_classes, weights)
    model.to(pipeline.torch_device(device))
    data_cfg = DataConfig(path=data, image_size=image_size, batch_size=batch_size, threads=threads)
    return evaluate(model, pipeline.val_loader(dataset.val, data_cfg, device=device), device)

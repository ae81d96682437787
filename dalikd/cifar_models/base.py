"""What every CIFAR model of the zoo shares: the base class that marks it, the weight
initializations of the reference's families, and the global average pool of its heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CifarModel(nn.Module):
    """A model of the CIFAR zoo: ``forward(images) -> logits``, images float32 NCHW normalized
    with the dataset's mean/std (the zoo's models carry no normalization of their own:
    :func:`dalikd.models.own_norm` is None for them)."""


def init_kaiming_fan_out(model: nn.Module) -> None:
    """The ResNets' init: convolutions Kaiming-normal (fan out, ReLU gain), BatchNorm 1 and 0;
    Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_normal_fan_out(model: nn.Module, linear_std: float | None) -> None:
    """The WRN/VGG/MobileNetV2 init: convolutions N(0, 2 / (k·k·out)) with zero bias,
    BatchNorm 1 and 0; Linear bias 0 and, where ``linear_std`` is given, weight N(0, std)
    (WRN keeps PyTorch's default Linear weight: ``linear_std`` None)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def pool_by_width(x: torch.Tensor) -> torch.Tensor:
    """The reference's head pool: an average over a square window as wide as the map, flattened
    to (N, C). On the square maps of square inputs it is the global average."""
    return F.avg_pool2d(x, x.shape[3]).flatten(1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: channel ``g·(C/groups) + i`` moves to ``i·groups + g``."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

"""The CIFAR ResNets of the reference (``models/resnet.py``): resnet8 ... resnet110 (depth
6n + 2, widths 16/32/64) and the four-times-wider resnet8x4 and resnet32x4 (32 stem,
64/128/256 stages).

A 3×3 stem (conv, BN, ReLU) at full resolution, three stages of n basic blocks (the second
and third start with stride 2), a pool over the whole 8×8 map (at 32 px) and ``fc``. A block
is conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU; the shortcut is a 1×1 conv + BN
(``downsample``) where the stride or the width changes, else the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from dalikd.cifar_models.base import CifarModel, init_kaiming_fan_out, pool_by_width


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class CifarResNet(CifarModel):
    """``depth`` = 6n + 2 layers; ``widths`` = (stem, stage 1, stage 2, stage 3) channels."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n + 2 layers, not {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_ch = [], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = [BasicBlock(in_ch if i == 0 else width, width, stride if i == 0 else 1)
                      for i in range(n)]  # fmt: skip
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[3], num_classes)
        init_kaiming_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(pool_by_width(x))


_NARROW = (16, 16, 32, 64)  # channels: stem, stages 1-3
_WIDE = (32, 64, 128, 256)  # the "x4" models


def variants() -> dict[str, Callable[..., CifarModel]]:
    """Name -> builder taking ``num_classes``, as the reference's ``model_dict`` names them."""
    narrow = {f"resnet{d}": partial(CifarResNet, d, _NARROW) for d in (8, 14, 20, 32, 44, 56, 110)}
    return narrow | {f"resnet{d}x4": partial(CifarResNet, d, _WIDE) for d in (8, 32)}

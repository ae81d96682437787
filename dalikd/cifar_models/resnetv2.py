"""The ImageNet ResNets adapted to CIFAR by the reference (``models/resnetv2.py``): ResNet18,
ResNet34 (basic blocks), ResNet50, ResNet101, ResNet152 (bottlenecks, expansion 4).

Unlike torchvision's, the stem is one 3×3 conv (stride 1) + BN + ReLU with no max pool, so the
four stages (64/128/256/512 wide; strides 1, 2, 2, 2) see 32, 16, 8, 4 px at 32 px input.
Shortcuts are a 1×1 conv + BN (``shortcut``) where the stride or the width changes; the head is
an adaptive average pool to 1×1 and ``linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from dalikd.cifar_models.base import CifarModel, init_kaiming_fan_out


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Empty (the identity, no keys) where shape is kept, else 1×1 conv + BN."""
    if stride == 1 and in_ch == out_ch:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(in_ch, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNetV2(CifarModel):
    """``block`` BasicBlock or Bottleneck; ``counts`` the blocks of the four stages."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], counts: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch, stages = 64, []
        for width, count, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2), strict=True):
            blocks = []
            for i in range(count):
                blocks.append(block(in_ch, width, stride if i == 0 else 1))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        init_kaiming_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def variants() -> dict[str, Callable[..., CifarModel]]:
    """Name -> builder taking ``num_classes``; the reference spells these with capitals."""
    return {
        "ResNet18": partial(ResNetV2, BasicBlock, (2, 2, 2, 2)),
        "ResNet34": partial(ResNetV2, BasicBlock, (3, 4, 6, 3)),
        "ResNet50": partial(ResNetV2, Bottleneck, (3, 4, 6, 3)),
        "ResNet101": partial(ResNetV2, Bottleneck, (3, 4, 23, 3)),
        "ResNet152": partial(ResNetV2, Bottleneck, (3, 8, 36, 3)),
    }

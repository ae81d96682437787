"""The CIFAR ShuffleNetV2 of the reference (``models/ShuffleNetv2.py``): ``ShuffleV2`` (its
net size 1: stages 116/232/464 wide, 1024 before the classifier) and ``ShuffleV2_0_3``
(40/80/160, 512), with 3/7/3 basic units after each stage's down-sampling unit.

A 1×1 stem conv to 24 channels (stride 1, no max pool) + BN + ReLU. A down-sampling unit
concatenates two stride-2 branches (depthwise 3×3 + BN, 1×1 + BN + ReLU; and 1×1 + BN + ReLU,
depthwise 3×3 + BN, 1×1 + BN + ReLU), each half the output wide; a basic unit keeps the first
half of its channels and runs the second through 1×1 + BN + ReLU, depthwise 3×3 + BN,
1×1 + BN + ReLU; both end with a channel shuffle of 2 groups. The head is a 1×1 conv + BN +
ReLU (``conv2``, ``bn2``), a pool over the whole map and ``linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from dalikd.cifar_models.base import CifarModel, channel_shuffle, pool_by_width


def _conv(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, depthwise: bool = False):
    groups = in_ch if depthwise else 1
    return nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)


class BasicUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2  # the reference's int(channels * 0.5)
        self.conv1 = _conv(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _conv(half, half, 3, depthwise=True)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _conv(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, out = x[:, :half], x[:, half:]
        out = torch.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        out = torch.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class DownUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.conv1 = _conv(in_ch, in_ch, 3, 2, depthwise=True)  # left branch
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = _conv(in_ch, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _conv(in_ch, mid)  # right branch
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _conv(mid, mid, 3, 2, depthwise=True)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = torch.relu(self.bn3(self.conv3(x)))
        right = torch.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleV2(CifarModel):
    def __init__(
        self, widths: tuple[int, int, int, int], counts: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = _conv(3, 24)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch, stages = 24, []
        for width, count in zip(widths[:3], counts, strict=True):
            stages.append(nn.Sequential(DownUnit(in_ch, width),
                                        *(BasicUnit(width) for _ in range(count))))  # fmt: skip
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _conv(in_ch, widths[3])
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(pool_by_width(torch.relu(self.bn2(self.conv2(x)))))


def variants() -> dict[str, Callable[..., CifarModel]]:
    """Name -> builder taking ``num_classes``."""
    return {
        "ShuffleV2": partial(CifarShuffleV2, (116, 232, 464, 1024), (3, 7, 3)),
        "ShuffleV2_0_3": partial(CifarShuffleV2, (40, 80, 160, 512), (3, 7, 3)),
    }

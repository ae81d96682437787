"""The wide ResNets of the reference (``models/wrn.py``): wrn_16_1, wrn_16_2, wrn_40_1,
wrn_40_2 and wrn_28_10 (``wrn_DEPTH_WIDEN``; depth 6n + 4).

Pre-activation blocks: BN-ReLU-conv-BN-ReLU-conv, plus the shortcut. Three groups of n blocks
(``block1..3``, each a ``layer`` list) are 16·k, 32·k, 64·k wide after a plain 3×3 stem
conv; the second and third groups start with stride 2. The head is BN-ReLU (``bn1``), a pool
over the whole map and ``fc``. The reference's dropout rate is 0 in every model it names, so
there is none here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from dalikd.cifar_models.base import CifarModel, init_normal_fan_out, pool_by_width


class WideBlock(nn.Module):
    """Where the width changes, the shortcut is a 1×1 conv (``convShortcut``) of the block's
    pre-activated input, not of its raw input (the reference's order, reproduced)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.convShortcut: nn.Module | None = None  # noqa: N815 (the reference's key)
        if in_ch != out_ch:
            self.convShortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(act))))
        return (x if self.convShortcut is None else self.convShortcut(act)) + out


class WideGroup(nn.Module):
    """``n`` blocks; the first changes width and stride (its key prefix is ``layer``)."""

    def __init__(self, n: int, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
              for i in range(n))
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarModel):
    def __init__(self, depth: int, widen: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has 6n + 4 layers, not {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1)
        self.block2 = WideGroup(n, widths[1], widths[2], 2)
        self.block3 = WideGroup(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_normal_fan_out(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(pool_by_width(torch.relu(self.bn1(x))))


def variants() -> dict[str, Callable[..., CifarModel]]:
    """Name -> builder taking ``num_classes``."""
    shapes = ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10))
    return {f"wrn_{d}_{k}": partial(WideResNet, d, k) for d, k in shapes}

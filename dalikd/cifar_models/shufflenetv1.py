"""The CIFAR ShuffleNet (v1) of the reference (``models/ShuffleNetv1.py``): ``ShuffleV1``,
3 groups, stages 240/480/960 wide with 4/8/4 blocks.

A 1×1 stem conv to 24 channels (stride 1) + BN + ReLU; each stage starts with a stride-2
block whose output is its branch concatenated with a 3×3 average pool (stride 2, pad 1) of its
input, the other blocks add their input. A block is a grouped 1×1 conv (ungrouped where the
input is the stem's 24 channels) + BN + ReLU, a channel shuffle, a 3×3 depthwise conv + BN +
ReLU, a grouped 1×1 conv + BN, then ReLU after the concatenation or sum.

The head averages a fixed 4×4 window (the reference's ``avg_pool2d(out, 4)``): the whole last
map at 32 px, which is the only input size the reference's ShuffleV1 runs at; any other size
is refused in one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dalikd.cifar_models.base import CifarModel, channel_shuffle
from dalikd.errors import DalikdError

_STEM = 24


class ShuffleUnit(nn.Module):
    """``out_ch`` is the branch's width: a stride-2 unit's output is ``out_ch + in_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_ch // 4
        self.first_groups = 1 if in_ch == _STEM else groups
        self.conv1 = nn.Conv2d(in_ch, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return torch.relu(out + x)


class CifarShuffleV1(CifarModel):
    def __init__(
        self, widths: tuple[int, ...], counts: tuple[int, ...], groups: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM)
        in_ch, stages = _STEM, []
        for width, count in zip(widths, counts, strict=True):
            units = []
            for i in range(count):  # the first unit concatenates its input: a narrower branch
                units.append(ShuffleUnit(in_ch, width - in_ch if i == 0 else width,
                                         2 if i == 0 else 1, groups))  # fmt: skip
                in_ch = width
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        if x.shape[2:] != (4, 4):
            raise DalikdError(
                f"cifar:ShuffleV1 takes 32×32 images: its head pools a fixed 4×4 window, as the "
                f"reference's, but its last map is {x.shape[2]}×{x.shape[3]} for "
                f"{size[0]}×{size[1]} images"
            )
        return self.linear(torch.flatten(F.avg_pool2d(x, 4), 1))


def variants() -> dict[str, Callable[..., CifarModel]]:
    """Name -> builder taking ``num_classes``."""
    return {"ShuffleV1": partial(CifarShuffleV1, (240, 480, 960), (4, 8, 4), 3)}

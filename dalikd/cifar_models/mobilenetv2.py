"""The CIFAR MobileNetV2 of the reference (``models/mobilenetv2.py``, from RCO's code):
``MobileNetV2`` is its ``mobile_half`` (expansion 6, width 0.5) and ``MobileNetV2_0_25`` its
``mobile_0_25`` (width 0.25).

A stride-2 3×3 stem (``conv1``: conv, BN, ReLU), seven groups of inverted residuals
(``blocks``; each block's ``conv`` is 1×1 expand, BN, ReLU, 3×3 depthwise, BN, ReLU, 1×1
project, BN, with the input added where stride is 1 and the width is kept), a 1×1 conv to
1280 channels (``conv2``: conv, BN, ReLU; 1280 for every width ≤ 1), an average pool and
``classifier`` (one Linear in a list). At 32 px the last map is 2×2.

The reference sizes its pool at build time from the image size it is told (a window of
``img_size // 16``), which is the last map's size whenever the input is that size. Here the
window is the last map's size for any input: the same numbers at 32 px, and at 64 px as the
reference built for 64 (its Tiny-ImageNet students).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from dalikd.cifar_models.base import CifarModel, init_normal_fan_out, pool_by_width

# (channels at width 1, blocks, first block's stride) per group; the first group expands its
# input ×1, the others by the model's expansion.
_SETTING = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
_LAST = 1280  # the reference keeps 1280 channels for widths up to 1


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    pad = kernel // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, pad, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, 1, 0, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(CifarModel):
    def __init__(self, expansion: int, width: float, num_classes: int) -> None:
        super().__init__()
        in_ch = int(32 * width)
        self.conv1 = _conv_bn_relu(3, in_ch, 3, 2)
        self.blocks = nn.ModuleList()
        for g, (channels, n, stride) in enumerate(_SETTING):
            out_ch, t = int(channels * width), expansion if g else 1
            group = []
            for i in range(n):
                group.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, t))
                in_ch = out_ch
            self.blocks.append(nn.Sequential(*group))
        self.conv2 = _conv_bn_relu(in_ch, _LAST, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(_LAST, num_classes))
        init_normal_fan_out(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(pool_by_width(x))


def variants() -> dict[str, Callable[..., CifarModel]]:
    """Name -> builder taking ``num_classes``."""
    return {
        "MobileNetV2": partial(CifarMobileNetV2, 6, 0.5),
        "MobileNetV2_0_25": partial(CifarMobileNetV2, 6, 0.25),
    }

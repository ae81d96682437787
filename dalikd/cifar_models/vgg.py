"""The CIFAR VGGs of the reference (``models/vgg.py``, the ``*_bn`` builders, which its
``model_dict`` names vgg8, vgg11, vgg13, vgg16, vgg19): every conv has a bias and is followed by
BN; no fully connected layers but the classifier.

Five conv groups (``block0..4``; 64, 128, 256, 512, 512 wide), each a list conv, BN, ReLU,
conv, BN, ... whose last ReLU is left out of the list and applied after it. Between groups a
2×2 max pool, except between the fourth and the fifth, which is pooled only when the input is
64 px high (the reference's test of ``h == 64``, for Tiny-ImageNet); at 32 px the last two
groups run at 4×4. The head is an adaptive average pool to 1×1 and ``classifier``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dalikd.cifar_models.base import CifarModel, init_normal_fan_out

# The convs' widths per group, after the reference's configurations S, A, B, D, E.
_GROUPS = (
    ("vgg8", ((64,), (128,), (256,), (512,), (512,))),
    ("vgg11", ((64,), (128,), (256, 256), (512, 512), (512, 512))),
    ("vgg13", ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))),
    ("vgg16", ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))),
    ("vgg19", ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)),
)


def _group(in_ch: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv(bias)-BN-ReLU per width, without the last ReLU: keys 0 (conv), 1 (BN), 3, 4, ..."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_ch = width
    return nn.Sequential(*layers[:-1])


class CifarVGG(CifarModel):
    def __init__(self, groups: tuple[tuple[int, ...], ...], num_classes: int) -> None:
        super().__init__()
        ins = (3,) + tuple(g[-1] for g in groups[:-1])
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _group(i, g) for i, g in zip(ins, groups, strict=True)
        )
        self.classifier = nn.Linear(groups[-1][-1], num_classes)
        init_normal_fan_out(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool_before_last = x.shape[2] == 64
        x = F.max_pool2d(torch.relu(self.block0(x)), 2)
        x = F.max_pool2d(torch.relu(self.block1(x)), 2)
        x = F.max_pool2d(torch.relu(self.block2(x)), 2)
        x = torch.relu(self.block3(x))
        if pool_before_last:
            x = F.max_pool2d(x, 2)
        x = torch.relu(self.block4(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def variants() -> dict[str, Callable[..., CifarModel]]:
    """Name -> builder taking ``num_classes`` (all with BN, as the paper's)."""
    return {name: partial(CifarVGG, groups) for name, groups in _GROUPS}

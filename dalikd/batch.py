"""The hand-off from the data pipeline to the model: :class:`Batch`, and :func:`normalize`.

DALI hands images over as they come out of the augmentations, uint8 HWC, and torch normalizes
them on the training device. That moves a quarter of the bytes of a float32 hand-off (the DALI
output copy, the iterator's copy into torch, a pool's view-major concatenation), and the
normalization runs where the model runs: on a GPU it is one cheap elementwise pass per batch,
and the mixing schemes' extra views cost the data pipeline only their pixel work.

No DALI import here: the model side (training step, pick, metrics) runs without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # RGB, 0-255 scale
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class InputNorm(NamedTuple):
    """A model's input normalization: ``(x - mean) / std`` per RGB channel, 0-255 scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_NORM = InputNorm(IMAGENET_MEAN, IMAGENET_STD)  # torchvision's models, most of timm's


def data_norm(mean: tuple[float, ...], std: tuple[float, ...]) -> InputNorm | None:
    """The data's normalization (``DataConfig.mean`` / ``std``, RGB, 0-255 scale); None where
    the data sets none (each model keeps its own)."""
    return InputNorm(tuple(mean), tuple(std)) if mean else None  # type: ignore[arg-type]


@dataclass
class Batch:
    """One training or validation batch as torch tensors on the training device.

    Images are uint8 NHWC as DALI makes them; :func:`normalize` (through
    :func:`dalikd.device.prepare_images`) turns them into the model's float NCHW input.
    """

    images: torch.Tensor  # x: [B, S, S, 3] uint8 RGB
    labels: torch.Tensor  # [B] int64 class indices
    aug_images: torch.Tensor | None = None  # x': like images; None for plain KD
    lam: torch.Tensor | None = None  # [B] float32, fraction of own pixels in x' (mixing only)
    perm: torch.Tensor | None = None  # [B] int64, partner index of each x' (mixing only)
    # A candidate pool of k = pool_size views per image: aug_images, lam and perm hold k·B rows,
    # view-major (row j·B + i is view j of image i; perm still indexes images). 1: no pool.
    pool_size: int = 1
    # [B] int64 on CPU: each sample's position in the loader's file list, where the loader was
    # asked for it (training's recovery finds the files a failed batch held by it)
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]


def normalize(
    images: torch.Tensor, channels_last: bool = False, norm: InputNorm = IMAGENET_NORM
) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W]: ``(x - mean) / std`` with ``norm``'s
    mean/std (0-255 scale; the ImageNet ones by default), computed as
    ``x * (1 / std) + (-mean / std)`` in one pass (within a float32 rounding or two of the
    subtract-then-divide form).

    One pass: the uint8 -> float conversion, the transposition and the scale-and-shift in a
    single elementwise operation. ``channels_last``: the result is NCHW with NHWC memory, the
    input's own order, so nothing is transposed at all (the layout convolutions on a GPU
    prefer); otherwise it is contiguous NCHW.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    nchw = images.permute(0, 3, 1, 2)  # a view: NCHW indices over NHWC memory
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(nchw.shape, dtype=torch.float32, device=images.device, memory_format=fmt)
    scale, shift = _scale_shift(images.device, norm)
    return torch.addcmul(shift, nchw, scale, out=out)


@functools.lru_cache(maxsize=16)
def _scale_shift(device: torch.device, norm: InputNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / std, -mean / std), each [1, 3, 1, 1] float32 on ``device``, made once per device
    and normalization (no host-to-device copy per batch): a memo of a pure function."""
    mean = torch.tensor(norm.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float64).view(1, 3, 1, 1)
    return (1 / std).float().to(device), (-mean / std).float().to(device)

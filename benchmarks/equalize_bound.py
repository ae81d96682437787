"""How far AutoAugment's Equalize in dalikd (DALI's ``fn.equalize``: OpenCV's formula) is from
torchvision's (PIL's formula, what the reference's AutoAugment runs), in grey levels, on real
photographs at 224 px (and the CIFAR / Tiny-ImageNet sides for comparison).

The photos are scikit-image's colour and grey sample images (no download), resized with
antialiasing to the side, whole and as random windows (a random-resized crop's: 8-100% of the
area, aspect 3/4-4/3, as training's x is made); both equalize every channel of the same uint8
images. Printed per side: the largest difference of any channel value, the mean over every
value, the share of values that differ at all, and the 99th percentile of the per-image maxima.

    python benchmarks/equalize_bound.py
    python benchmarks/equalize_bound.py --sides 224
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from nvidia.dali import fn, pipeline_def

# scikit-image's sample images that ship with it (no pooch download); grey ones repeat to RGB
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "coins", "camera",
          "moon", "page", "text", "horse", "clock", "grass", "gravel", "brick")  # fmt: skip


def photos(side: int, windows: int = 0, seed: int = 0) -> np.ndarray:
    """The photos at side², whole (``windows`` 0) or ``windows`` random windows of each."""
    import skimage.data

    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        try:
            array = np.atleast_3d(np.asarray(getattr(skimage.data, name)(), dtype=np.uint8))
        except Exception:  # a sample that needs a download, or another dtype
            continue
        array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        for box in _windows(rng, image.shape[1], image.shape[2], windows):
            top, left, h, w = box
            crop = image[:, top : top + h, left : left + w]
            resized = F.resize(crop, [side, side], antialias=True).permute(1, 2, 0)
            out.append(np.ascontiguousarray(resized.numpy()))
    return np.stack(out)


def _windows(rng, height: int, width: int, count: int) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w): the whole image for ``count`` 0, else random-resized-crop windows."""
    if not count:
        return [(0, 0, height, width)]
    boxes = []
    while len(boxes) < count:
        area = height * width * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            boxes.append(
                (int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w)
            )
    return boxes


def dali_equalize(images: np.ndarray) -> np.ndarray:
    batch = list(images)

    @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None)
    def graph():
        return fn.equalize(fn.external_source(source=lambda: batch, batch=True, layout="HWC"))

    pipe = graph()
    pipe.build()
    return pipe.run()[0].as_array()


def torchvision_equalize(images: np.ndarray) -> np.ndarray:
    out = F.equalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="32,64,224", help="image sides in px")
    parser.add_argument("--windows", type=int, default=40, help="random windows per photo")
    args = parser.parse_args()
    for side in (int(s) for s in args.sides.split(",")):
        for windows in (0, args.windows):
            images = photos(side, windows)
            ours, theirs = dali_equalize(images), torchvision_equalize(images)
            diff = np.abs(ours.astype(int) - theirs.astype(int))
            per_image = diff.reshape(len(images), -1).max(axis=1)
            what = "whole photos" if not windows else f"random windows ({windows} a photo)"
            p99 = np.percentile(per_image, 99)
            print(f"{side:>4} px, {len(images):>4} {what}: max {diff.max()} grey levels, mean "
                  f"{diff.mean():.2f}, {100 * (diff > 0).mean():.1f}% of values differ, 99th "
                  f"percentile of the per-image maxima {p99:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()

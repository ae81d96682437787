"""torchvision's AutoAugment policies (IMAGENET, CIFAR10, SVHN) as DALI graphs.

The paper's reference code makes x' with ``torchvision.transforms.AutoAugment`` (IMAGENET policy
for ImageNet / Tiny-ImageNet, CIFAR10 for CIFAR; docs/method.md). DALI's own
``auto_aug.auto_augment`` policies are different tables with different magnitude ranges, so
this module rebuilds torchvision's: :data:`POLICIES` holds the tables as data (torchvision's op
names, probabilities and magnitude bins), :func:`augmentations` the 14 ops as DALI
``@augmentation`` functions with torchvision's magnitude ranges, and :func:`autoaugment` applies
a policy per sample or per batch.

Every op takes and returns uint8 HWC images (square, ``image_size`` px) on CPU or GPU.
Magnitudes follow torchvision (10 bins; signed ops negated with p = 0.5): translation up to
150/331 of the side (truncated to whole px), shear up to 0.3, rotation up to 30 degrees,
enhancements 1 ± 0.9, posterize 8..4 bits, solarize threshold 255..0. Geometric ops sample the
nearest pixel and fill with 0 (torchvision's defaults: ``interpolation=NEAREST``,
``fill=None``, which grid_sample pads with zeros).

Where the pixels match torchvision.transforms.v2.functional (tests/test_autoaugment.py):
exactly for invert, posterize, solarize, brightness, translate, autocontrast; within 1 grey
level for color, contrast and sharpness (float32 sums in another order before a truncation);
shear and rotate match but for nearest-pixel ties (a source point exactly between two
pixels rounds the other way). Equalize is DALI's (OpenCV's formula), not torchvision's
(PIL's): DALI has no per-sample lookup table to build PIL's, so its output differs by a few
grey levels (the test states the bound).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, types
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert

from dalikd import ops
from dalikd.recipes import Seeds

DataNode = Any

NUM_BINS = 10  # torchvision's AutoAugment magnitude bins

# Sub-policies as torchvision's AutoAugment lists them: two (op, probability, magnitude bin)
# stages each; bin None for ops without a magnitude. Source: torchvision 0.29
# transforms/v2/_auto_augment.py, AutoAugment._get_policies (a test compares them).
POLICIES: dict[str, list[tuple[tuple[str, float, int | None], ...]]] = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ],
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ],
    "svhn": [
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ],
}


def _bins(stop: float, start: float = 0.0) -> np.ndarray:
    """torchvision's magnitudes: float32 linspace over NUM_BINS, read back as Python floats."""
    return torch.linspace(start, stop, NUM_BINS).double().numpy()


# -- geometric ops: nearest pixel, fill 0, a 2x3 output->input matrix in DALI's coordinates
# (x right, y down, pixel (i, j) covers [j, j+1) x [i, i+1)), computed in float64 per bin.


def _warp(data: DataNode, matrix: DataNode) -> DataNode:
    return fn.warp_affine(
        data,
        matrix=matrix,
        fill_value=0,
        interp_type=types.INTERP_NN,
        inverse_map=True,  # the matrix maps output coordinates to input coordinates
    )


def _shear_x_matrix(m: float) -> np.ndarray:
    # torchvision shears by atan(m) about the top-left corner: output (x, y) reads (x + m·y, y)
    return np.array([[1.0, m, 0.0], [0.0, 1.0, 0.0]], np.float32)


def _shear_y_matrix(m: float) -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [m, 1.0, 0.0]], np.float32)


def _translate_x_matrix(t: float) -> np.ndarray:
    # torchvision passes int(magnitude): whole pixels, truncated toward zero
    return np.array([[1.0, 0.0, -float(int(t))], [0.0, 1.0, 0.0]], np.float32)


def _translate_y_matrix(t: float) -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -float(int(t))]], np.float32)


def _rotate_matrix(degrees: float, side: int) -> np.ndarray:
    # counter-clockwise on screen (torchvision's sign) about the image centre (side/2, side/2)
    a = math.radians(degrees)
    c, s, h = math.cos(a), math.sin(a), side / 2.0
    return np.array([[c, -s, h - c * h + s * h], [s, c, h - s * h - c * h]], np.float32)


# -- colour ops: float32 arithmetic in torchvision's order, truncated back to uint8


def _to_uint8(x: DataNode) -> DataNode:
    """float -> uint8 as torch's ``.clamp_(0, 255).to(uint8)``: clamp, then truncate."""
    return fn.cast(dmath.floor(dmath.clamp(x, 0.0, 255.0)), dtype=types.UINT8)


def _grey_floor(data: DataNode) -> DataNode:
    """torchvision's luma (0.2989 R + 0.587 G + 0.114 B), floored, float32 HW1."""
    f = fn.cast(data, dtype=types.FLOAT)
    r, g, b = (f[:, :, i : i + 1] for i in range(3))
    return dmath.floor(r * np.float32(0.2989) + g * np.float32(0.587) + b * np.float32(0.114))


def _blend(data: DataNode, other: DataNode, factor: DataNode) -> DataNode:
    return _to_uint8(fn.cast(data, dtype=types.FLOAT) * factor + other * (1.0 - factor))


def _one_plus(m: float) -> np.float32:
    return np.float32(1.0 + m)


def _sharpness_mask(side: int) -> np.ndarray:
    mask = np.zeros((side, side, 1), np.float32)
    mask[1:-1, 1:-1] = 1.0  # torchvision leaves the 1-px border as it was
    return mask


# Called inside a pipeline with conditionals, AutoGraph tries to convert this builder, fails on
# its lambdas and prints a warning (train, tstddev, preview), then runs it as-is. It holds no
# DataNode conditional of its own: marked, it runs as-is as before, without the warning.
@do_not_convert
def augmentations(image_size: int) -> dict[str, Any]:
    """torchvision op name -> DALI augmentation with torchvision's magnitudes for images of
    ``image_size`` px (translation is relative to the side)."""
    return {**_geometric(image_size), **_photometric(image_size), **_tonal()}


@do_not_convert
def _geometric(side: int) -> dict[str, Any]:
    """ShearX/Y, TranslateX/Y (relative to the side), Rotate: one affine warp each."""
    shift = 150.0 / 331.0 * side  # px at full magnitude

    @augmentation(mag_range=_bins(0.3), randomly_negate=True, mag_to_param=_shear_x_matrix)
    def shear_x(data, matrix):
        return _warp(data, matrix)

    @augmentation(mag_range=_bins(0.3), randomly_negate=True, mag_to_param=_shear_y_matrix)
    def shear_y(data, matrix):
        return _warp(data, matrix)

    @augmentation(mag_range=_bins(shift), randomly_negate=True, mag_to_param=_translate_x_matrix)
    def translate_x(data, matrix):
        return _warp(data, matrix)

    @augmentation(mag_range=_bins(shift), randomly_negate=True, mag_to_param=_translate_y_matrix)
    def translate_y(data, matrix):
        return _warp(data, matrix)

    @augmentation(
        mag_range=_bins(30.0), randomly_negate=True, mag_to_param=lambda d: _rotate_matrix(d, side)
    )
    def rotate(data, matrix):
        return _warp(data, matrix)

    return {"ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
            "TranslateY": translate_y, "Rotate": rotate}  # fmt: skip


@do_not_convert
def _photometric(side: int) -> dict[str, Any]:
    """Brightness, Color, Contrast, Sharpness: PIL's ImageEnhance blends with 1 ± magnitude."""
    enhance = dict(
        mag_range=_bins(0.9), randomly_negate=True, mag_to_param=_one_plus, param_device="auto"
    )

    @augmentation(**enhance)
    def brightness(data, factor):
        return _to_uint8(fn.cast(data, dtype=types.FLOAT) * factor)

    @augmentation(**enhance)
    def color(data, factor):
        return _blend(data, _grey_floor(data), factor)

    @augmentation(**enhance)
    def contrast(data, factor):
        mean = fn.reductions.mean(_grey_floor(data), axis_names="HWC", keep_dims=True)
        return _blend(data, mean, factor)

    @augmentation(**enhance)
    def sharpness(data, factor):
        f = fn.cast(data, dtype=types.FLOAT)
        kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13)
        blurred = dmath.floor(fn.filter(f, kernel) + 0.5)  # torch rounds the blur
        mask = types.Constant(_sharpness_mask(side), device=data.device)
        return _to_uint8(f + (blurred - f) * (1.0 - factor) * mask)

    return {"Brightness": brightness, "Color": color, "Contrast": contrast,
            "Sharpness": sharpness}  # fmt: skip


@do_not_convert
def _tonal() -> dict[str, Any]:
    """Posterize, Solarize, AutoContrast, Equalize, Invert and Identity: per-pixel tone maps."""
    bits = (8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))).round().int().numpy()

    def keep_mask(b: float) -> np.uint8:
        b = int(b)
        return np.uint8(((1 << b) - 1) << (8 - b))

    @augmentation(mag_range=bits.astype(np.float64), mag_to_param=keep_mask, param_device="auto")
    def posterize(data, mask):
        return data & mask

    @augmentation(
        mag_range=_bins(0.0, start=1.0),
        mag_to_param=lambda m: np.float32(255.0 * m),
        param_device="auto",
    )
    def solarize(data, threshold):
        inverted = data >= threshold
        return fn.cast(inverted * (255 - data) + (inverted ^ True) * data, dtype=types.UINT8)

    @augmentation
    def auto_contrast(data, _):
        lo = fn.cast(fn.reductions.min(data, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
        hi = fn.cast(fn.reductions.max(data, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
        flat = hi == lo  # torchvision leaves such a channel as it is
        inv_scale = (hi - lo) * np.float32(1.0 / 255.0) + flat
        lo = lo * (flat ^ True)
        return _to_uint8((fn.cast(data, dtype=types.FLOAT) - lo) / inv_scale)

    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation
    def invert(data, _):
        return types.Constant(255, dtype=types.UINT8) - data

    @augmentation
    def identity(data, _):
        return data

    return {"Posterize": posterize, "Solarize": solarize, "AutoContrast": auto_contrast,
            "Equalize": equalize, "Invert": invert, "Identity": identity}  # fmt: skip


def autoaugment(
    images: DataNode,
    policy: str,
    image_size: int,
    granularity: str = "sample",
    *,
    sub_policy: DataNode | None = None,
    run: DataNode | None = None,
    sign: DataNode | None = None,
    seeds: Seeds | None = None,
) -> DataNode:
    """torchvision's AutoAugment ``policy`` ("imagenet" | "cifar10" | "svhn") on uint8 HWC
    images (``image_size`` px square, CPU or GPU). Needs ``enable_conditionals=True``.

    Draws, as torchvision's forward makes them: ``sub_policy`` int32 per sample (uniform over
    the 25), ``run`` float32 (2,) per sample (stage s runs when run[s] <= its probability),
    ``sign`` int32 (2,) per sample (1 negates stage s's magnitude). "batch" shares all three
    over the batch, as the reference code's one AutoAugment call per batch tensor does.
    ``seeds``: where the draws take their seeds (:mod:`dalikd.ops`; a recipe passes ctx.seeds).
    """
    if policy not in POLICIES:
        raise ValueError(f"AutoAugment policy '{policy}'; known: {', '.join(POLICIES)}")
    ops._check(granularity)
    table = POLICIES[policy]
    seed = ops.seed
    if sub_policy is None:
        draw = fn.random.uniform(values=list(range(len(table))), dtype=types.INT32, **seed(seeds))
        sub_policy = ops._per(granularity, draw, seeds=seeds)
    if run is None:
        draw = fn.random.uniform(range=[0.0, 1.0], shape=[2], dtype=types.FLOAT, **seed(seeds))
        run = ops._per(granularity, draw, seeds=seeds)
    if sign is None:
        draw = fn.random.coin_flip(probability=0.5, shape=[2], dtype=types.INT32, **seed(seeds))
        sign = ops._per(granularity, draw, seeds=seeds)

    augs = augmentations(image_size)
    # per stage: the distinct ops used there (identity last), and each sub-policy's index
    stage_ops = [list(dict.fromkeys(sp[s][0] for sp in table)) + ["Identity"] for s in range(2)]
    op_index = np.array(
        [[stage_ops[s].index(sp[s][0]) for s in range(2)] for sp in table], np.int32
    )
    probability = np.array([[st[1] for st in sp] for sp in table], np.float32)
    magnitude_bin = np.array([[st[2] or 0 for st in sp] for sp in table], np.int32)

    chosen_ops = types.Constant(op_index)[sub_policy]
    chosen_p = types.Constant(probability)[sub_policy]
    bins = signed_bin(types.Constant(magnitude_bin)[sub_policy], random_sign=sign)
    for stage in range(2):
        if run[stage] <= chosen_p[stage]:
            images = select(
                [augs[name] for name in stage_ops[stage]],
                chosen_ops[stage],
                images,
                magnitude_bin=bins[stage],
                num_magnitude_bins=NUM_BINS,
            )
    return images

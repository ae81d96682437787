"""Augmentation operators as DALI graph functions: DataNode in, DataNode(s) out.

Every operator takes ``images``: uint8, layout HWC, square (side ``image_size`` px), on CPU or
GPU; the same code serves both devices. Random draws are CPU nodes (DALI's random operators,
``fn.batch_permutation`` and ``fn.random.beta`` exist only on CPU) and enter as keyword
arguments; left as ``None`` they are drawn here, passed in they let a test inject known values.
Injected values are used as given, whatever the granularity.

Every draw made here takes its seed from ``seeds`` (:class:`dalikd.recipes.Seeds`, which the
graph builder hands in: a recipe passes ``ctx.seeds``), the next of its sequence, not from
DALI's automatic seeding, which follows the order the pipeline happens to visit its operators
in. So two graphs that make the same draws in the same order draw the same values however their
pixel work is wired: the fused operator, which takes every draw as an argument, and the composed
graph. Without ``seeds`` DALI seeds the draws itself (reproducible for a pipeline seed, but not
the same on both paths).

``granularity``: "sample" draws per image (timm's "elem" mode); "batch" makes one draw for the
whole batch, as the paper's reference code does. Mixing always pairs samples with a per-batch
permutation; "batch" shares λ and the box, not the partner.

Per-image operators return images; mixing operators return ``(images, lam, perm)`` with ``lam``
float32 per sample (fraction of the sample's own pixels) and ``perm`` int32 per sample (index of
the partner in the batch). ``perm`` is a CPU node; ``lam`` is a CPU node, except from the native
operator on GPU, whose λ output lives on the GPU.

Mixing's pixel work runs through dalikd's own DALI operator ``fn.dalikd_mix`` (one pass for all
candidates; :mod:`dalikd.native`) with ``native=True`` (a recipe passes ``ctx.native``, the data
plan's resolved path), else through stock operators (``permute_batch`` + ``multi_paste`` /
arithmetic). Both paths make the same draws with the same explicit seeds (above), so they give
bit-identical results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from dalikd.config import Granularity, choices
from dalikd.recipes import Seeds

GRANULARITIES = choices(Granularity)  # "sample": a draw per image | "batch": one per batch

DataNode = Any  # nvidia.dali DataNode; DALI does not export a stable public type for it


def _check(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity '{granularity}'; known: {', '.join(GRANULARITIES)}")


def seed(seeds: Seeds | None) -> dict[str, int]:
    """The keyword arguments that seed the next draw: ``{"seed": s}`` from ``seeds``, or ``{}``
    (DALI's automatic seed) without them."""
    return seeds() if seeds is not None else {}


def _per(
    granularity: str, value: DataNode, perm: DataNode | None = None, seeds: Seeds | None = None
) -> DataNode:
    """``value`` drawn per sample, or sample 0's value copied to the whole batch ("batch").

    permute_batch with all-zero indices is the batch-shared trick: it works for any batch size,
    including a partial last batch. ``perm`` is any int32 per-sample node to derive them from.
    """
    if granularity == "sample":
        return value
    zeros = (fn.batch_permutation(**seed(seeds)) if perm is None else perm) * 0
    return fn.permute_batch(value, indices=zeros)


def partner_permutation(seeds: Seeds | None = None) -> DataNode:
    """int32 per sample: a random permutation of the batch with no fixed points (i -> perm[i],
    never i itself). CPU. With a batch of 1 DALI returns [0]: the sample is its own partner."""
    return fn.batch_permutation(no_fixed_points=True, **seed(seeds))


def flip(
    images: DataNode,
    granularity: str = "sample",
    *,
    coin: DataNode | None = None,
    seeds: Seeds | None = None,
) -> DataNode:
    """Horizontal flip with p = 0.5. ``coin``: int32 per sample on CPU, 1 = mirror."""
    _check(granularity)
    if coin is None:
        draw = fn.random.coin_flip(probability=0.5, dtype=types.INT32, **seed(seeds))
        coin = _per(granularity, draw, seeds=seeds)
    return fn.flip(images, horizontal=coin)


def crop_flip(
    images: DataNode,
    image_size: int,
    *,
    pad: int,
    granularity: str = "sample",
    offset: DataNode | None = None,
    coin: DataNode | None = None,
    seeds: Seeds | None = None,
) -> DataNode:
    """Pad-and-random-crop then flip, as torchvision's RandomCrop(size, padding=pad) +
    RandomHorizontalFlip: the image is zero-padded by ``pad`` px on every side and an
    image_size² window is cut at a top-left corner uniform over the (2·pad + 1)² integer offsets.

    ``offset``: int32 (2,) per sample on CPU, (y, x) of that corner in the padded image, each in
    [0, 2·pad]. The padding is never materialized: ``fn.slice`` reads the window straight from
    the image, starting at offset − pad, and fills what falls outside with zeros.
    """
    _check(granularity)
    if offset is None:
        draw = fn.random.choice(2 * pad + 1, shape=[2], **seed(seeds))
        offset = _per(granularity, draw, seeds=seeds)
    window = fn.slice(
        images,
        start=offset - pad,
        shape=[image_size, image_size],
        axis_names="HW",
        out_of_bounds_policy="pad",
        fill_values=0,
    )
    return flip(window, granularity, coin=coin, seeds=seeds)


def cutout(
    images: DataNode,
    image_size: int,
    *,
    hole: int,
    fill: Sequence[float],
    granularity: str = "sample",
    centre: DataNode | None = None,
    seeds: Seeds | None = None,
) -> DataNode:
    """One square hole of side ``hole`` px, filled with ``fill`` (RGB, rounded to integers).

    ``centre``: int32 (2,) per sample on CPU, (y, x), each uniform in [0, image_size). The hole
    covers rows centre_y − hole//2 .. centre_y − hole//2 + hole − 1 (columns alike), clipped to
    the image, so near a border it is smaller (DeVries & Taylor's Cutout). ``fn.erase`` clips
    boxes that stick out, so no extra clamping is needed.
    """
    _check(granularity)
    if centre is None:
        draw = fn.random.choice(image_size, shape=[2], **seed(seeds))
        centre = _per(granularity, draw, seeds=seeds)
    anchor = fn.cast(centre - hole // 2, dtype=types.FLOAT)  # erase takes float coordinates
    return fn.erase(
        images,
        anchor=anchor,
        shape=[float(hole), float(hole)],
        axis_names="HW",
        fill_value=[float(round(v)) for v in fill],
    )


def _partner_and_lam(
    alpha: float, granularity: str, perm: DataNode | None, lam: DataNode | None, seeds: Seeds | None
) -> tuple[DataNode, DataNode]:
    """The draws every mixing scheme starts with, in this order: the partner permutation, then
    λ ~ Beta(α, α) per sample or per batch. Injected values are used as given."""
    _check(granularity)
    if perm is None:
        perm = partner_permutation(seeds)
    if lam is None:
        lam = _per(granularity, fn.random.beta(alpha=alpha, beta=alpha, **seed(seeds)), perm)
    return perm, lam


def mixup(
    images: DataNode,
    *,
    alpha: float = 1.0,
    granularity: str = "sample",
    lam: DataNode | None = None,
    perm: DataNode | None = None,
    native: bool = False,
    seeds: Seeds | None = None,
) -> tuple[DataNode, DataNode, DataNode]:
    """x' = λ·x + (1 − λ)·x[perm], λ ~ Beta(α, α). Returns ``(images, lam, perm)``.

    ``lam``: float32 per sample on CPU; ``perm``: int32 per sample on CPU (default: a random
    permutation without fixed points, so no sample is mixed with itself).
    Arithmetic is float32 in exactly this order: ``v = x·λ + x[perm]·(1 − λ)``, then rounded half
    up, ``floor(v + 0.5)``, and cast to uint8. Rounding before the cast keeps the result free of
    how each device's cast treats halves (DALI's CPU cast gives 2.5 -> 3; GPU unchecked), and
    halves are common: λ = 0.5 with x + x[perm] odd.
    ``native``: the pixel work through dalikd's fused operator (True) or the stock operators
    (False); the results are identical. ``seeds``: see the module docstring.
    """
    perm, lam = _partner_and_lam(alpha, granularity, perm, lam, seeds)
    if _native(images, native):
        out = fn.dalikd_mix(images, mode="mixup", lam=lam, perm=perm)
        return out[0], out[1], perm  # the operator's λ: on the images' device
    partner = fn.permute_batch(images, indices=perm)
    mixed = images * lam + partner * (1 - lam)  # DALI promotes uint8 -> float32 itself
    return fn.cast(dmath.floor(mixed + 0.5), dtype=types.UINT8), lam, perm


def cutmix_box(lam: DataNode, centre: DataNode, image_size: int) -> tuple[DataNode, DataNode]:
    """The CutMix box of Yun et al.'s reference code, as int32 per-sample CPU nodes.

    cut = floor(S·√(1 − λ)) (float32), half = cut // 2; the box spans [c − half, c + half) on each
    axis, clipped to [0, S). Returns ``(anchor, shape)``, each (2,) = (y, x) / (h, w).
    """
    s = image_size
    half = fn.cast(dmath.floor(s * dmath.sqrt(1 - lam)), dtype=types.INT32) // 2
    cy, cx = centre[0], centre[1]
    y0, x0 = dmath.clamp(cy - half, 0, s), dmath.clamp(cx - half, 0, s)
    y1, x1 = dmath.clamp(cy + half, 0, s), dmath.clamp(cx + half, 0, s)
    return fn.stack(y0, x0), fn.stack(y1 - y0, x1 - x0)


def cutmix_draws(
    image_size: int,
    *,
    alpha: float = 1.0,
    granularity: str = "sample",
    lam: DataNode | None = None,
    perm: DataNode | None = None,
    centre: DataNode | None = None,
    seeds: Seeds | None = None,
) -> tuple[DataNode, DataNode, DataNode]:
    """One CutMix draw (CPU): ``(perm, lam, centre)``; the box follows by :func:`cutmix_box`.

    λ ~ Beta(α, α) and the box centre, (2,) = (y, x) uniform in [0, image_size), per sample or
    per batch; ``perm`` as in :func:`mixup`. Injected values are used as given.
    """
    perm, lam = _partner_and_lam(alpha, granularity, perm, lam, seeds)
    if centre is None:
        centre = _per(granularity, fn.random.choice(image_size, shape=[2], **seed(seeds)), perm)
    return perm, lam, centre


def _box_lam(shape: DataNode, image_size: int) -> DataNode:
    """1 − h·w / S², float32: the fraction of own pixels left by the (clipped) box."""
    return 1.0 - fn.cast(shape[0] * shape[1], dtype=types.FLOAT) / float(image_size * image_size)


def paste_regions(lam: DataNode, centre: DataNode, image_size: int) -> tuple[DataNode, ...]:
    """The two ``fn.multi_paste`` regions of a composed CutMix, each (2 regions, 2) int32:
    ``(anchors, shapes)``, region 0 the whole own image at (0, 0), region 1 the box
    (:func:`cutmix_box`) at its anchor; and the box's shape.

    An empty box (half = 0, when S·√(1 − λ) < 2) is anchored at (S, S). DALI 2.4's GPU
    multi_paste cuts the output into patches at every region's edges and sweeps them row by row
    (``paste_gpu.h``, ``CreateSampleDescriptors``); a region of zero size opens at its anchor and
    is never closed: it covers the rest of the anchor's patch row from the anchor's column to the
    right edge, and every patch row below at full width, over the regions before it. Here the
    only patch row from the anchor down is [y, S) (the other region is the whole image), so an
    empty box anchored inside the image would paste the partner over [y, S) x [x, S) while λ
    says 1. At (S, S) the sweep never reaches it; the CPU paste gives the same image for either
    anchor.
    """
    s = image_size
    anchor, shape = cutmix_box(lam, centre, s)
    empty = fn.cast(shape[0] * shape[1] == 0, dtype=types.INT32)
    anchor = anchor + (s - anchor) * empty
    zero = anchor * 0
    anchors = fn.stack(zero, anchor)
    shapes = fn.stack(zero + s, shape)
    return anchors, shapes, shape


def _paste(images: DataNode, image_size: int, draw: tuple) -> tuple[DataNode, DataNode]:
    """The composed CutMix: ``fn.multi_paste`` in one pass, region 0 = the whole own image
    (input 0), region 1 = the box from the partner (input 1) at the same place; later regions
    overwrite earlier ones."""
    perm, lam, centre = draw
    anchors, shapes, shape = paste_regions(lam, centre, image_size)
    partner = fn.permute_batch(images, indices=perm)
    mixed = fn.multi_paste(images, partner, in_anchors=anchors, shapes=shapes, out_anchors=anchors)
    return mixed, _box_lam(shape, image_size)


def _fused_cutmix(
    images: DataNode, image_size: int, perms: list, lam: DataNode, centre: DataNode
) -> list[tuple]:
    """k = len(perms) candidates in one fn.dalikd_mix call; ``[(images, lam, perm)]`` each.

    The operator gets the draws as they are drawn: ``perms``, k int32 nodes (stacked to (k,)
    per sample), ``lam`` float32 (k,) and ``centre`` int32 (k, 2) per sample (a scalar and
    (2,) for k = 1), and computes :func:`cutmix_box` and the box's λ itself in the same
    float32 arithmetic: the ~20 scalar DALI operators per candidate that the box takes in the
    graph cost more than the pixel work. Its λ outputs are used as they come, on the images'
    device (on GPU: GPU nodes, which the Loader takes as they are).
    """
    k = len(perms)
    out = fn.dalikd_mix(images, mode="cutmix", candidates=k, lam=lam, centre=centre,
                        perm=perms[0] if k == 1 else fn.stack(*perms))  # fmt: skip
    return [(out[j], out[k + j], perms[j]) for j in range(k)]


def cutmix(
    images: DataNode,
    image_size: int,
    *,
    alpha: float = 1.0,
    granularity: str = "sample",
    lam: DataNode | None = None,
    perm: DataNode | None = None,
    centre: DataNode | None = None,
    native: bool = False,
    seeds: Seeds | None = None,
) -> tuple[DataNode, DataNode, DataNode]:
    """CutMix: a box of the partner x[perm] pasted over x. Returns ``(images, lam, perm)``.

    The draws are :func:`cutmix_draws`. The returned ``lam`` is recomputed from the real
    (clipped) box: 1 − h·w / S², float32. ``native`` as in :func:`mixup`.
    """
    draw = cutmix_draws(image_size, alpha=alpha, granularity=granularity, lam=lam, perm=perm,
                        centre=centre, seeds=seeds)  # fmt: skip
    if _native(images, native):
        perm, lam, centre = draw
        return _fused_cutmix(images, image_size, [perm], lam, centre)[0]
    mixed, box_lam = _paste(images, image_size, draw)
    return mixed, box_lam, draw[0]


def cutmix_pool(
    images: DataNode,
    image_size: int,
    pool_size: int,
    *,
    alpha: float = 1.0,
    granularity: str = "sample",
    native: bool = False,
    seeds: Seeds | None = None,
) -> list[tuple[DataNode, DataNode, DataNode]]:
    """k = ``pool_size`` independent CutMix candidates per image (own λ, box and partner each).

    The draws are made for all k at once where DALI allows: k partner permutations, but one
    Beta draw of shape (k,) and one centre draw of shape (k, 2) per sample (with "batch"
    granularity, candidate j shares its λ and box over the batch). Natively all k candidates
    come from one operator call that reads each image once; composed, candidate j is
    :func:`cutmix` with draw j injected."""
    _check(granularity)
    k = pool_size
    perms = [partner_permutation(seeds) for _ in range(k)]
    lams = _per(granularity, fn.random.beta(alpha=alpha, beta=alpha, shape=[k], **seed(seeds)),
                perms[0])  # fmt: skip
    centres = _per(granularity, fn.random.choice(image_size, shape=[k, 2], **seed(seeds)),
                   perms[0])  # fmt: skip
    if not _native(images, native):
        return [cutmix(images, image_size, lam=lams[j], perm=perms[j], centre=centres[j],
                       native=False) for j in range(k)]  # fmt: skip
    return _fused_cutmix(images, image_size, perms, lams, centres)


def _native(images: DataNode, native: bool) -> bool:
    """The one mixing dispatch: ``native`` as the caller passes it (a recipe: ``ctx.native``,
    the data plan's resolved path), the operator loaded for the images' device first."""
    if native:
        from dalikd import native as native_op

        native_op.require(images.device, "needed (native=True)")
    return native

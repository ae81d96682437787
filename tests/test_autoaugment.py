"""dalikd.autoaugment against torchvision's AutoAugment: the policy tables, every op's pixels at
fixed magnitudes (torchvision.transforms.v2.functional through AutoAugment's own op dispatch),
the sub-policy applier with injected draws, granularity, and no flat x' on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as F
from nvidia.dali.auto_aug.core import signed_bin
from tests_helpers import run_graph

from dalikd import autoaugment as aa

S = 64  # px; photos resized to S x S
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "coins")
TV_POLICY = {
    "imagenet": T1.AutoAugmentPolicy.IMAGENET,
    "cifar10": T1.AutoAugmentPolicy.CIFAR10,
    "svhn": T1.AutoAugmentPolicy.SVHN,
}


def photos(side: int = S) -> np.ndarray:
    """[n, side, side, 3] uint8 real photos from scikit-image (no download)."""
    out = []
    for name in PHOTOS:
        array = np.atleast_3d(getattr(skimage.data, name)())  # coins is grey: repeat it to RGB
        array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        out.append(F.resize(image, [side, side], antialias=True).permute(1, 2, 0).numpy())
    return np.stack(out)


def torchvision_op(images: np.ndarray, name: str, magnitude_bin: int | None, negate: bool):
    """torchvision AutoAugment's own op on a uint8 NHWC batch at a fixed bin and sign."""
    tv = T2.AutoAugment()  # defaults: nearest, fill None
    magnitudes_fn, signed = tv._AUGMENTATION_SPACE[name]
    magnitudes = magnitudes_fn(aa.NUM_BINS, images.shape[1], images.shape[2])
    magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_bin])
    if signed and negate:
        magnitude = -magnitude
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = tv._apply_image_or_video_transform(
        batch, name, magnitude, interpolation=tv.interpolation, fill=tv._fill
    )
    return out.permute(0, 2, 3, 1).numpy()


def dali_op(images: np.ndarray, name: str, magnitude_bin: int | None, negate: bool):
    n = len(images)
    arrays = {
        "images": images,
        "bins": [np.int32(magnitude_bin or 0)] * n,
        "sign": [np.int32(negate)] * n,
    }

    def graph(images, bins, sign):
        aug = aa.augmentations(images_side)[name]
        if aug.mag_range is None:
            return aug(images)
        return aug(images, magnitude_bin=signed_bin(bins, random_sign=sign), num_magnitude_bins=10)

    images_side = images.shape[1]
    return run_graph(graph, arrays, conditionals=True)[0][0]


# -- the tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(TV_POLICY))
def test_policies_equal_torchvisions_tables(policy):
    ours = [tuple(tuple(stage) for stage in sub) for sub in aa.POLICIES[policy]]
    assert ours == T1.AutoAugment(TV_POLICY[policy]).policies  # v1: what the reference ran
    assert ours == T2.AutoAugment(TV_POLICY[policy])._policies
    assert len(ours) == 25


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="imagenet, cifar10, svhn"):
        aa.autoaugment(None, "image_net", S)


# -- every op at fixed magnitudes ------------------------------------------------------------------

EXACT = (
    "Invert",
    "Posterize",
    "Solarize",
    "Brightness",
    "AutoContrast",
    "TranslateX",
    "TranslateY",
)
# float32 sums in another order (luma, the 3x3 blur, the mean) before torch's truncation: a
# value that lands within rounding of an integer may come out one grey level apart
WITHIN_ONE = ("Color", "Contrast", "Sharpness")
# nearest-pixel sampling: a source point exactly between two pixels may round the other way
GEOMETRIC = ("ShearX", "ShearY", "Rotate")
ALL_OPS = (*EXACT, *WITHIN_ONE, *GEOMETRIC, "Equalize")


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_matches_torchvision_at_fixed_magnitudes(name):
    images = photos()
    bins = (None,) if name in ("Invert", "AutoContrast", "Equalize") else (0, 3, 9)
    for magnitude_bin in bins:
        for negate in (False, True):
            ours = dali_op(images, name, magnitude_bin, negate).astype(int)
            theirs = torchvision_op(images, name, magnitude_bin, negate).astype(int)
            diff = np.abs(ours - theirs)
            where = f"{name} bin {magnitude_bin} negate {negate}"
            if name in EXACT:
                assert diff.max() == 0, where
            elif name in WITHIN_ONE:
                assert diff.max() <= 1 and (diff > 0).mean() < 0.05, where
            elif name in GEOMETRIC:
                assert (diff > 0).mean() <= 0.005, where
            else:  # Equalize: DALI's (OpenCV's formula) vs torchvision's (PIL's); documented
                assert diff.max() <= 32 and diff.mean() < 8, where


def test_translation_is_relative_to_the_side():
    # 150/331 of the side at bin 9, truncated: 101 px at 224 (DALI's image_net policy: 250 px)
    image = np.full((1, 224, 224, 3), 200, np.uint8)
    out = dali_op(image, "TranslateX", 9, False)[0]
    assert (out[:, :101] == 0).all() and (out[:, 101:] == 200).all()


# -- the sub-policy applier ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, sub_policy",
    [("imagenet", 0), ("imagenet", 8), ("cifar10", 3), ("cifar10", 21), ("svhn", 18)],
)
def test_injected_draws_apply_torchvisions_stages(policy, sub_policy):
    # one batch: every (run, sign) combination on two photos, sample by sample
    combos = [(r, g) for r in ([0.0, 0.0], [0.99, 0.0], [0.0, 0.99]) for g in ([0, 1], [1, 0])]
    two = photos()[:2]
    images = np.concatenate([two] * len(combos))
    runs = [np.float32(r) for r, _ in combos for _ in two]
    signs = [np.int32(g) for _, g in combos for _ in two]
    arrays = {
        "images": images,
        "sub_policy": [np.int32(sub_policy)] * len(images),
        "run": runs,
        "sign": signs,
    }

    def graph(images, sub_policy, run, sign):
        return aa.autoaugment(images, policy, S, sub_policy=sub_policy, run=run, sign=sign)

    got = run_graph(graph, arrays, conditionals=True)[0][0]
    stages = aa.POLICIES[policy][sub_policy]
    for i, (run, sign) in enumerate(combos):
        expected = two
        for s, (name, p, magnitude_bin) in enumerate(stages):
            if run[s] <= p:
                expected = torchvision_op(expected, name, magnitude_bin, bool(sign[s]))
        mismatch = (got[2 * i : 2 * i + 2] != expected).mean()
        assert mismatch <= 0.005, (policy, sub_policy, run, sign, mismatch)


def test_batch_granularity_shares_the_draw_sample_does_not():
    images = np.repeat(photos(32)[:1], 16, axis=0)
    for granularity, shared in (("batch", True), ("sample", False)):
        outs = run_graph(
            lambda images, g=granularity: aa.autoaugment(images, "imagenet", 32, g),
            {"images": images},
            seed=5,
            iters=4,
            conditionals=True,
        )
        outs = [out for (out,) in outs]
        for out in outs:
            same = all(np.array_equal(o, out[0]) for o in out)
            assert same or not shared, granularity
        assert any(not all(np.array_equal(o, out[0]) for o in out) for out in outs) != shared


# -- no flat x' ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(TV_POLICY))
def test_no_output_of_a_photo_is_a_flat_image(policy):
    # DALI's image_net policy translated by up to 250 px and left ~3% of x' a flat fill
    images = photos(224)
    outs = run_graph(
        lambda images: aa.autoaugment(images, policy, 224),
        {"images": images},
        seed=1,
        iters=40,
        conditionals=True,
    )
    outs = [out for (out,) in outs]
    stds = np.array([o.reshape(len(o), -1).std(axis=1) for o in outs]).ravel()
    assert len(stds) == 40 * len(PHOTOS)
    assert stds.min() > 5.0, stds.min()

"""dalikd.ops against NumPy references, on CPU (DALI device_id=None), with injected draws where
exactness needs them and invariants where the draws are DALI's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from nvidia.dali.ops import _registry  # private: the only list of operators with a GPU backend
from PIL import Image
from tests_helpers import run_graph

from dalikd import autoaugment, loaders, ops
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.plan import resolve_plan
from dalikd.recipes import AugContext, Pool, builtin_recipes, recipe_info, resolve

B, S = 6, 16  # batch size, image side in px
FILL = (123.675, 116.28, 103.53)  # ImageNet mean, 0-255: rounds to (124, 116, 104)


def make_images(n: int = B, s: int = S) -> np.ndarray:
    """[n, s, s, 3] uint8. R and G encode the position (y, x) (+ sample in G) so shifts and
    flips show; B = 20·i + 5 names the sample (n <= 12), and no pixel equals the Cutout fill."""
    y, x = np.mgrid[0:s, 0:s]
    step = 240 // s  # px -> grey level
    images = np.empty((n, s, s, 3), np.uint8)
    for i in range(n):
        images[i, ..., 0] = y * step
        images[i, ..., 1] = x * step + i
        images[i, ..., 2] = 20 * i + 5
    return images


def scalars(values, dtype) -> list[np.ndarray]:
    return [np.asarray(v, dtype) for v in values]


# -- flip, crop_flip -----------------------------------------------------------------------------


def test_flip_mirrors_exactly_the_samples_whose_coin_is_one():
    images, coin = make_images(), [1, 0, 1, 0, 0, 1]
    [(out,)] = run_graph(
        lambda images, coin: ops.flip(images, coin=coin),
        {"images": images, "coin": scalars(coin, np.int32)},
    )
    for i, c in enumerate(coin):
        np.testing.assert_array_equal(out[i], images[i, :, ::-1] if c else images[i])


def padded_window(image: np.ndarray, pad: int, oy: int, ox: int) -> np.ndarray:
    """torchvision RandomCrop(size, padding=pad) with its corner at (oy, ox) of the padded image."""
    s = image.shape[0]
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[oy : oy + s, ox : ox + s]


def test_crop_flip_is_the_window_of_the_zero_padded_image_at_the_injected_offset():
    pad, images = 4, make_images()
    offsets = [(0, 0), (8, 8), (4, 4), (0, 8), (7, 1), (3, 6)]  # the corners of 0..2·pad and inside
    coin = [0, 1, 0, 1, 1, 0]
    [(out,)] = run_graph(
        lambda images, offset, coin: ops.crop_flip(images, S, pad=pad, offset=offset, coin=coin),
        {"images": images, "offset": scalars(offsets, np.int32), "coin": scalars(coin, np.int32)},
    )
    for i, ((oy, ox), c) in enumerate(zip(offsets, coin, strict=True)):
        ref = padded_window(images[i], pad, oy, ox)
        np.testing.assert_array_equal(out[i], ref[:, ::-1] if c else ref)


def test_crop_flip_draws_are_windows_within_the_padding():
    pad, images = 2, make_images()
    seen = set()
    draws = run_graph(lambda images: ops.crop_flip(images, S, pad=pad), {"images": images}, iters=8)
    for (out,) in draws:
        for i in range(B):
            found = [
                (oy, ox, c)
                for oy in range(2 * pad + 1)
                for ox in range(2 * pad + 1)
                for c in (0, 1)
                if np.array_equal(
                    out[i], padded_window(images[i], pad, oy, ox)[:, :: -1 if c else 1]
                )
            ]
            assert len(found) == 1, f"sample {i} is not one window of the padded image"
            seen.add(found[0])
    assert len(seen) > 20  # of the 50 (offset, flip) outcomes, over 48 draws


# -- cutout --------------------------------------------------------------------------------------


def cutout_ref(image: np.ndarray, hole: int, cy: int, cx: int) -> np.ndarray:
    out = image.copy()
    y0, x0 = max(cy - hole // 2, 0), max(cx - hole // 2, 0)
    out[y0 : cy - hole // 2 + hole, x0 : cx - hole // 2 + hole] = np.round(FILL).astype(np.uint8)
    return out


def test_cutout_fills_the_clipped_square_and_nothing_else():
    hole, images = 4, make_images()
    centres = [(0, 0), (15, 15), (0, 15), (7, 9), (1, 14), (2, 2)]  # clipped at every border
    [(out,)] = run_graph(
        lambda images, centre: ops.cutout(images, S, hole=hole, fill=FILL, centre=centre),
        {"images": images, "centre": scalars(centres, np.int32)},
    )
    for i, (cy, cx) in enumerate(centres):
        np.testing.assert_array_equal(out[i], cutout_ref(images[i], hole, cy, cx))


def test_cutout_draws_are_reference_holes_at_random_centres():
    hole, images = 4, make_images()
    centres = set()
    draws = run_graph(
        lambda images: ops.cutout(images, S, hole=hole, fill=FILL), {"images": images}, iters=6
    )
    for (out,) in draws:
        for i in range(B):
            found = [
                (cy, cx)
                for cy in range(S)
                for cx in range(S)
                if np.array_equal(out[i], cutout_ref(images[i], hole, cy, cx))
            ]
            # Rows cy - 2 .. cy + 1 clipped: each centre gives a different hole.
            assert len(found) == 1, f"sample {i} is not one Cutout of itself"
            centres.add(found[0])
    assert len(centres) > 20


# -- mixup ---------------------------------------------------------------------------------------


def mixup_ref(images: np.ndarray, lam: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The documented arithmetic: float32 x·λ + x[perm]·(1 − λ), then floor(v + 0.5)."""
    lam = lam.astype(np.float32)[:, None, None, None]
    x, partner = images.astype(np.float32), images[perm].astype(np.float32)
    v = x * lam + partner * (np.float32(1) - lam)
    return np.floor(v + np.float32(0.5)).astype(np.uint8)


def test_mixup_equals_the_numpy_reference_for_injected_lam_and_perm():
    images = make_images()
    lam = np.array([0.5, 0.25, 0.0, 1.0, 0.3, 0.77], np.float32)  # 0.5: many exact halves
    perm = np.array([1, 0, 3, 2, 5, 4], np.int32)
    [(out, lam_out, perm_out)] = run_graph(
        lambda images, lam, perm: ops.mixup(images, lam=lam, perm=perm),
        {"images": images, "lam": scalars(lam, np.float32), "perm": scalars(perm, np.int32)},
    )
    np.testing.assert_array_equal(out, mixup_ref(images, lam, perm))
    np.testing.assert_array_equal(lam_out, lam)
    np.testing.assert_array_equal(perm_out, perm)


def test_mixup_with_drawn_lam_and_perm_equals_the_reference():
    images = make_images()
    for out, lam, perm in run_graph(lambda images: ops.mixup(images), {"images": images}, iters=4):
        assert lam.dtype == np.float32 and perm.dtype == np.int32
        assert ((lam >= 0) & (lam <= 1)).all()
        np.testing.assert_array_equal(out, mixup_ref(images, lam, perm))


# -- cutmix --------------------------------------------------------------------------------------


def cutmix_box_ref(lam: float, cy: int, cx: int, s: int = S) -> tuple[int, int, int, int]:
    """Yun et al.'s box in float32: half = floor(s·√(1 − λ)) // 2, [c − half, c + half) clipped.
    Returns (y0, y1, x0, x1)."""
    half = int(np.floor(np.float32(s) * np.sqrt(np.float32(1) - np.float32(lam)))) // 2
    return max(cy - half, 0), min(cy + half, s), max(cx - half, 0), min(cx + half, s)


def box_lam(area: int, s: int = S) -> np.float32:
    return np.float32(1) - np.float32(area) / np.float32(s * s)


def test_an_empty_cutmix_box_is_anchored_outside_the_image():
    # DALI's GPU multi_paste never closes a zero-size region (ops.paste_regions): an empty box
    # must sit at (S, S), where its sweep never opens it; every other box is the reference's.
    lam = np.array([1.0, 1.0, 0.999, 0.99, 0.5, 1.0], np.float32)  # half: 0, 0, 0, 0, 5, 0
    centres = [(5, 5), (0, 0), (15, 15), (8, 3), (9, 14), (0, 15)]
    [(anchors, shapes)] = run_graph(
        lambda lam, centre: ops.paste_regions(lam, centre, S)[:2],
        {"lam": scalars(lam, np.float32), "centre": scalars(centres, np.int32)},
    )
    for i, (cy, cx) in enumerate(centres):
        y0, y1, x0, x1 = cutmix_box_ref(lam[i], cy, cx)
        empty = (y1 - y0) * (x1 - x0) == 0
        assert anchors[i].tolist() == [[0, 0], [S, S] if empty else [y0, x0]]
        assert shapes[i].tolist() == [[S, S], [y1 - y0, x1 - x0]]
    assert [bool(a[1, 0] == S) for a in anchors] == [True, True, True, True, False, True]


def test_cutmix_pastes_the_reference_box_from_the_partner():
    images = make_images()
    lam = np.array([0.0, 1.0, 0.5, 0.9, 0.3, 0.999], np.float32)  # full box, empty box, ...
    centres = [(8, 8), (5, 5), (0, 0), (15, 3), (9, 14), (7, 7)]
    perm = np.array([3, 2, 4, 5, 1, 0], np.int32)
    [(out, lam_out, perm_out)] = run_graph(
        lambda images, lam, perm, centre: ops.cutmix(images, S, lam=lam, perm=perm, centre=centre),
        {
            "images": images,
            "lam": scalars(lam, np.float32),
            "perm": scalars(perm, np.int32),
            "centre": scalars(centres, np.int32),
        },
    )
    np.testing.assert_array_equal(perm_out, perm)
    for i, (cy, cx) in enumerate(centres):
        y0, y1, x0, x1 = cutmix_box_ref(lam[i], cy, cx)
        ref = images[i].copy()
        ref[y0:y1, x0:x1] = images[perm[i], y0:y1, x0:x1]
        np.testing.assert_array_equal(out[i], ref)
        assert lam_out[i] == box_lam((y1 - y0) * (x1 - x0))
    assert lam_out[0] == 0.0 and lam_out[1] == 1.0  # the whole partner; nothing of it


def partner_box(out: np.ndarray, images: np.ndarray, i: int, partner: int) -> int:
    """Check sample i of a CutMix output: a rectangle of the partner (same place), the rest the
    sample itself. Returns the box area in px."""
    source = out[..., 2]  # blue names the sample
    assert np.isin(source, [images[i, 0, 0, 2], images[partner, 0, 0, 2]]).all()
    mask = source == images[partner, 0, 0, 2]
    np.testing.assert_array_equal(out, np.where(mask[..., None], images[partner], images[i]))
    if mask.any():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all(), "not a rectangle"
    return int(mask.sum())


def test_cutmix_draws_a_partner_box_and_recomputes_lam_from_its_area():
    images = make_images()
    areas = []
    for out, lam, perm in run_graph(
        lambda images: ops.cutmix(images, S), {"images": images}, iters=5
    ):
        assert lam.dtype == np.float32 and perm.dtype == np.int32
        for i in range(B):
            area = partner_box(out[i], images, i, perm[i])
            assert lam[i] == box_lam(area)
            areas.append(area)
    assert len(set(areas)) > 5


@pytest.mark.parametrize("batch", [2, 3, 7])
def test_partner_is_a_permutation_without_fixed_points(batch):
    images = make_images(batch)
    for mix in (lambda images: ops.mixup(images), lambda images: ops.cutmix(images, S)):
        for _, _, perm in run_graph(mix, {"images": images}, iters=6):
            assert sorted(perm.tolist()) == list(range(batch))
            assert (perm != np.arange(batch)).all()


# -- granularity and seeds -----------------------------------------------------------------------

PER_IMAGE = {
    "flip": lambda images, g: ops.flip(images, g),
    "crop_flip": lambda images, g: ops.crop_flip(images, S, pad=2, granularity=g),
    "cutout": lambda images, g: ops.cutout(images, S, hole=4, fill=FILL, granularity=g),
}
MIXING = {
    "mixup": lambda images, g: ops.mixup(images, granularity=g),
    "cutmix": lambda images, g: ops.cutmix(images, S, granularity=g),
}


@pytest.mark.parametrize("name", [*PER_IMAGE, *MIXING])
def test_batch_granularity_shares_the_draw_sample_granularity_does_not(name):
    # One image repeated: a per-image op makes equal outputs iff the draw is shared; for mixing
    # the draw shows in lam (and cutmix's box, through lam). 32 images: independent coin flips
    # all land alike once in 2^31 (with 8, a seed could hit it: 1 in 128).
    images = np.repeat(make_images(1), 32, axis=0)
    op = PER_IMAGE.get(name) or MIXING[name]
    for granularity, shared in (("batch", True), ("sample", False)):
        for out in run_graph(
            lambda images, g=granularity: op(images, g), {"images": images}, iters=3
        ):
            drawn = out[0] if name in PER_IMAGE else out[1]
            assert all(np.array_equal(d, drawn[0]) for d in drawn) == shared, granularity


def test_unknown_granularity_fails_with_the_known_ones():
    with pytest.raises(ValueError, match="sample, batch"):
        run_graph(lambda images: ops.flip(images, "epoch"), {"images": make_images()})


@pytest.mark.parametrize("name", [*PER_IMAGE, *MIXING, "autoaugment"])
def test_same_seed_same_batch_other_seed_differs(name):
    op = (
        PER_IMAGE.get(name)
        or MIXING.get(name)
        or (lambda images, g: autoaugment.autoaugment(images, "imagenet", 32, g))
    )
    images = make_images(8, 32)  # 32 px: AutoAugment's ops are visible at this size

    def batches(seed):
        graph = lambda images: op(images, "sample")  # noqa: E731
        out = run_graph(
            graph, {"images": images}, seed=seed, iters=2, conditionals=name == "autoaugment"
        )
        return np.concatenate([o[0] for o in out])

    a, b, c = batches(1), batches(1), batches(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_checkpoint_restores_every_draw_bit_exactly(granularity):
    # The training loader enables DALI checkpointing; every op's randomness must resume exactly.
    images = make_images(4)

    def graph():
        x = fn.external_source(source=lambda: list(images), batch=True, layout="HWC")
        outs = [PER_IMAGE[k](x, granularity) for k in PER_IMAGE]
        for k in MIXING:
            outs.extend(MIXING[k](x, granularity))
        return (*outs, autoaugment.autoaugment(x, "imagenet", S, granularity))

    def make(checkpoint=None):
        pipe = pipeline_def(graph, enable_conditionals=True, enable_checkpointing=True)(
            batch_size=4, num_threads=1, device_id=None, seed=3, checkpoint=checkpoint
        )
        pipe.build()
        return pipe

    pipe = make()
    pipe.run()
    checkpoint = pipe.checkpoint()
    expected = [o.as_array() for o in pipe.run()]
    restored = [o.as_array() for o in make(checkpoint).run()]
    for a, b in zip(expected, restored, strict=True):
        np.testing.assert_array_equal(a, b)


def test_autoaugment_keeps_shape_and_dtype():
    images = make_images(8, 32)
    graph = lambda images: autoaugment.autoaugment(images, "imagenet", 32)  # noqa: E731
    for (out,) in run_graph(graph, {"images": images}, iters=3, conditionals=True):
        assert out.shape == images.shape and out.dtype == np.uint8


# -- GPU graphs (defined, not built: no GPU here) and the real training loader ----------------


def gpu_ops_without_a_gpu_backend(outputs) -> list[str]:
    """Walk the regular inputs back from ``outputs``; list every operator placed on the GPU
    whose schema has no GPU implementation. DALI checks argument-input devices when the graph
    is defined, but a GPU input into a CPU-only operator only fails at build()."""
    bad, stack, seen = [], list(outputs), set()
    while stack:
        node = stack.pop()
        op = node.source
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        schema = getattr(op._op, "schema_name", None)
        if node.device == "gpu" and schema and schema not in _registry.gpu_ops():
            bad.append(schema)
        stack.extend(op.inputs)
    return bad


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("name", sorted(set(builtin_recipes()) - {"none"}))
def test_gpu_graph_of_every_recipe_can_be_defined(name, granularity):
    recipe = builtin_recipes()[name]
    views = []

    def graph():
        images = fn.external_source(
            source=lambda: list(make_images()), batch=True, layout="HWC"
        ).gpu()
        out = recipe(images, AugContext(S, "gpu", FILL, granularity))
        views.extend(out.views if isinstance(out, Pool) else (out,))
        return tuple(
            node
            for view in views
            for node in [view.images] + ([view.lam, view.perm] if view.lam is not None else [])
        )

    pipeline_def(graph, enable_conditionals=True)(
        batch_size=B, num_threads=1, device_id=None, seed=0
    )  # traces the graph; build() would need a GPU
    assert views
    for view in views:
        assert view.images.device == "gpu"
        assert (view.lam is not None) == recipe_info(recipe).mixing
        if view.lam is not None:
            assert view.lam.device == "cpu" and view.perm.device == "cpu"
        assert gpu_ops_without_a_gpu_backend([view.images]) == []


def test_the_gpu_check_catches_a_cpu_only_operator():
    nodes = []

    def graph():
        images = fn.external_source(source=lambda: list(make_images()), batch=True).gpu()
        nodes.append(fn.random.beta(images))  # shape_like input: CPU-only op on a GPU node
        return nodes[0]

    pipeline_def(graph)(batch_size=B, num_threads=1, device_id=None, seed=0)
    assert gpu_ops_without_a_gpu_backend(nodes) == ["random__Beta"]


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (40, 48, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg", quality=90)
    return scan_dataset(root)


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("name", list(builtin_recipes()))
def test_every_recipe_runs_through_the_train_loader(jpeg_dataset, name, granularity):
    data = DataConfig(path=str(jpeg_dataset.root), image_size=32, batch_size=4, threads=1)
    recipe = resolve(name)
    plan = resolve_plan(data, recipe, device="cpu", granularity=granularity)
    loader = loaders.train_loader(jpeg_dataset.train, plan)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        if recipe is None:
            assert batch.aug_images is None
            continue
        k = 2 if name == "cutmixpick" else 1  # a pool: k views per image, view-major
        assert batch.pool_size == k
        assert batch.aug_images.shape == (4 * k, 32, 32, 3)  # NHWC, as DALI hands them over
        assert batch.aug_images.dtype == torch.uint8
        if recipe_info(recipe).mixing:
            for perm, lam in zip(batch.perm.view(k, 4), batch.lam.view(k, 4), strict=True):
                assert sorted(perm.tolist()) == [0, 1, 2, 3]
                assert (perm != torch.arange(4)).all()
                assert ((lam >= 0) & (lam <= 1)).all()
                if granularity == "batch":  # one λ (and, for cutmix, one box) per batch
                    assert (lam == lam[0]).all()
        else:
            assert batch.lam is None and batch.perm is None

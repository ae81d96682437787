"""DALI train/val pipelines against NumPy/PIL references, on CPU."""

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import colour_of, make_dataset
from PIL import Image

from dalikd import loaders
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.plan import resolve_plan
from dalikd.recipes import Seeds


def data_cfg(root, **kw):
    return DataConfig(path=str(root), **{"image_size": 16, "batch_size": 4, "threads": 1, **kw})


def plan(data, aug="none", seed=0, device="cpu"):
    """The data plan of ``data`` and ``aug``, resolved as training resolves its own."""
    return resolve_plan(data, aug, device=device, seed=seed)


def decode_colour(x: torch.Tensor) -> np.ndarray:
    """The RGB colour of a uint8 [S, S, 3] solid image; every pixel must have it."""
    pixels = x.numpy().reshape(-1, 3)
    assert (pixels == pixels[0]).all(), "a solid colour stays solid through crop and resize"
    return pixels[0].astype(int)


def test_train_batches_are_uint8_nhwc_solid_colours_with_their_labels(solid_dataset):
    ds = scan_dataset(solid_dataset)
    loader = loaders.train_loader(ds.train, plan(data_cfg(solid_dataset), seed=3))
    assert len(loader) == len(ds.train) // 4  # the incomplete last batch is dropped
    batches = list(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        assert batch.images.shape == (4, 16, 16, 3) and batch.images.dtype == torch.uint8
        assert batch.labels.dtype == torch.int64 and batch.aug_images is None
        for image, label in zip(batch.images, batch.labels.tolist(), strict=True):
            rgb = decode_colour(image)
            # One of the dataset's colours, exactly, and the label belongs to it (R = class).
            assert tuple(rgb) in {colour_of(label, i) for i in range(8)}


def test_same_seed_same_batches_other_seed_differs(tmp_path):
    # Non-uniform images so crops and flips show in the pixels.
    root = tmp_path / "d"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                rng = np.random.default_rng(i)
                Image.fromarray(rng.integers(0, 255, (30, 36, 3), np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    ds = scan_dataset(root)

    def first(seed):
        return next(iter(loaders.train_loader(ds.train, plan(data_cfg(root), seed=seed))))

    a, b, c = first(7), first(7), first(8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_val_visits_every_image_exactly_once(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=2, n_val=5)  # 15 val images, batch 4 -> 4,4,4,3
    ds = scan_dataset(root)
    loader = loaders.val_loader(ds.val, plan(data_cfg(root)))
    assert len(loader) == 4
    expected = Counter((lab, colour_of(lab, i)) for lab in range(3) for i in range(5))
    for _epoch in range(2):  # and again, after the automatic reset
        seen = Counter()
        sizes = []
        for batch in loader:
            sizes.append(len(batch))
            for image, label in zip(batch.images, batch.labels.tolist(), strict=True):
                seen[(label, tuple(decode_colour(image)))] += 1
        assert sizes == [4, 4, 4, 3]
        assert seen == expected


def test_val_resize_and_center_crop_match_pil(tmp_path):
    # A smooth non-square image. DALI's fn.resize rounds the longer side and differs from PIL's
    # antialiased bilinear by rounding; dalikd's native resize (used on CPU where it loads)
    # truncates the longer side as torchvision's Resize(int) and has the same filter, so it
    # is held to 1 (of 255).
    h, w = 60, 90
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1).astype(
        np.uint8
    )
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / split / "a" / "0.png")
    cfg = data_cfg(tmp_path, image_size=32, batch_size=1)
    batch = next(iter(loaders.val_loader(scan_dataset(tmp_path).val, plan(cfg))))
    short = round(32 / 0.875)  # 37
    native = plan(cfg).native_resize
    long = int(w * short / h) if native else round(w * short / h)
    ref = Image.fromarray(pixels).resize((long, short), Image.BILINEAR)
    # DALI places the centre crop at round-half-up((size - 32) / 2).
    left, top = int((ref.width - 32) / 2 + 0.5), int((ref.height - 32) / 2 + 0.5)
    ref = np.asarray(ref.crop((left, top, left + 32, top + 32)), np.float32)
    got = batch.images[0].numpy().astype(np.float32)
    assert got.shape == ref.shape
    # of 255: rounding only (DALI's resize, seen: mean 0.19, max 1)
    assert np.abs(got - ref).max() <= (1.0 if native else 2.0)


def test_two_views_come_from_one_decode(solid_dataset):

    ds = scan_dataset(solid_dataset)
    loader = loaders.train_loader(ds.train, plan(data_cfg(solid_dataset), "identity", seed=1))
    for batch in loader:
        assert torch.equal(batch.images, batch.aug_images)  # same crop, same flip


@pytest.mark.parametrize("graph", ["train", "val"])
def test_gpu_graph_is_traced_and_build_stops_at_the_missing_gpu(solid_dataset, graph):
    # What a machine without a GPU can honestly show: DALI lets the GPU graph be *defined*
    # with device_id=None (the Python definition runs, the decoder is "mixed", the images are
    # GPU nodes), and build() then stops at its first check, the missing CUDA device, before
    # any GPU operator is validated. Whether the GPU graph builds and runs is
    # benchmarks/gpu_check.py's job, on a GPU. (tests/test_gpu_graph.py walks the traced graph.)
    from nvidia.dali import pipeline_def

    ds = scan_dataset(solid_dataset)
    gpu = plan(data_cfg(solid_dataset), device="gpu")
    traced = {}

    def graph_fn():
        if graph == "train":
            out = loaders.train_graph(ds.train, gpu, Seeds(0), shard_id=0, num_shards=1)
        else:
            out = loaders.val_graph(ds.val, gpu, Seeds(0), shard_id=0, num_shards=1)
        traced.update(out)
        return tuple(out.values())

    pipe = pipeline_def(graph_fn, enable_conditionals=True)(
        batch_size=4, num_threads=1, device_id=None
    )
    assert traced["images"].device == "gpu" and traced["labels"].device == "cpu"
    pipe._build_graph()  # private: collects the operators without building the backend
    decoders = [op._op for op in pipe._ops if op._op.schema_name.startswith("decoders__")]
    assert [d.device for d in decoders] == ["mixed"]
    with pytest.raises(RuntimeError, match="requires a CUDA-capable GPU"):
        pipe.build()

"""fn.dalikd_resize (dalikd/native/resize_cpu.cc) against torchvision's antialiased resize on real
photos, its fused flip against flipping afterwards, and the pipelines that use it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

nvidia_dali = pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402

from dalikd import native  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    status = native.load()
    if not status.cpu:
        pytest.skip(f"native library unavailable: {status.reason}")
    return status


def photos() -> list[np.ndarray]:
    from skimage import data

    return [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.immunohistochemistry(),
    ]


def crops() -> list[np.ndarray]:
    """Crops of real photos as a random-resized-crop makes them: downscale (up to ~2.3x, odd
    sizes, both aspect ratios) and upscale (smaller than 224)."""
    rng = np.random.default_rng(0)
    out = []
    for img in photos():
        h, w = img.shape[:2]
        for ch, cw in ((h, w), (h - 37, w // 2 + 3), (301, 227), (150, 97), (223, 225), (60, 181)):
            ch, cw = min(ch, h), min(cw, w)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            out.append(np.ascontiguousarray(img[y : y + ch, x : x + cw]))
    return out


def run_resize(images: list[np.ndarray], flips: list[int] | None = None, **kw) -> list[np.ndarray]:
    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        if flips is not None:
            kw["flip"] = fn.external_source(
                source=lambda: [np.array(f, np.int32) for f in flips], batch=True
            )
        return fn.dalikd_resize(x, **kw)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(images))]


def tv_resize(img: np.ndarray, size) -> np.ndarray:
    from torchvision.transforms.v2 import functional as F

    t = torch.from_numpy(img).permute(2, 0, 1)
    return F.resize(t, size, antialias=True).permute(1, 2, 0).numpy()


def test_matches_torchvision_antialias_on_photos(loaded):
    images = crops()
    got = run_resize(images, size_y=224, size_x=224)
    diffs = []
    for img, out in zip(images, got, strict=True):
        ref = tv_resize(img, [224, 224])
        assert out.shape == ref.shape == (224, 224, 3)
        diffs.append(np.abs(out.astype(np.int16) - ref.astype(np.int16)).ravel())
    d = np.concatenate(diffs)
    share = float(np.mean(d <= 1))
    print(f"\n|native - torchvision| <= 1 on {share:.5%} of {d.size} values; max {d.max()}, "
          f"exact on {np.mean(d == 0):.3%}")  # fmt: skip
    assert share >= 0.999, share
    assert d.max() <= 3


def test_fused_flip_equals_flip_afterwards(loaded):
    images = crops()
    plain = run_resize(images, size_y=224, size_x=160)
    flipped = run_resize(images, [1] * len(images), size_y=224, size_x=160)
    mixed = run_resize(images, [i % 2 for i in range(len(images))], size_y=224, size_x=160)
    for i, (a, b, m) in enumerate(zip(plain, flipped, mixed, strict=True)):
        np.testing.assert_array_equal(b, a[:, ::-1])
        np.testing.assert_array_equal(m, a[:, ::-1] if i % 2 else a)


def test_upscaling_and_identity(loaded):
    img = np.ascontiguousarray(photos()[1][:100, :150])
    (up,) = run_resize([img], size_y=224, size_x=224)
    d = np.abs(up.astype(np.int16) - tv_resize(img, [224, 224]).astype(np.int16))
    assert np.mean(d <= 1) >= 0.999 and d.max() <= 2
    (same,) = run_resize([img], size_y=100, size_x=150)  # scale 1: weights (0, 1, 0)
    np.testing.assert_array_equal(same, img)


def test_resize_shorter_matches_torchvision(loaded):
    images = [photos()[1], photos()[2], np.ascontiguousarray(photos()[1].transpose(1, 0, 2))]
    got = run_resize(images, resize_shorter=256)
    for img, out in zip(images, got, strict=True):
        ref = tv_resize(img, 256)  # torchvision's Resize(int): longer side truncated
        assert out.shape == ref.shape
        d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
        assert np.mean(d <= 1) >= 0.999


def test_gray_and_four_channels(loaded):
    img = np.ascontiguousarray(photos()[0][:300, :280])
    gray = np.ascontiguousarray(img[:, :, :1])
    rgba = np.ascontiguousarray(np.concatenate([img, img[:, :, :1]], axis=2))
    g, r = (
        run_resize([gray], size_y=224, size_x=224)[0],
        run_resize([rgba], size_y=224, size_x=224)[0],
    )
    (rgb,) = run_resize([img], size_y=224, size_x=224)
    np.testing.assert_array_equal(g[:, :, 0], rgb[:, :, 0])
    np.testing.assert_array_equal(r[:, :, :3], rgb)


def test_training_and_validation_pipelines_use_it(loaded, tmp_path):
    """Whole-image crops (crop_scale 1, the photo's aspect) of PNG photos: the training images
    are torchvision's antialiased resize of the photo, flipped where the seeded coin says; the
    checkpoint names the operator, so a resume rebuilds the same graph."""
    from PIL import Image

    from dalikd import loaders
    from dalikd.config import DataConfig
    from dalikd.data import scan_dataset
    from dalikd.plan import resolve_plan

    img = np.ascontiguousarray(photos()[2][:, :400])  # chelsea, 300 x 400
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(img).save(tmp_path / split / c / f"{i}.png")
    aspect = img.shape[1] / img.shape[0]
    cfg = DataConfig(path=str(tmp_path), image_size=64, batch_size=8, threads=1,
                     crop_scale=(1.0, 1.0), crop_ratio=(aspect, aspect))  # fmt: skip
    assert resolve_plan(cfg, device="cpu").native_resize
    assert not resolve_plan(cfg, device="gpu").native_resize
    assert not resolve_plan(DataConfig(antialias=False), device="cpu").native_resize
    ds = scan_dataset(tmp_path)
    ref = tv_resize(img, [64, 64]).astype(np.int16)
    loader = loaders.train_loader(ds.train, resolve_plan(cfg, device="cpu", seed=5))
    flips = []
    for _ in range(2):
        batch = next(iter(loader))
        for x in batch.images.numpy().astype(np.int16):
            plain, mirrored = np.abs(x - ref).max(), np.abs(x[:, ::-1] - ref).max()
            assert min(plain, mirrored) <= 1
            flips.append(bool(mirrored < plain))
    assert 0 < sum(flips) < len(flips), flips  # the coin flips some, not all
    assert b"DalikdResize" in loader.checkpoint()

    val = next(iter(loaders.val_loader(ds.val, resolve_plan(cfg, device="cpu"))))
    short = round(64 / cfg.val_crop_fraction)
    full = tv_resize(img, short)
    top, left = (int((s - 64) / 2 + 0.5) for s in full.shape[:2])  # fn.crop: round half up
    want = full[top : top + 64, left : left + 64].astype(np.int16)
    assert np.abs(val.images[0].numpy().astype(np.int16) - want).max() <= 1


def test_the_resize_path_is_configuration(loaded, monkeypatch):
    """data.resize picks the operator; DALIKD_NATIVE_RESIZE is only auto's default; GPU and
    --no-antialias always take DALI's resize, and asking for the native one there is one line."""
    from dalikd.config import DataConfig
    from dalikd.errors import DalikdError
    from dalikd.plan import resolve_plan

    assert native.resolve_resize("auto", True, "cpu") == "native"
    assert native.resolve_resize("dali", True, "cpu") == "dali"
    assert native.resolve_resize("auto", True, "gpu") == "dali"
    assert native.resolve_resize("auto", False, "cpu") == "dali"
    assert not resolve_plan(DataConfig(resize="dali"), device="cpu").native_resize  # loaded
    for antialias, device in ((True, "gpu"), (False, "cpu")):
        with pytest.raises(DalikdError, match="resize = native is CPU-only") as e:
            native.resolve_resize("native", antialias, device)
        assert "\n" not in str(e.value)
    monkeypatch.setenv("DALIKD_NATIVE_RESIZE", "0")
    assert native.resolve_resize("auto", True, "cpu") == "dali"
    assert native.resolve_resize("native", True, "cpu") == "native"
    assert resolve_plan(DataConfig(resize="native"), device="cpu").native_resize


def test_a_run_saves_its_resolved_resize_path_and_resumes_on_it(
    loaded, solid_dataset, tmp_path, tiny_env, monkeypatch, capsys
):
    """auto is resolved once (here by DALIKD_NATIVE_RESIZE=0), written to config.json and the
    checkpoint; a resume keeps it, a DALI state pins it, a contradicting --resize is one line."""
    import json

    from tests_helpers import run_cli

    from dalikd import loaders
    from dalikd.config import DataConfig
    from dalikd.data import scan_dataset
    from dalikd.errors import DalikdError
    from dalikd.plan import checkpoint_resize, resolve_plan

    monkeypatch.setenv("DALIKD_NATIVE_RESIZE", "0")
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train", "--data", solid_dataset, "--student", "tiny_models:tiny_cnn", "--epochs", 1,
         "--image-size", 16, "--batch-size", 4, "--threads", 1, "--device", "cpu",
         "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"]["resize"] == "dali"
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["config"]["data"]["resize"] == "dali"
    code, _, err = run_cli(["train", "--resume", out, "--epochs", 2, "--resize", "native"], capsys)
    assert code == 1 and "data.resize dali -> native" in err
    assert len(err.strip().splitlines()) == 1
    # a run dir saved before data.resize existed: its DALI state names the graph
    saved = json.loads((out / "config.json").read_text())
    del saved["data"]["resize"]
    (out / "config.json").write_text(json.dumps(saved))
    monkeypatch.delenv("DALIKD_NATIVE_RESIZE")  # auto would now pick native: ignored on resume
    code, _, err = run_cli(["train", "--resume", out, "--epochs", 2], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"]["resize"] == "dali"
    # a DALI state restores only into its own resize path
    data = DataConfig(path=str(solid_dataset), image_size=16, batch_size=4, threads=1)
    train = scan_dataset(solid_dataset).train
    native_plan = resolve_plan(replace(data, resize="native"), device="cpu")
    state = loaders.train_loader(train, native_plan).checkpoint()
    assert checkpoint_resize(state) == "native"
    dali_plan = resolve_plan(replace(data, resize="dali"), device="cpu")
    with pytest.raises(DalikdError, match="saved with the native resize path") as e:
        loaders.train_loader(train, dali_plan, checkpoint=state)
    assert "--resize native resumes it" in str(e.value) and "\n" not in str(e.value)
    # "auto" takes the saved state's path
    restored = resolve_plan(data, device="cpu", dali_state=state)
    resumed = loaders.train_loader(train, restored, checkpoint=state)
    assert b"DalikdResize" in resumed.checkpoint() or "DalikdResize" in resumed.checkpoint()

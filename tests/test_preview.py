"""`dalikd preview`: the PNG shows exactly the training batch, with λ and partner for mixing."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import run_cli

from dalikd import loaders, preview, recovery
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.plan import resolve_plan

SIZE = 16  # px; tiles are enlarged to 96 px (factor 6) in the PNG
BATCH = 4
SEED = 3


def make_gradient_dataset(root: Path, classes=("ant", "bee", "cat"), n=6) -> Path:
    """PNG images in the ImageNet layout whose pixels all differ within an image (R: column,
    G: row, B: class and index), so a flipped, shifted or swapped tile cannot pass for another."""
    rows, cols = np.mgrid[0:40, 0:48]
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.stack(
                    [cols * 5, rows * 6, np.full_like(rows, 30 + 70 * label + 9 * i)], axis=-1
                ).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def gradients(tmp_path_factory) -> Path:
    return make_gradient_dataset(tmp_path_factory.mktemp("gradients"))


def reference_batch(data_dir: Path, aug: str, granularity: str) -> loaders.Batch:
    """The first training batch straight from the library's training data (recovery.TrainData),
    as `dalikd train` gets it."""
    dataset = scan_dataset(data_dir)
    data = DataConfig(path=str(data_dir), image_size=SIZE, batch_size=BATCH)
    plan = resolve_plan(data, aug, device="cpu", seed=SEED, granularity=granularity)
    return next(iter(recovery.TrainData(recovery.FileSource(dataset.train), plan, epoch=0)))


def tile(png: np.ndarray, layout: preview.Layout, i: int, view: str) -> np.ndarray:
    """Sample i's tile of the PNG, shrunk back to image_size² (every scale-th pixel)."""
    x, y = layout.tile_origin(i, view)
    block = png[y : y + layout.tile, x : x + layout.tile]
    small = block[:: layout.scale, :: layout.scale]
    # Enlarged by nearest neighbour: each pixel is a scale x scale block of equal pixels.
    assert np.array_equal(block, small.repeat(layout.scale, 0).repeat(layout.scale, 1))
    return small


@pytest.mark.parametrize(
    "aug, granularity", [("cutmix", "sample"), ("cutmix", "batch"), ("flip", "sample")]
)
def test_grid_shows_the_training_batch(aug, granularity, gradients, tmp_path, capsys):
    out = tmp_path / "cli" / "grid.png"
    args = ["preview", "--data", gradients, "--aug", aug, "--out", out, "--batch-size", BATCH,
            "--image-size", SIZE, "--seed", SEED, "--granularity", granularity,
            "--device", "cpu"]  # fmt: skip
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert f"wrote {out}: {BATCH} samples" in stdout
    assert not list(out.parent.glob("*.tmp"))

    summary = preview.write_preview(
        gradients, aug, tmp_path / "lib.png", batch_size=BATCH, image_size=SIZE, seed=SEED,
        granularity=granularity, device="cpu",
    )  # fmt: skip
    png = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(png, np.asarray(Image.open(summary["path"]).convert("RGB")))

    mixing = aug == "cutmix"
    # the title whole, wrapped to the grid's width (cut to "granular.." before)
    title = summary["title"]
    font, _ = preview._font(preview.Layout(BATCH, SIZE).font_size)
    width = 2 * preview.MARGIN + preview.LEFT + BATCH * 96 + (BATCH - 1) * preview.GAP
    assert " ".join(title) == (
        f"x (top) and x' (below), first training batch: --aug {aug}, granularity "
        f"{granularity}, seed {SEED}, {SIZE} px"
    )
    assert len(title) > 1 and all(font.getlength(t) <= width - 2 * preview.MARGIN for t in title)
    layout = preview.Layout(BATCH, SIZE, captions=mixing, title_lines=len(title))
    assert layout.scale == 6 and layout.tile == 96
    text = layout.text_h
    height = 2 * preview.MARGIN + len(title) * text + text + 2 * 96 + preview.ROW_GAP
    height += text if mixing else 0
    assert Image.open(out).size == (width, height) == tuple(summary["size"])
    assert summary["n"] == BATCH

    ref = reference_batch(gradients, aug, granularity)
    x, x_aug = ref.images.numpy(), ref.aug_images.numpy()
    for i in range(BATCH):
        assert np.array_equal(tile(png, layout, i, "x"), x[i]), f"x tile {i}"
        assert np.array_equal(tile(png, layout, i, "x'"), x_aug[i]), f"x' tile {i}"

    if mixing:
        lam, perm = summary["lam"], summary["perm"]
        assert perm == ref.perm.tolist()
        assert lam == pytest.approx(ref.lam.tolist(), abs=0)
        assert sorted(perm) == list(range(BATCH))
        assert all(p != i for i, p in enumerate(perm)), "a partner is never the sample itself"
        assert all(0.0 <= v <= 1.0 for v in lam)
        if granularity == "batch":
            assert len(set(lam)) == 1
        for i, line in enumerate(summary["captions"]):
            assert line in (f"λ={lam[i]:.2f} ← #{perm[i]}", f"lam={lam[i]:.2f} <- #{perm[i]}")
    else:
        assert summary["lam"] is None and summary["perm"] is None and summary["captions"] == []
        for i in range(BATCH):  # flip: x' is x or its mirror image
            assert np.array_equal(x_aug[i], x[i]) or np.array_equal(x_aug[i], x[i][:, ::-1])


def test_layout_tiles_are_disjoint_and_inside_the_image():
    layout = preview.Layout(n=11, image_size=32, columns=4, captions=True)
    width, height = layout.size
    boxes = []
    for i in range(11):
        for view in ("x", "x'"):
            x, y = layout.tile_origin(i, view)
            assert 0 <= x <= width - layout.tile and 0 <= y <= height - layout.tile
            boxes.append((x, y))
    assert len(set(boxes)) == len(boxes)
    assert layout.groups == 3 and layout.tile == 96


@pytest.mark.parametrize(
    "case, message",
    [
        ("aug none", "--aug none makes no second view x'"),
        ("missing data", "dataset folder not found"),
        ("not png", "the preview is a PNG"),
        ("batch too big", "--batch-size 99 is more than the 18 training images"),
    ],
)
def test_mistakes_are_one_line(case, message, gradients, tmp_path, capsys):
    base = ["preview", "--data", gradients, "--aug", "cutmix", "--out", tmp_path / "g.png",
            "--image-size", SIZE, "--device", "cpu"]  # fmt: skip
    args = {
        "aug none": [*base, "--aug", "none"],
        "missing data": [*base, "--data", tmp_path / "nope"],
        "not png": [*base, "--out", tmp_path / "g.jpg"],
        "batch too big": [*base, "--batch-size", 99],
    }[case]
    code, _, err = run_cli(args, capsys)
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_a_candidate_pool_previews_its_first_view(tmp_path):
    from conftest import make_dataset

    root = make_dataset(tmp_path / "d", n_train=4, n_val=1)
    out = tmp_path / "p.png"
    summary = preview.write_preview(
        root, "cutmixpick", out, batch_size=4, image_size=16, device="cpu"
    )
    assert summary["n"] == 4 and len(summary["lam"]) == 4 and len(summary["perm"]) == 4
    assert sorted(summary["perm"]) == [0, 1, 2, 3]

"""A PNG grid of x and x' for one training batch: what the student is trained on.

The batch comes from :class:`dalikd.recovery.TrainData`, the data training reads, built from a
data plan resolved as training resolves it (:mod:`dalikd.plan`) with the same seed, so the grid
shows exactly the first batch a run with these settings would see. The
pipeline's uint8 pixels are drawn with PIL as they are; each x is labelled with its index in
the batch and its class, each x' of a mixing recipe with λ (the fraction of its own pixels)
and its partner's index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dalikd import recovery
from dalikd.atomic import write_atomic
from dalikd.config import MAX_IMAGE_SIZE, MAX_SEED
from dalikd.data import Dataset
from dalikd.device import resolve_device
from dalikd.errors import DalikdError
from dalikd.ops import GRANULARITIES
from dalikd.plan import DataPlan, resolve_plan
from dalikd.settings import command_config
from dalikd.sources import open_dataset

# Layout, all in px of the PNG.
MIN_TILE = 96  # tiles smaller than this are enlarged by an integer factor (nearest neighbour)
MARGIN = 8  # around the whole grid
LEFT = 22  # the column of row labels ("x", "x'")
GAP = 6  # between columns
ROW_GAP = 2  # between x and its x'
GROUP_GAP = 10  # between groups of rows
MIN_FONT = 12  # text size; grows with the tiles (1/14 of a tile side) so labels stay legible
BACKGROUND = (232, 232, 232)  # light grey: white images stay distinct from the gaps
INK = (30, 30, 30)
MIXED_INK = (170, 40, 40)  # the λ / partner captions


@dataclass(frozen=True)
class PreviewBatch:
    """One training batch as uint8 images, ready to draw."""

    images: np.ndarray  # x: [B, S, S, 3] uint8 RGB, the student's input before normalization
    aug_images: np.ndarray  # x': like images
    labels: list[int]  # class index of each sample
    classes: tuple[str, ...]  # class names, by index
    lam: list[float] | None  # fraction of own pixels in each x' (mixing recipes only)
    perm: list[int] | None  # partner index of each x' (mixing recipes only)
    pool_size: int = 1  # k > 1: aug_images is the first of k candidate views per image

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Layout:
    """Where each tile goes. Samples fill up to ``columns`` columns; each group of columns is
    two rows, x on top and x' below, with the label line above x and the caption line below x'
    (the caption line only for mixing recipes)."""

    n: int  # samples in the batch
    image_size: int  # px, side of the images
    columns: int = 8  # samples per group at most
    captions: bool = False  # a λ / partner line under each x'
    title_lines: int = 1  # the title, wrapped to the grid's width

    @property
    def scale(self) -> int:
        return max(1, math.ceil(MIN_TILE / self.image_size))

    @property
    def tile(self) -> int:
        return self.image_size * self.scale

    @property
    def cols(self) -> int:
        return min(self.n, self.columns)

    @property
    def groups(self) -> int:
        return math.ceil(self.n / self.columns)

    @property
    def font_size(self) -> int:
        return max(MIN_FONT, self.tile // 14)

    @property
    def text_h(self) -> int:
        """A label line: the title, above each x (index, class), below each x' (λ, partner)."""
        return self.font_size + 4

    @property
    def group_h(self) -> int:
        return self.text_h + 2 * self.tile + ROW_GAP + (self.text_h if self.captions else 0)

    @property
    def size(self) -> tuple[int, int]:
        width = 2 * MARGIN + LEFT + self.cols * self.tile + (self.cols - 1) * GAP
        height = (
            2 * MARGIN
            + self.title_lines * self.text_h
            + self.groups * self.group_h
            + (self.groups - 1) * GROUP_GAP
        )
        return width, height

    def tile_origin(self, i: int, view: str) -> tuple[int, int]:
        """(x, y) of the top-left pixel of sample ``i``'s tile; ``view`` is "x" or "x'"."""
        if view not in ("x", "x'"):
            raise ValueError(f"view is 'x' or \"x'\", got {view!r}")
        group, col = divmod(i, self.columns)
        x = MARGIN + LEFT + col * (self.tile + GAP)
        y = MARGIN + self.title_lines * self.text_h + group * (self.group_h + GROUP_GAP)
        y += self.text_h
        return x, y + (self.tile + ROW_GAP if view == "x'" else 0)


def preview_batch(plan: DataPlan, dataset: Dataset | None = None) -> PreviewBatch:
    """The first training batch of ``plan.data.path`` (``dataset``: its scan, if made) with
    the plan's recipe, as training draws it (shard 0)."""
    data = plan.data
    if plan.recipe is None:
        raise DalikdError(
            f"--aug {plan.aug} makes no second view x', so there is nothing to preview; "
            "pick a recipe from `dalikd pipelines`"
        )
    dataset = dataset or open_dataset(data.path)  # a folder of images or a shard set
    if data.batch_size > len(dataset.train):
        raise DalikdError(
            f"--batch-size {data.batch_size} is more than the {len(dataset.train)} training "
            f"images in {dataset.root}"
        )
    # training's own data: its epoch order, a file that fails to decode left out (one warning)
    source = recovery.source_of(dataset.train)  # a folder's files or a shard set's samples
    train = recovery.TrainData(source, plan, epoch=0, on_failure=recovery.LeftOutWarning(
        source.what), preallocate=False)  # fmt: skip
    batch = next(iter(train))
    assert batch.aug_images is not None, "a recipe that returns a View makes x'"
    # A candidate pool (cutmixpick) holds k views per image, view-major; the preview draws the
    # first view of each image: which candidates are kept is decided by the teacher in training.
    b = len(batch)
    return PreviewBatch(
        images=batch.images.cpu().numpy(),  # uint8 NHWC: the pipeline's own pixels
        aug_images=batch.aug_images[:b].cpu().numpy(),
        labels=batch.labels.tolist(),
        classes=dataset.classes,
        lam=None if batch.lam is None else batch.lam[:b].tolist(),
        perm=None if batch.perm is None else batch.perm[:b].tolist(),
        pool_size=batch.pool_size,
    )


def _font(size: int) -> tuple[Any, bool]:
    """(font, has Greek and arrows). PIL's built-in font has neither λ nor ←; DejaVu Sans,
    found on most Linux systems, has both."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        try:
            return ImageFont.load_default(size=size), False
        except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
            return ImageFont.load_default(), False


def caption(lam: float, partner: int, unicode: bool = True) -> str:
    """The line under a mixed x': λ (own pixels) and where the rest comes from."""
    return f"λ={lam:.2f} ← #{partner}" if unicode else f"lam={lam:.2f} <- #{partner}"


def _fit(text: str, font: Any, width: int) -> str:
    """``text`` cut (with "..") to at most ``width`` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` px, broken at spaces (a word wider than a line
    is cut, with "..")."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return [_fit(line, font, width) for line in lines] or [""]


def _enlarge(image: np.ndarray, scale: int) -> Image.Image:
    # Nearest neighbour by an integer factor: every pixel of the batch stays a block of equal
    # pixels, so what the student sees is not blurred (and tests can compare exactly).
    return Image.fromarray(image.repeat(scale, axis=0).repeat(scale, axis=1))


def render_grid(
    batch: PreviewBatch, title: str = "", columns: int = 8
) -> tuple[Image.Image, list[str], list[str]]:
    """The grid as an RGB image, the captions drawn under each x' (empty without mixing) and
    the title's lines (wrapped to the grid's width: a narrow grid gets a taller title)."""
    layout = Layout(len(batch), batch.images.shape[1], columns, captions=batch.lam is not None)
    font, unicode = _font(layout.font_size)
    title_lines = _wrap(title, font, layout.size[0] - 2 * MARGIN)
    layout = replace(layout, title_lines=len(title_lines))
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + k * layout.text_h), line, INK, font)
    captions = []
    for i in range(len(batch)):
        x0, y0 = layout.tile_origin(i, "x")
        _, y1 = layout.tile_origin(i, "x'")
        grid.paste(_enlarge(batch.images[i], layout.scale), (x0, y0))
        grid.paste(_enlarge(batch.aug_images[i], layout.scale), (x0, y1))
        label = f"#{i}: {batch.classes[batch.labels[i]]}"
        draw.text((x0, y0 - layout.text_h + 1), _fit(label, font, layout.tile), INK, font)
        if batch.lam is not None and batch.perm is not None:
            captions.append(caption(batch.lam[i], batch.perm[i], unicode))
            text = _fit(captions[-1], font, layout.tile)
            draw.text((x0, y1 + layout.tile + 1), text, MIXED_INK, font)
        if i % layout.columns == 0:  # row labels, once per group
            for y, name in ((y0, "x"), (y1, "x'")):
                draw.text((MARGIN, y + (layout.tile - layout.font_size) // 2), name, INK, font)
    return grid, captions, title_lines


def write_preview(
    data_path: str | Path,
    aug: str,
    out: str | Path,
    *,
    batch_size: int = 8,
    image_size: int | None = None,
    seed: int = 0,
    granularity: str = "sample",
    device: str = "auto",
    threads: int = 0,
    resize: str = "auto",
) -> dict[str, Any]:
    """Draw x and x' of the first training batch to the PNG ``out``; return a summary:
    ``path, n, size`` (width, height px), ``lam``, ``perm`` (lists, None without mixing),
    ``captions`` (the λ / partner lines drawn) and ``title`` (its lines as drawn).
    The data settings are the dataset's own (dataset.json) where no argument sets them
    (``image_size`` None: the dataset's, else 224)."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise DalikdError(f"--out {out}: the preview is a PNG; name it *.png")
    if out.is_dir():
        raise DalikdError(f"--out {out} is a folder; give a file name such as grid.png")
    if granularity not in GRANULARITIES:
        raise DalikdError(f"granularity '{granularity}'; known: {', '.join(GRANULARITIES)}")
    if image_size is not None and image_size < 16:
        raise DalikdError(f"image size must be at least 16 px, got {image_size}")
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        raise DalikdError(f"image size must be at most {MAX_IMAGE_SIZE} px, got {image_size}")
    if not 0 <= seed <= MAX_SEED:
        raise DalikdError(f"--seed must be in [0, {MAX_SEED}], got {seed}")
    if batch_size < 1:
        raise DalikdError(f"batch size must be positive, got {batch_size}")
    given = {"data.path": str(data_path), "data.batch_size": batch_size, "data.threads": threads,
             "data.resize": resize}  # fmt: skip
    if image_size is not None:
        given["data.image_size"] = image_size
    data = command_config(overrides=given).data
    image_size = data.image_size
    dataset = open_dataset(data.path)  # a folder of images or a shard set
    plan = resolve_plan(data, aug, device=resolve_device(device), seed=seed,
                        granularity=granularity, raw_shape=dataset.raw_shape,
                        validates=False)  # fmt: skip
    batch = preview_batch(plan, dataset)
    title = (
        f"x (top) and x' (below), first training batch: --aug {aug}, granularity "
        f"{granularity}, seed {seed}, {image_size} px"
    )
    if batch.pool_size > 1:
        title += f"; x' shows candidate 1 of {batch.pool_size} (training keeps the teacher's pick)"
    grid, captions, title_lines = render_grid(batch, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: grid.save(f, format="PNG"))
    return {
        "path": str(out),
        "n": len(batch),
        "size": grid.size,
        "lam": batch.lam,
        "perm": batch.perm,
        "captions": captions,
        "title": title_lines,
        "plan": plan.to_dict(),
    }

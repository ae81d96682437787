from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).parent


def colour_of(label: int, index: int) -> tuple[int, int, int]:
    """A distinct RGB colour per (class, image): R encodes the class, G and B the index."""
    return (40 + 60 * label, 10 + 7 * index, 250 - 9 * index)


def make_dataset(
    root: Path,
    classes: tuple[str, ...] = ("cat", "ant", "bee"),
    n_train: int = 8,
    n_val: int = 5,
    size: tuple[int, int] = (40, 48),  # (height, width)
    ext: str = ".png",
) -> Path:
    """Solid-colour images in the ImageNet layout. PNG keeps the colours exact."""
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.empty((*size, 3), np.uint8)
                pixels[:] = colour_of(label, i)
                Image.fromarray(pixels).save(folder / f"img{i:03d}{ext}")
    return root


@pytest.fixture(scope="session")
def solid_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("solid"))


@pytest.fixture
def tiny_env(monkeypatch):
    """Make tests/tiny_models.py importable as 'tiny_models' (also for subprocesses)."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Scan caches and the demo dataset go to a temporary folder, never ~/.cache."""
    import os

    old = os.environ.get("DALIKD_CACHE")
    os.environ["DALIKD_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DALIKD_CACHE", None)
    else:
        os.environ["DALIKD_CACHE"] = old

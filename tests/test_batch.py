"""The torch side of the hand-off: uint8 NHWC -> normalized float NCHW, against NumPy."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dalikd.batch import IMAGENET_MEAN, IMAGENET_STD, normalize
from dalikd.device import prepare_images


def numpy_normalize(images: np.ndarray) -> np.ndarray:
    """(x - mean) / std, NCHW, in float64: the exact values."""
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (images.transpose(0, 3, 1, 2).astype(np.float64) - mean) / std


def assert_normalized(out: torch.Tensor, images: np.ndarray) -> None:
    """Within 2 float32 roundings of the exact value (|values| < 2.7: 2 ulp < 5e-7)."""
    np.testing.assert_allclose(out.numpy(), numpy_normalize(images), rtol=0, atol=5e-7)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_equals_numpy_in_either_memory_format(channels_last):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 7, 11, 3), np.uint8)
    images[0] = 0  # the extremes of the range
    images[1] = 255
    out = normalize(torch.from_numpy(images), channels_last=channels_last)
    assert out.shape == (5, 3, 7, 11) and out.dtype == torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert_normalized(out, images)


def test_normalize_reads_views_without_copying_them_first():
    """A pool's rows and a transposed batch are normalized as the values they show."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 4, 4, 3), np.uint8)
    rows = torch.from_numpy(images)[1::2]  # every second row: not contiguous
    assert_normalized(normalize(rows), images[1::2])


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 4, 4, 3),
        torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
        torch.zeros(4, 4, 3, dtype=torch.uint8),
    ],  # fmt: skip
)
def test_normalize_refuses_anything_but_uint8_nhwc_rgb(bad):
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        normalize(bad)


def test_prepare_images_is_normalize_in_the_device_layout():
    images = torch.randint(0, 256, (2, 5, 5, 3), dtype=torch.uint8)
    out = prepare_images(images, "cpu")
    assert out.dtype == torch.float32 and out.is_contiguous()  # autocast casts per layer
    assert torch.equal(out, normalize(images))


def test_the_model_side_imports_without_dali():
    """Training step, pick, metrics and evaluation import with DALI absent (so torch-side code
    runs and is tested on a machine that lacks it); only building a loader needs DALI."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nvidia.dali' or name.startswith('nvidia.dali.'):\n"
        "            raise ImportError('no DALI here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dalikd.train, dalikd.evaluate, dalikd.pick, dalikd.metrics, dalikd.device\n"
        "assert not any(m.startswith('nvidia.dali') for m in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent  # importable from the checkout, installed or not
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr

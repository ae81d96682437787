"""The CUDA kernel of DalikdMix (dalikd/native/mix_gpu.cu) against NumPy, without DALI.

On a machine with a CUDA GPU, PyTorch and nvcc: ``python -m pytest tests/test_cuda_mix_kernel.py``
(compiles tests/cuda/mix_kernel_shim.cu with the kernel); skipped everywhere else.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "dalikd" / "native"
SHIM = Path(__file__).resolve().parent / "cuda" / "mix_kernel_shim.cu"
CUTMIX, MIXUP = 0, 1  # MixMode in mix.h


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    for candidate in ("nvcc", home and f"{home}/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


NVCC = find_nvcc()
if not torch.cuda.is_available() or NVCC is None:
    pytest.skip("needs a CUDA GPU (torch.cuda) and nvcc", allow_module_level=True)


def nvcc_command(nvcc: str, arch: str, out: Path) -> list[str]:
    """The shim and the kernel in one shared library, for one GPU architecture (e.g. "90")."""
    return [
        nvcc, "-shared", "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        f"-gencode=arch=compute_{arch},code=compute_{arch}",
        f"-I{NATIVE}", str(SHIM), str(NATIVE / "mix_gpu.cu"), "-o", str(out),
    ]  # fmt: skip


def build_shim(folder: Path) -> ctypes.CDLL:
    """Compile the shim and the kernel for this GPU into ``folder``; load the library."""
    major, minor = torch.cuda.get_device_capability()
    out = folder / "libmix_kernel_shim.so"
    cmd = nvcc_command(NVCC, f"{major}{minor}", out)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    lib = ctypes.CDLL(str(out))
    i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    f32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    lib.dalikd_test_launch_mix.argtypes = [
        c_void_p, c_void_p, c_void_p, c_int, c_int, c_int, c_int, c_int,
        i32, i32, i32, i32, i32, f32, c_int,
    ]  # fmt: skip
    lib.dalikd_test_launch_mix.restype = c_int
    return lib


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_shim(tmp_path_factory.mktemp("mix_kernel"))


def launch(lib, images, mode, partner, box, lam):
    """Run the kernel on `images` [N, H, W, C]; per-candidate arguments are [N, k] arrays,
    `box` is (y0, x0, y1, x1). Returns (out [k, N, H, W, C], lambda [N, k]) as NumPy."""
    n, h, w, c = images.shape
    k = partner.shape[1]
    dev = torch.from_numpy(np.ascontiguousarray(images)).cuda()
    out = torch.full((k, n, h, w, c), 7, dtype=torch.uint8, device="cuda")  # any unwritten byte
    lam_out = torch.full((n, k), float("nan"), dtype=torch.float32, device="cuda")  # shows
    torch.cuda.synchronize()

    def arg(a, dtype):
        a = np.ascontiguousarray(a, dtype)
        assert a.shape == (n, k)
        return a

    y0, x0, y1, x1 = (arg(b, np.int32) for b in box)
    rc = lib.dalikd_test_launch_mix(
        dev.data_ptr(), out.data_ptr(), lam_out.data_ptr(), n, k, h, w, c,
        arg(partner, np.int32), y0, x0, y1, x1, arg(lam, np.float32), mode,
    )  # fmt: skip
    assert rc == 0, f"CUDA error {rc}"
    return out.cpu().numpy(), lam_out.cpu().numpy()


# -- NumPy references (mix.h: CutMixBox; mix_cpu.cc: PasteBox, Blend) ----------------------------


def cutmix_box(cy: int, cx: int, lam, h: int, w: int) -> tuple[int, int, int, int, np.float32]:
    """CutMixBox in its float32 arithmetic: half = floor(S·√(1 − λ)) // 2 per axis, the box
    [c − half, c + half) clipped, λ = 1 − float(area) / float(H·W). Returns (y0, x0, y1, x1, λ)."""
    r = np.sqrt(np.float32(1) - np.float32(lam))
    half_y = int(np.floor(np.float32(h) * r)) // 2
    half_x = int(np.floor(np.float32(w) * r)) // 2
    y0, y1 = min(max(cy - half_y, 0), h), min(max(cy + half_y, 0), h)
    x0, x1 = min(max(cx - half_x, 0), w), min(max(cx + half_x, 0), w)
    box_lam = np.float32(1) - np.float32((y1 - y0) * (x1 - x0)) / np.float32(h * w)
    return y0, x0, y1, x1, box_lam


def paste_ref(images, partner, box):
    """PasteBox: the own image with [y0, y1) x [x0, x1) from the partner. [k, N, H, W, C]."""
    n, k = partner.shape
    out = np.empty((k, *images.shape), np.uint8)
    for i in range(n):
        for j in range(k):
            y0, x0, y1, x1 = (int(b[i, j]) for b in box)
            out[j, i] = images[i]
            out[j, i, y0:y1, x0:x1] = images[partner[i, j], y0:y1, x0:x1]
    return out


def blend_ref(images, partner, lam):
    """Blend in float32: v = x·λ + p·(1 − λ), then floor(v + 0.5) saturated. [k, N, H, W, C]."""
    lam = lam.astype(np.float32).T[:, :, None, None, None]  # [k, N, 1, 1, 1]
    x = images.astype(np.float32)[None]
    p = images[partner.T].astype(np.float32)
    v = x * lam + p * (np.float32(1) - lam)
    return np.floor(np.clip(v + np.float32(0.5), np.float32(0), np.float32(255))).astype(np.uint8)


def random_partners(rng, n: int, k: int) -> np.ndarray:
    """[N, k] partners, never the sample itself."""
    return ((np.arange(n)[:, None] + rng.integers(1, n, (n, k))) % n).astype(np.int32)


def cutmix_draws(rng, n, k, h, w, lam):
    """Random centres (on the border too) and the boxes and lambdas CutMixBox makes of them."""
    cy, cx = rng.integers(0, h + 1, (n, k)), rng.integers(0, w + 1, (n, k))
    boxes = [[cutmix_box(int(cy[i, j]), int(cx[i, j]), lam[i, j], h, w) for j in range(k)]
             for i in range(n)]  # fmt: skip
    arr = np.array(boxes, dtype=object)
    y0, x0, y1, x1 = (arr[..., t].astype(np.int32) for t in range(4))
    return (y0, x0, y1, x1), arr[..., 4].astype(np.float32)


SHAPES = [(8, 224, 224, 3), (8, 37, 53, 3), (5, 9, 13, 1), (4, 20, 30, 4)]


# -- tests -----------------------------------------------------------------------------------------


def test_the_box_reference_follows_yun_et_al():
    # Full box at lambda 0 (clipped by the border), none at lambda 1, and the float32 half sides.
    assert cutmix_box(112, 112, 0.0, 224, 224) == (0, 0, 224, 224, np.float32(0))
    assert cutmix_box(0, 0, 0.0, 224, 224) == (0, 0, 112, 112, np.float32(0.75))
    assert cutmix_box(10, 20, 1.0, 37, 53)[:4] == (10, 20, 10, 20)
    y0, x0, y1, x1, _ = cutmix_box(18, 26, 0.5, 37, 53)
    assert (y1 - y0, x1 - x0) == (26, 36)  # floor(37·0.7071) = 26, floor(53·0.7071) = 37 → 36


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cutmix_equals_the_numpy_reference(lib, shape):
    n, h, w, c = shape
    k, rng = 2, np.random.default_rng(sum(shape))
    images = rng.integers(0, 256, shape, np.uint8)
    partner = random_partners(rng, n, k)
    lam = rng.beta(1.0, 1.0, (n, k)).astype(np.float32)
    lam[0, 0], lam[1, 1], lam[2, 0] = 0.0, 1.0, 0.5  # full box, empty box, half
    box, box_lam = cutmix_draws(rng, n, k, h, w, lam)
    box[0][0, 0] = box[1][0, 0] = 0  # one full, unclipped box: the partner's whole image
    box[2][0, 0], box[3][0, 0], box_lam[0, 0] = h, w, 0.0

    out, lam_out = launch(lib, images, CUTMIX, partner, box, box_lam)
    np.testing.assert_array_equal(out, paste_ref(images, partner, box))
    np.testing.assert_array_equal(out[0, 0], images[partner[0, 0]])
    np.testing.assert_array_equal(lam_out, box_lam)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mixup_equals_the_float32_numpy_reference(lib, shape):
    n, h, w, c = shape
    k, rng = 2, np.random.default_rng(100 + sum(shape))
    images = rng.integers(0, 256, shape, np.uint8)
    partner = random_partners(rng, n, k)
    lam = rng.random((n, k), dtype=np.float32)
    lam[0, 0], lam[0, 1], lam[1, 0], lam[1, 1] = 0.0, 1.0, 0.5, 0.5  # halves: x + p odd
    lam[2, 0], lam[2, 1] = 0.3, 0.77

    out, lam_out = launch(lib, images, MIXUP, partner, ((np.zeros((n, k)),) * 4), lam)
    ref = blend_ref(images, partner, lam)
    np.testing.assert_array_equal(out, ref)
    # out[j, i] is candidate j of sample i, drawn with lam[i, j].
    np.testing.assert_array_equal(out[0, 0], images[partner[0, 0]])  # lambda 0: the partner
    np.testing.assert_array_equal(out[1, 0], images[0])  # lambda 1: the own image
    both = images[1].astype(np.int32) + images[partner[1, 0]]
    assert (both % 2 == 1).any()  # v = m + 0.5 exactly, which rounds up
    np.testing.assert_array_equal(out[0, 1], ((both + 1) // 2).astype(np.uint8))
    np.testing.assert_array_equal(lam_out, lam)


def test_an_empty_box_copies_the_own_image(lib):
    n, h, w, c = 4, 24, 31, 3
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (n, h, w, c), np.uint8)
    partner = np.array([[1, 2, 3], [2, 3, 0], [3, 0, 1], [0, 1, 2]], np.int32)
    k = partner.shape[1]
    # Per candidate j: h = 0 (w > 0), w = 0 (h > 0), both 0; at varied positions.
    y0 = np.array([[5, 0, 3]] * n, np.int32)
    x0 = np.array([[4, 7, 30]] * n, np.int32)
    y1 = np.array([[5, 24, 3]] * n, np.int32)
    x1 = np.array([[20, 7, 30]] * n, np.int32)
    lam = np.ones((n, k), np.float32)
    out, lam_out = launch(lib, images, CUTMIX, partner, (y0, x0, y1, x1), lam)
    for j in range(k):
        np.testing.assert_array_equal(out[j], images)
    np.testing.assert_array_equal(lam_out, lam)


@pytest.mark.parametrize("mode", [CUTMIX, MIXUP], ids=["cutmix", "mixup"])
def test_large_images_stride_over_the_grid(lib, mode):
    # 512·512 pixels: far more than the kernel's 64 blocks of 256 threads per candidate.
    n, h, w, c, k = 6, 512, 512, 3, 3
    rng = np.random.default_rng(7 + mode)
    images = rng.integers(0, 256, (n, h, w, c), np.uint8)
    partner = random_partners(rng, n, k)
    lam = rng.beta(1.0, 1.0, (n, k)).astype(np.float32)
    lam[0, 0] = 0.0
    if mode == CUTMIX:
        box, lam = cutmix_draws(rng, n, k, h, w, lam)
        ref = paste_ref(images, partner, box)
    else:
        box, ref = (np.zeros((n, k)),) * 4, blend_ref(images, partner, lam)
    out, lam_out = launch(lib, images, mode, partner, box, lam)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(lam_out, lam)


def test_more_candidates_than_one_grid_holds_are_launched_in_chunks(lib):
    # gridDim.y is at most 65535 (one candidate per row): 40000 samples x 2 go in two launches.
    n, h, w, c, k = 40_000, 2, 2, 3, 2
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (n, h, w, c), np.uint8)
    partner = random_partners(rng, n, k)
    lam = rng.random((n, k), dtype=np.float32)
    out, lam_out = launch(lib, images, MIXUP, partner, (np.zeros((n, k)),) * 4, lam)
    np.testing.assert_array_equal(out, blend_ref(images, partner, lam))
    np.testing.assert_array_equal(lam_out, lam)

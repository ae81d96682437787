"""Which file format `dalikd data import` writes: images per CPU second of a DALI CPU pipeline
doing what training does, format against format, measured side by side in one run.

The pipeline is the training pipeline's data path for CIFAR / Tiny-ImageNet: read one file per
image (``fn.readers.file``, global shuffle) -> get uint8 HWC pixels -> pad-crop (4 px at 32²,
8 px at 64²) + flip (``dalikd.ops.crop_flip``) -> x' = CutMix (``dalikd.ops.cutmix``), with
x, x', λ and labels as outputs. Only the second step differs:

- ``png``: the image as PNG (what a CIFAR PNG export holds), decoded by ``fn.decoders.image``;
- ``jpeg``: the image as JPEG (what Tiny-ImageNet's zip holds), decoded the same way;
- ``raw``: the uint8 HWC pixels as they are, no header (``.hwc``), ``fn.reshape`` in the graph;
- ``npy``: the same pixels in a ``.npy`` file, read by ``fn.readers.numpy`` (which takes no
  labels: only for the comparison; it would need a second reader for them).

The images are random windows of scikit-image's colour photographs downscaled to the side
(natural content, so PNG/JPEG sizes are realistic: real CIFAR-100 PNGs are ~2.3 KB). The
formats take turns in short windows (A, B, C, A, B, C, ...) and each one's CPU time is the
process's (all DALI threads) over its windows: images per CPU second is steadier than wall
time on a shared machine.

    python benchmarks/cifar_format.py                  # 32² (CIFAR) and 64² (Tiny-ImageNet)
    python benchmarks/cifar_format.py --sizes 32 --windows 9
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from dalikd import native as native_op
from dalikd import ops

PAD = {32: 4, 64: 8}  # the reference's RandomCrop padding at each side
ENCODED = {32: "png", 64: "jpeg"}  # what each dataset's official files would give
SUFFIX = {"raw": "hwc", "jpeg": "JPEG"}  # file extension of a format (else its name)


def photographs() -> list[np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        sys.exit('this benchmark needs scikit-image: pip install -e ".[bench]"')
    names = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
             "retina", "rocket")  # fmt: skip
    return [getattr(data, name)() for name in names]


def make_images(count: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` side² RGB images: random windows (48-160 px) of the photographs, downscaled."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in photographs()]
    images = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        w = int(rng.integers(max(48, side), 160))
        x0, y0 = rng.integers(photo.width - w), rng.integers(photo.height - w)
        window = photo.resize((side, side), Image.LANCZOS, box=(x0, y0, x0 + w, y0 + w))
        images.append(np.asarray(window.convert("RGB")))
    return images


def write_formats(root: Path, images: list[np.ndarray], side: int) -> dict[str, list[str]]:
    """One folder per format, the same images in each; the file lists."""
    files: dict[str, list[str]] = {}
    encoded = ENCODED[side]
    for fmt in (encoded, "raw", "npy"):
        (root / fmt).mkdir(parents=True)
        files[fmt] = []
        for i, pixels in enumerate(images):
            path = root / fmt / f"{i:06d}.{SUFFIX.get(fmt, fmt)}"
            if fmt == "raw":
                path.write_bytes(pixels.tobytes())
            elif fmt == "npy":
                np.save(path, pixels)
            else:
                buf = io.BytesIO()  # PIL's defaults: PNG level 6, JPEG quality 75
                Image.fromarray(pixels).save(buf, "PNG" if fmt == "png" else "JPEG")
                path.write_bytes(buf.getvalue())
            files[fmt].append(str(path))
    return files


def pixels(fmt: str, files: list[str], side: int, shuffle: bool = True):
    """uint8 HWC images and int32 labels of ``fmt``'s files (labels: 0 for npy)."""
    labels = [i % 100 for i in range(len(files))]
    if fmt == "npy":
        images = fn.readers.numpy(files=files, shuffle_after_epoch=shuffle, pad_last_batch=True)
        return fn.reshape(images, layout="HWC"), fn.constant(idata=0, dtype=types.INT32)
    data, label = fn.readers.file(
        files=files, labels=labels, shuffle_after_epoch=shuffle, pad_last_batch=True
    )
    if fmt == "raw":
        return fn.reshape(data, shape=[side, side, 3], layout="HWC"), label
    return fn.decoders.image(data, device="cpu", output_type=types.RGB), label


def build(fmt: str, files: list[str], side: int, batch: int, threads: int, native: bool):
    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1)
    def graph():
        images, labels = pixels(fmt, files, side)
        images = ops.crop_flip(images, side, pad=PAD[side])
        mixed, lam, _ = ops.cutmix(images, side, native=native)
        return images, mixed, lam, labels

    pipe = graph()
    pipe.build()
    return pipe


def measure(pipes: dict, batch: int, windows: int, seconds: float) -> dict[str, dict]:
    """Interleaved windows; per format: images, CPU seconds, wall seconds."""
    totals = {fmt: {"images": 0, "cpu": 0.0, "wall": 0.0} for fmt in pipes}
    for pipe in pipes.values():  # warm-up: allocations, the first file reads
        for _ in range(3):
            pipe.run()
    for _ in range(windows):
        for fmt, pipe in pipes.items():
            cpu0, wall0, runs = time.process_time(), time.perf_counter(), 0
            while time.perf_counter() - wall0 < seconds:
                pipe.run()
                runs += 1
            totals[fmt]["cpu"] += time.process_time() - cpu0
            totals[fmt]["wall"] += time.perf_counter() - wall0
            totals[fmt]["images"] += runs * batch
    return totals


def check_same_pixels(files: dict[str, list[str]], side: int) -> None:
    """Every format decodes to the same pixels (lossless ones exactly): the comparison is fair."""
    for fmt in files:
        pipe = pipeline_def(batch_size=4, num_threads=1, device_id=None)(
            lambda fmt=fmt: pixels(fmt, files[fmt][:4], side, shuffle=False)[0]
        )()
        pipe.build()
        got = [np.asarray(t) for t in pipe.run()[0]]
        if fmt != "jpeg":
            want = [np.fromfile(f, np.uint8).reshape(side, side, 3) for f in files["raw"][:4]]
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), fmt
        else:
            assert all(g.shape == (side, side, 3) for g in got), fmt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64", help="image sides to measure (32, 64)")
    parser.add_argument("--images", type=int, default=4096, help="files per format")
    parser.add_argument("--batch-size", type=int, default=64, help="the reference's batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--window-seconds", type=float, default=1.5)
    parser.add_argument(
        "--mixing", choices=("auto", "native", "composed"), default="auto",
        help="CutMix's pixel work, as `dalikd train --mixing`",
    )  # fmt: skip
    args = parser.parse_args()
    native = native_op.resolve(args.mixing, "cpu") == "native"
    print(f"load average at the start (1, 5, 15 min): {os.getloadavg()}; {os.cpu_count()} "
          f"cores, {args.threads} DALI threads, batch {args.batch_size}, "
          f"mixing {'native' if native else 'composed'}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dalikd-format-") as tmp:
        for side in (int(s) for s in args.sizes.split(",")):
            images = make_images(args.images, side)
            files = write_formats(Path(tmp) / str(side), images, side)
            check_same_pixels(files, side)
            pipes = {fmt: build(fmt, f, side, args.batch_size, args.threads, native)
                     for fmt, f in files.items()}  # fmt: skip
            totals = measure(pipes, args.batch_size, args.windows, args.window_seconds)
            report(side, files, totals)
    print(
        f"load average at the end (1, 5, 15 min): {os.getloadavg()}; ratios come from "
        "interleaved windows of one run, absolute rates from a machine others may share"
    )


def report(side: int, files: dict[str, list[str]], totals: dict[str, dict]) -> None:
    encoded = ENCODED[side]
    print(f"\n{side}x{side} px, pad {PAD[side]}: read -> pixels -> pad-crop + flip -> CutMix")
    print(f"{'format':<8}{'KB/file':>9}{'img/CPU s':>12}{'CPU us/img':>12}{'img/s wall':>12}")
    rates = {}
    for fmt, t in totals.items():
        kb = np.mean([os.path.getsize(f) for f in files[fmt]]) / 1e3
        rates[fmt] = t["images"] / t["cpu"]
        print(f"{fmt:<8}{kb:>9.2f}{rates[fmt]:>12,.0f}{1e6 / rates[fmt]:>12.1f}"
              f"{t['images'] / t['wall']:>12,.0f}")  # fmt: skip
    print(
        f"raw / {encoded}: {rates['raw'] / rates[encoded]:.2f}x images per CPU second; "
        f"npy / raw: {rates['npy'] / rates['raw']:.2f}x"
    )


if __name__ == "__main__":
    main()

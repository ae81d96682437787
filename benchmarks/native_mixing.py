"""Composed vs native mixing on CPU: the training loader's images/s with and without the fused
operator, in one run, on real photographs.

    pip install -e ".[bench]"           # scikit-image: the photographs (no download)
    python benchmarks/native_mixing.py  # --threads 2 --batch-size 32 --image-size 224

Builds (once) the recropped JPEG photo set of benchmarks/profile_photos.py (its builder is
reused when that file is there; otherwise an equivalent one here), then measures, interleaved
window by window so drift hits every row alike, ``dalikd.loaders.train_loader`` (decode,
random-resized crop, flip, the uint8 hand-off to torch) for:

    plain                 x only (no second view)
    cutmix composed/native          x + one CutMix view
    cutmixpick composed/native      x + a pool of k = 2 CutMix views
    2 views, no mixing    x + two unmixed copies: what emitting (copying and handing over) two
                          more images costs by itself, mixing aside

The composed path is DALIKD_NATIVE=0 (permute_batch + multi_paste per view); native is
DALIKD_NATIVE=1 (one fn.dalikd_mix call for all views). Each row is measured three ways: DALI's
outputs alone (``pipe.run()``: the pipeline); through the loader (what training gets: DALI plus
the hand-off to torch, where a pool's views are concatenated view-major); and through the loader
plus the normalization to float that the training step does on its device
(``dalikd.device.prepare_batch``; on this CPU-only machine, on the CPU), in wall time and in CPU
time (every thread of this process: robust to other jobs on a shared machine). Throughput
counts x images per second, the median over the windows; each overhead is the median of
per-window ratios against plain. A last table times the mixing graphs alone (draws + pixel
work) on decoded images in memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
          "retina", "rocket")  # fmt: skip


def photo_set(per_class: int) -> Path:
    """The JPEG set of benchmarks/profile_photos.py, built by its code when present."""
    from dalikd.cache import cache_dir

    shared = HERE / "profile_photos.py"
    if shared.is_file():
        spec = importlib.util.spec_from_file_location("profile_photos", shared)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_photo_set(cache_dir() / module.VERSION, per_class, val_per_class=5)
    return _own_photo_set(cache_dir() / "native-bench-photos", per_class)


def _own_photo_set(root: Path, per_class: int) -> Path:
    """Random windows of scikit-image's colour photographs, ~500x375, JPEG quality 90."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data
    except ImportError:
        sys.exit("this benchmark needs scikit-image: pip install scikit-image")
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(per_class):
        return root
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)())
        for split, count in (("train", per_class), ("val", 5)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = (500, 375) if rng.random() < 0.5 else (375, 500)
                fit = min(photo.width / w, photo.height / h, 1.0)
                w, h = int(w * fit), int(h * fit)
                x0 = rng.uniform(0, photo.width - w)
                y0 = rng.uniform(0, photo.height - h)
                window = photo.crop((int(x0), int(y0), int(x0) + w, int(y0) + h))
                window.save(folder / f"{name}_{i:04d}.JPEG", quality=90)
    done.write_text(str(per_class))
    return root


def two_plain_views(images, ctx):
    """x' = two unmixed copies of x, as a pool: the emission cost of two views alone. Two
    different copy operators: DALI merges identical operators on the same input."""
    from nvidia.dali import fn, types

    from dalikd.recipes import Pool, View

    return Pool((View(fn.copy(images)), View(fn.cast(images, dtype=types.UINT8))))


def _mark_pool(fn):
    """two_plain_views as a pool recipe of 2 views (the data plan counts on its views)."""
    from dalikd.recipes import recipe

    return recipe("two_plain_views", "two unmixed copies of x", pool=True)(fn)


ROWS = (  # name, --aug, DALIKD_NATIVE
    ("plain (x only)", None, "0"),
    ("cutmix, composed", "cutmix", "0"),
    ("cutmix, native", "cutmix", "1"),
    ("cutmixpick pool k=2, composed", "cutmixpick", "0"),
    ("cutmixpick pool k=2, native", "cutmixpick", "1"),
    ("2 views, no mixing (emission only)", two_plain_views, "0"),
)


def mixing_alone(batch: int, size: int, threads: int, windows: int) -> dict[str, float]:
    """ms per batch of the mixing graph alone (draws + pixel work) on uint8 images already in
    memory, each variant interleaved with the others; "copy" is a one-copy floor."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    from dalikd import ops

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(batch)]
    bodies = {
        "copy (floor)": lambda x: (fn.copy(x),),
        "mixup, composed": lambda x: ops.mixup(x, native=False)[:1],
        "mixup, native": lambda x: ops.mixup(x, native=True)[:1],
        "cutmix, composed": lambda x: ops.cutmix(x, size, native=False)[:1],
        "cutmix, native": lambda x: ops.cutmix(x, size, native=True)[:1],
        "cutmixpick pool k=2, composed": lambda x: tuple(
            v[0] for v in ops.cutmix_pool(x, size, 2, native=False)
        ),
        "cutmixpick pool k=2, native": lambda x: tuple(
            v[0] for v in ops.cutmix_pool(x, size, 2, native=True)
        ),
    }
    pipes = {}
    for name, body in bodies.items():

        def graph(body=body):
            return body(fn.external_source(source=lambda: images, batch=True, layout="HWC"))

        pipes[name] = pipeline_def(graph)(
            batch_size=batch, num_threads=threads, device_id=None, seed=0
        )
        pipes[name].build()
        for _ in range(3):
            pipes[name].run()
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(windows):
        for name, pipe in pipes.items():
            for _ in range(2):
                pipe.run()
            start = time.perf_counter()
            for _ in range(10):
                pipe.run()
            times[name].append((time.perf_counter() - start) / 10 * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def concat_cost(batch: int, size: int, k: int = 2, repeats: int = 10) -> float:
    """ms of the loader's view-major torch.cat of k [B, S, S, 3] uint8 views."""
    import torch

    parts = [torch.randint(256, (batch, size, size, 3), dtype=torch.uint8) for _ in range(k)]
    torch.cat(parts)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.cat(parts)
    return (time.perf_counter() - start) / repeats * 1000


def forever(loader):
    """Batches across epoch ends (the loader resets itself)."""
    while True:
        yield from loader


def normalized(loader):
    """The loader's batches as the training step gets them: normalized to float32 NCHW."""
    from dalikd.device import prepare_batch

    for batch in forever(loader):
        yield prepare_batch(batch, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--per-class", type=int, default=120, help="train images per photo")
    parser.add_argument("--windows", type=int, default=9)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per window")
    args = parser.parse_args()

    import torch

    from dalikd import loaders, native
    from dalikd.config import DataConfig
    from dalikd.data import scan_dataset
    from dalikd.plan import resolve_plan

    torch.set_num_threads(1)  # the main thread only moves batches; DALI owns the cores
    dataset = scan_dataset(photo_set(args.per_class))
    data = DataConfig(path=str(dataset.root), image_size=args.image_size,
                      batch_size=args.batch_size, threads=args.threads)  # fmt: skip
    status = native.load()
    if not status.cpu:
        sys.exit(f"the native operator is unavailable here: {status.reason}")

    streams = {}  # (row, "loader" | "dali") -> an endless batch source
    for name, aug, mode in ROWS:
        os.environ["DALIKD_NATIVE"] = mode  # read where the data plan is resolved
        recipe = aug if isinstance(aug, str) or aug is None else _mark_pool(aug)
        plan = resolve_plan(data, recipe, device="cpu")
        streams[name, "loader"] = forever(loaders.train_loader(dataset.train, plan))
        streams[name, "normalized"] = normalized(loaders.train_loader(dataset.train, plan))
        pipe, _ = loaders.build_pipeline(loaders.train_graph, plan, seed=0, split=dataset.train,
                                         shard_id=0, num_shards=1)  # fmt: skip
        pipe.build()
        streams[name, "dali"] = iter(pipe.run, None)  # DALI's outputs only, no torch hand-off
        for key in ((name, "loader"), (name, "normalized"), (name, "dali")):
            for _ in range(3):  # warm up: allocations, first epoch start
                next(streams[key])

    # Per window: images/s of wall time, and CPU ms per image (all of this process's threads:
    # robust to other jobs on a shared machine, which wall time is not)
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in streams}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in streams}
    images = args.batches * args.batch_size
    for _ in range(args.windows):
        for key, stream in streams.items():
            for _ in range(3):  # drain what this pipeline prefetched while the others ran
                next(stream)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in itertools.islice(stream, args.batches):
                pass
            rates[key].append(images / (time.perf_counter() - start))
            cpu[key].append(1000 * (time.process_time() - start_cpu) / images)

    def overhead(name: str, kind: str, cost: str) -> float:
        """Median over windows of the extra cost per image against plain in the same window
        (drift between windows cancels)."""
        if cost == "wall":
            pairs = zip(rates[ROWS[0][0], kind], rates[name, kind], strict=True)
            return statistics.median(100 * (p / r - 1) for p, r in pairs)
        pairs = zip(cpu[ROWS[0][0], kind], cpu[name, kind], strict=True)
        return statistics.median(100 * (r / p - 1) for p, r in pairs)

    cores = len(os.sched_getaffinity(0))
    print(f"\n{len(dataset.train)} JPEGs ({dataset.root}), batch {args.batch_size}, "
          f"{args.image_size} px, DALI CPU, {args.threads} threads, {cores} cores, "
          f"{args.windows} windows x {args.batches} batches; overhead = extra wall time or "
          "CPU time per image vs plain\n")  # fmt: skip
    kinds = (("dali", "DALI alone"), ("loader", "+ hand-off"), ("normalized", "+ normalize"))
    print("| pipeline | " + " | ".join(f"{label} img/s | wall | CPU" for _, label in kinds) + " |")
    print("|---|" + "---|---|---|" * len(kinds))
    for name, _, _ in ROWS:
        cells = []
        for kind, _ in kinds:
            cells += [f"{statistics.median(rates[name, kind]):.0f}",
                      f"{overhead(name, kind, 'wall'):+.1f}%",
                      f"{overhead(name, kind, 'cpu'):+.1f}%"]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nplain: {statistics.median(cpu[ROWS[0][0], 'loader']):.2f} CPU ms per image "
          "through the loader")  # fmt: skip

    batch_ms = 1000 * args.batch_size / statistics.median(rates[ROWS[0][0], "loader"])
    print(f"\nMixing alone (draws + pixel work on uint8 {args.image_size} px images in memory), "
          f"ms per batch of {args.batch_size}; share = of the plain loader's {batch_ms:.1f} ms "
          "per batch\n")  # fmt: skip
    print("| graph | ms per batch | share of a plain batch |")
    print("|---|---|---|")
    alone = mixing_alone(args.batch_size, args.image_size, args.threads, args.windows)
    for name, ms in alone.items():
        print(f"| {name} | {ms:.2f} | {100 * ms / batch_ms:.1f}% |")
    cat = concat_cost(args.batch_size, args.image_size)
    print(f"\nThe loader's view-major torch.cat of a k = 2 pool (uint8): {cat:.1f} ms per batch "
          f"({100 * cat / batch_ms:.1f}% of a plain batch)")  # fmt: skip


if __name__ == "__main__":
    main()

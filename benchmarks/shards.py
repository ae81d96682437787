"""Shards vs a folder of image files, side by side in one run (issue 25).

1. **The training hand-off**: the loader training builds for an epoch (``dalikd.recovery``: the
   epoch's order drawn by dalikd, a folder's files or a shard set's samples read in it through
   the source's loader; DALI's CPU pipeline: read -> decode + random crop -> resize -> flip) to
   a normalized ``Batch`` (``prepare_batch``), from
   the same JPEGs as an ImageNet-style folder (DALI's file reader: an open per file) and as
   tar shards (``dalikd data shard``; DALI's webdataset reader: a few large files, memory-
   mapped). The two take turns in ``--windows`` windows of ``--batches`` batches each; before
   each window every file of that source is dropped from the page cache with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed: it drops a file's clean pages that
   no one maps) and the resident share is measured with ``mincore`` before and after, so the
   output says whether the drop worked. Per window: the start-up to the first batch (what a
   training start does: open the dataset -- a folder: list and stat every file, its scan
   verdicts cached; a shard set: read the manifest, stat the shards, their checksums
   cached -- build the pipeline, take one batch), then images/s and CPU ms per image over the
   remaining batches (process CPU time: every DALI thread).
2. **Listing and scan cost** at ``--files`` tiny files vs the same number of samples in shards:
   the folder's listing alone, its first scan (every file checked) and a re-scan (cached
   verdicts: a stat per file), and DALI's pipeline start over the file list; the shard set's
   open (manifest, a stat per shard), its first checksum check and a cached one, and DALI's
   pipeline start over the index files.

    python benchmarks/shards.py --dir /tmp/shardbench            # 2 DALI threads

Dentries and inodes stay cached (dropping them needs root: /proc/sys/vm/drop_caches), so the
listing is a warm one; on a network filesystem each file's metadata is a round trip and the
folder's listing and stats cost far more than here.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dalikd import recovery
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.device import prepare_batch
from dalikd.plan import resolve_plan
from dalikd.shardcheck import verify_shards
from dalikd.shardwrite import shard_dataset
from dalikd.sources import open_dataset

# -- the page cache ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PAGE = os.sysconf("SC_PAGE_SIZE")
PROT_READ, MAP_SHARED = 1, 1


def resident(paths: list[Path]) -> float:
    """The share of the pages of ``paths`` in the page cache (mincore on a mapping of each)."""
    pages = cached = 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        n = -(-size // PAGE)
        with open(path, "rb") as f:
            addr = _libc.mmap(None, size, PROT_READ, MAP_SHARED, f.fileno(), 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            vec = (ctypes.c_ubyte * n)()
            try:
                if _libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {path}")
            finally:
                _libc.munmap(addr, size)
        pages += n
        cached += sum(v & 1 for v in vec)
    return cached / max(pages, 1)


def drop(paths: list[Path]) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (no root needed). Only clean pages
    go: files just written are synced first."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- the data ----------------------------------------------------------------------------------


def jpeg(rng: np.random.Generator, side: tuple[int, int]) -> bytes:
    """Upscaled noise as a JPEG (quality 90): photo-like sizes, every image different."""
    small = rng.integers(0, 255, (side[0] // 8, side[1] // 8, 3), np.uint8)
    image = Image.fromarray(small).resize((side[1], side[0]), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path, images: int, side: tuple[int, int], classes: int = 10) -> int:
    """``images`` train JPEGs (and one val image per class); returns the bytes written."""
    rng = np.random.default_rng(0)
    written = 0
    for split, n in (("train", images // classes), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                data = jpeg(rng, side)
                (folder / f"{i:06d}.JPEG").write_bytes(data)
                written += len(data)
    return written


def files_of(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*") if p.is_file())


# -- 1. the hand-off ---------------------------------------------------------------------------


def epoch_loader(dataset, plan, epoch: int = 0):
    """What training reads in ``epoch`` on one rank (recovery.TrainData itself): the epoch's
    reads in dalikd's order, through the split's source (a shard set's: index files of exactly
    those samples), built at the first batch."""
    return recovery.TrainData(recovery.source_of(dataset.train), plan, epoch=epoch)


def window(data: Path, batches: int, threads: int) -> dict[str, float]:
    """Start-up to the first batch, then ``batches`` more: images/s and CPU ms per image."""
    t0 = time.perf_counter()
    dataset = open_dataset(data, verify=True)  # what a training start does before its loader
    cfg = DataConfig(path=str(data), image_size=112, batch_size=64, threads=threads)
    plan = resolve_plan(cfg, device="cpu", seed=0)
    epoch = 0
    it = iter(epoch_loader(dataset, plan, epoch))
    prepare_batch(next(it), "cpu")
    start = time.perf_counter() - t0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    done = 0
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:  # an epoch ended: the next begins
            epoch += 1
            it = iter(epoch_loader(dataset, plan, epoch))
            continue
        prepare_batch(batch, "cpu")
        done += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = batches * plan.data.batch_size
    del it
    return {"start_s": start, "img_s": n / wall, "cpu_ms": 1e3 * cpu / n}


def handoff(root: Path, images: int, windows: int, batches: int, threads: int) -> None:
    folder, shards = root / "folder", root / "shards"
    if not (folder / "train").is_dir():
        size = make_folder(folder, images, (375, 500))
        print(f"{images:,} JPEGs of 500x375 (mean {size / images / 1e3:.0f} KB) in {folder}")
    if not (shards / "dataset.json").is_file():
        shard_dataset(folder, shards, shard_size=64 << 20)
    sources = {"folder": folder, "shards": shards}
    paths = {name: files_of(p) for name, p in sources.items()}
    open_dataset(folder), open_dataset(shards, verify=True)  # scan verdicts, checksums cached
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
    for name in sources:  # untimed: imports, the native operators' build, first allocations
        window(sources[name], 2, threads)
    print(f"\nthe training hand-off, {threads} DALI threads, batch 64, 112², "
          f"{windows} windows of {batches} batches each, taking turns")  # fmt: skip
    for w in range(windows):
        order = list(sources) if w % 2 == 0 else list(reversed(sources))
        for name in order:
            before = resident(paths[name])
            drop(paths[name])
            after = resident(paths[name])
            r = window(sources[name], batches, threads)
            r.update(before=before, after=after)
            runs[name].append(r)
            print(f"  window {w + 1} {name:6s} cached {before:4.0%} -> {after:4.0%}   "
                  f"start {r['start_s']:5.2f} s   {r['img_s']:6.1f} img/s   "
                  f"{r['cpu_ms']:5.2f} CPU ms/img")  # fmt: skip
    med = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
           for name, rs in runs.items()}  # fmt: skip
    f, s = med["folder"], med["shards"]
    print("  median:")
    for name, m in med.items():
        print(f"    {name:6s} start to first batch {m['start_s']:.2f} s, {m['img_s']:.1f} img/s, "
              f"{m['cpu_ms']:.2f} CPU ms/img (page cache after the drop: "
              f"{m['after']:.0%})")  # fmt: skip
    print(
        f"    shards / folder: img/s {s['img_s'] / f['img_s']:.2f}x, CPU per image "
        f"{s['cpu_ms'] / f['cpu_ms']:.2f}x, start-up {s['start_s'] / f['start_s']:.2f}x"
    )


# -- 2. listing and scan at many files --------------------------------------------------------


def tiny_folder(root: Path, files: int, classes: int = 100) -> None:
    data = jpeg(np.random.default_rng(1), (16, 16))
    per = files // classes
    for split, n in (("train", per), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:06d}.JPEG").write_bytes(data)


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - t0, time.process_time() - c0


def first_batch(data: Path, dataset) -> float:
    """The start of an epoch over the split: its order drawn (a shard set: index files of it
    written), the pipeline built, one batch of 64 read and decoded."""
    cfg = DataConfig(path=str(data), image_size=16, batch_size=64, threads=2)
    plan = resolve_plan(cfg, device="cpu", seed=0)
    t0 = time.perf_counter()
    next(iter(epoch_loader(dataset, plan)))
    return time.perf_counter() - t0


def listing(root: Path, files: int) -> None:
    folder, shards = root / "many", root / "many-shards"
    if not (folder / "train").is_dir():
        _, dt, _ = timed(lambda: tiny_folder(folder, files))
        print(f"\n{files:,} tiny JPEGs ({len(jpeg(np.random.default_rng(1), (16, 16)))} B) "
              f"written in {dt:.0f} s")  # fmt: skip
    if not (shards / "dataset.json").is_file():
        _, dt, _ = timed(lambda: shard_dataset(folder, shards, shard_size=64 << 20))
        print(f"dalikd data shard of them: {dt:.0f} s (once)")
    rows = []
    cache = Path(os.environ["DALIKD_CACHE"])
    shutil.rmtree(cache / "scans", ignore_errors=True)
    shutil.rmtree(cache / "shards", ignore_errors=True)
    ds, dt, cpu = timed(lambda: scan_dataset(folder, check=False))
    n = len(ds.train) + len(ds.val)
    rows.append(("folder: listing only", dt, cpu))
    ds, dt, cpu = timed(lambda: scan_dataset(folder))
    rows.append(("folder: first scan (listing + check)", dt, cpu))
    ds, dt, cpu = timed(lambda: scan_dataset(folder))
    rows.append(("folder: re-scan (listing + stat, cached)", dt, cpu))
    rows.append(("folder: DALI start to first batch", first_batch(folder, ds), None))
    sh, dt, cpu = timed(lambda: open_dataset(shards))
    rows.append(("shards: open (manifest, a stat per shard)", dt, cpu))
    tars = sorted(shards.glob("*.tar"))
    _, dt, cpu = timed(lambda: [verify_shards(split, cache_root=cache)
                                for split in (sh.train, sh.val)])  # fmt: skip
    rows.append((f"shards: first sha256 check ({len(tars)} tars)", dt, cpu))
    _, dt, cpu = timed(lambda: open_dataset(shards, verify=True))
    rows.append(("shards: open + checksums (cached)", dt, cpu))
    rows.append(("shards: DALI start to first batch", first_batch(shards, sh), None))
    mb = sum(p.stat().st_size for p in tars) / 1e6
    print(f"\nlisting and scan: {n:,} files vs {len(sh.train) + len(sh.val):,} samples in "
          f"{len(tars)} shards ({mb:.0f} MB)")  # fmt: skip
    for label, dt, cpu in rows:
        cpu_text = f"  CPU {cpu:6.2f} s" if cpu is not None else ""
        print(f"  {label:44s} {dt:7.2f} s{cpu_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="kept between runs if given")
    parser.add_argument("--images", type=int, default=4_000, help="JPEGs for the hand-off")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--batches", type=int, default=30, help="batches per window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--files", type=int, default=100_000, help="tiny files for the listing")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="dalikd-shards-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["DALIKD_CACHE"] = str(root / "cache")
    warnings.simplefilter("ignore")  # DALI's notes on pipelines built per window
    try:
        handoff(root, args.images, args.windows, args.batches, args.threads)
        if args.files:
            listing(root, args.files)
    finally:
        if args.dir is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()

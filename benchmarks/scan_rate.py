"""How fast the data scan (dalikd.datacheck) goes, in files per second.

Writes N copies of one 500x375 JPEG into an ImageNet-style folder, then
times ``scan_dataset`` three ways: first scan (every file checked), re-scan (verdicts from the
cache, files only stat'ed) and first scan with ``decode=True``.

    python benchmarks/scan_rate.py --files 50000 --dir /tmp/scanbench

The files were just written, so they sit in the page cache: the first-scan rate is the CPU
cost, not a cold disk's. On a cold network filesystem the reads (two per file) dominate.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dalikd.data import scan_dataset


def make_folder(root: Path, files: int, classes: int = 100) -> None:
    rng = np.random.default_rng(0)
    # Upscaled noise at 500x375, quality 90: ~60 KB (ImageNet averages ~110 KB).
    small = rng.integers(0, 255, (47, 63, 3), np.uint8)
    image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    per_class = files // classes
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:06d}.JPEG").write_bytes(data)
    print(f"{files:,} files of {len(data) / 1e3:.0f} KB in {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--decode-files", type=int, default=2_000, help="files for decode=True")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="dalikd-scan-"))
    cache = Path(tempfile.mkdtemp(prefix="dalikd-scan-cache-"))
    os.environ["DALIKD_CACHE"] = str(cache)
    try:
        if not (root / "train").is_dir():
            make_folder(root, args.files)
        rows = []
        for label in ("first scan", "re-scan (cached)"):
            t = time.perf_counter()
            ds = scan_dataset(root)
            dt = time.perf_counter() - t
            n = len(ds.train) + len(ds.val)
            rows.append((label, n, n / dt))
        small = Path(tempfile.mkdtemp(prefix="dalikd-scan-dec-"))
        make_folder(small, args.decode_files)
        t = time.perf_counter()
        ds = scan_dataset(small, decode=True)
        dt = time.perf_counter() - t
        n = len(ds.train) + len(ds.val)
        rows.append(("first scan, decode=True", n, n / dt))
        shutil.rmtree(small)
        print(f"cpu cores: {os.cpu_count()}")
        for label, n, rate in rows:
            print(f"{label:26s} {n:>9,} files  {rate:>10,.0f} files/s  "
                  f"(ImageNet's 1.33M files: {1_331_167 / rate / 60:.1f} min)")  # fmt: skip
    finally:
        shutil.rmtree(cache)
        if args.dir is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()

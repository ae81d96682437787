"""How fast the data scan (dalikd.datacheck) goes, in files per second, and what one file's
check costs in reads.

Writes N copies of one 500x375 JPEG into an ImageNet-style folder, then:

1. the check per file, side by side: the scan's check before issue 23/24 (a 16-byte head and a
   4 KiB tail through Python's buffered file: the JPEG end marker anywhere in the tail) and
   now (`datacheck._inspect`: one fstat, a 4 KiB head, a 512-byte tail through os.pread; the
   end marker within the last 32 bytes, the header's image size, regular files only). Each
   runs the same file list in the same thread pool as the scan, alternately (before, after,
   before, after); reported per file: CPU time, read syscalls and bytes read (the process's
   /proc/self/io), and the ratio;
2. ``scan_dataset`` three ways: first scan (every file checked), re-scan (verdicts from the
   cache, files only stat'ed) and first scan with ``decode=True`` (``--decode-files`` files).

    python benchmarks/scan_rate.py --files 100000 --sparse --dir /tmp/scanbench

The files were just written, so they sit in the page cache: the rates are the CPU cost, not a
cold disk's; on a cold network filesystem the reads per file dominate. ``--sparse`` writes each
file at the JPEG's full size but only its first and last 8 KiB on disk (a hole between), so
100,000 files take 1.6 GB of page cache, not 6; the check reads nothing else.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dalikd import datacheck
from dalikd.data import scan_dataset

KEEP = 8192  # bytes of each end written with --sparse


def jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    # Upscaled noise at 500x375, quality 90: ~60 KB (ImageNet averages ~110 KB).
    small = rng.integers(0, 255, (47, 63, 3), np.uint8)
    image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path, files: int, classes: int = 100, sparse: bool = False) -> None:
    data = jpeg_bytes()
    per_class = files // classes
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{i:06d}.JPEG"
                if not sparse:
                    path.write_bytes(data)
                    continue
                with open(path, "wb") as f:
                    f.write(data[:KEEP])
                    f.seek(len(data) - KEEP)
                    f.write(data[-KEEP:])
    how = " (sparse: head and tail on disk)" if sparse else ""
    print(f"{files:,} files of {len(data) / 1e3:.0f} KB in {root}{how}")


def check_before(path: str) -> str | None:
    """The scan's per-file check before issue 23/24 (dalikd at d91f5b2), for comparison."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 4096))
            tail = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    fmt = datacheck.sniff(head)
    if fmt is None:
        return "not an image (unknown file header)"
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    return None


def check_after(path: str) -> str | None:
    reason, width, height = datacheck._inspect(path, False)
    return reason or datacheck.too_many_pixels(width, height, datacheck.MAX_PIXELS)


def _io() -> tuple[int, int]:
    """(read syscalls, bytes read) of this process so far (Linux)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["rchar"])


def time_check(check, files: list[str]) -> dict[str, float]:
    """One pass of ``check`` over ``files`` in the scan's thread pool."""
    (calls0, bytes0), cpu0, wall0 = _io(), time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        bad = sum(r is not None for r in pool.map(check, files, chunksize=256))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    calls, read = (a - b for a, b in zip(_io(), (calls0, bytes0), strict=True))
    assert bad == 0, f"{bad} good files left out"
    n = len(files)
    return {"files_s": n / wall, "cpu_us": 1e6 * cpu / n, "reads": calls / n, "bytes": read / n}


def compare_checks(root: Path, rounds: int = 2) -> None:
    files = sorted(str(p) for p in root.rglob("*.JPEG"))
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(rounds):  # interleaved, so both see the same machine
        for name, check in (("before", check_before), ("after", check_after)):
            runs[name].append(time_check(check, files))
    print(f"\nthe check per file ({len(files):,} files, {rounds} rounds each, interleaved; "
          "median of the rounds)")  # fmt: skip
    med = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
           for name, rs in runs.items()}  # fmt: skip
    for name, m in med.items():
        print(f"  {name:7s} {m['files_s']:>9,.0f} files/s  {m['cpu_us']:6.1f} µs CPU/file  "
              f"{m['reads']:.2f} reads/file  {m['bytes'] / 1024:6.2f} KiB read/file")  # fmt: skip
    b, a = med["before"], med["after"]
    print(
        f"  after/before: CPU per file {a['cpu_us'] / b['cpu_us']:.2f}x, reads per file "
        f"{a['reads'] / b['reads']:.2f}x, bytes per file {a['bytes'] / b['bytes']:.2f}x"
    )


def scan_rates(root: Path, decode_files: int) -> None:
    rows = []
    for label in ("first scan", "re-scan (cached)"):
        t = time.perf_counter()
        ds = scan_dataset(root)
        dt = time.perf_counter() - t
        n = len(ds.train) + len(ds.val)
        rows.append((label, n, n / dt))
    small = Path(tempfile.mkdtemp(prefix="dalikd-scan-dec-"))
    try:
        make_folder(small, decode_files)
        t = time.perf_counter()
        ds = scan_dataset(small, decode=True)
        dt = time.perf_counter() - t
    finally:
        shutil.rmtree(small)
    n = len(ds.train) + len(ds.val)
    rows.append(("first scan, decode=True", n, n / dt))
    print(f"\nscan_dataset (cpu cores: {os.cpu_count()})")
    for label, n, rate in rows:
        print(f"  {label:26s} {n:>9,} files  {rate:>10,.0f} files/s  "
              f"(ImageNet's 1.33M files: {1_331_167 / rate / 60:.1f} min)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--sparse", action="store_true", help="write only each file's ends")
    parser.add_argument("--decode-files", type=int, default=2_000, help="files for decode=True")
    parser.add_argument("--rounds", type=int, default=2, help="passes of each check")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="dalikd-scan-"))
    cache = Path(tempfile.mkdtemp(prefix="dalikd-scan-cache-"))
    os.environ["DALIKD_CACHE"] = str(cache)
    try:
        if not (root / "train").is_dir():
            make_folder(root, args.files, sparse=args.sparse)
        compare_checks(root, args.rounds)
        scan_rates(root, args.decode_files)
    finally:
        shutil.rmtree(cache)
        if args.dir is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()

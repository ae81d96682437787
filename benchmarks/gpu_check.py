"""One command that checks dalikd's DALI GPU path on a GPU: ``python benchmarks/gpu_check.py
--out DIR`` (≤ 5 minutes on one H200, no network; see benchmarks/GPU_CHECK.md).

Prints one line per case as it finishes, ``ok|FAIL <case> <detail>``, and rewrites
``DIR/gpu_check.json`` after every case (a killed run leaves what it had):
``{"gpu", "driver", "cuda", "torch", "dali", "device", "cases": [{"name", "ok", "detail"}],
"efficiency": {aug: fed KD step / KD step on synthetic tensors}}``.

Cases: ``doctor`` (builds the native operator and runs its GPU backend on the GPU); ``jpegs``
(synthetic JPEGs of mixed sizes with CMYK, grayscale and progressive ones, every one decoded);
``profile`` (``dalikd profile``, R34 -> R18, batch 256: data-loading efficiency for none,
cutmix, cutmixpick); ``train`` (1 epoch of ``dalikd train --aug cutmixpick``); ``torchrun``
(the same under ``torchrun --nproc_per_node 1``: a process group of one, NCCL on GPU, DDP; ok
only when train says it joined one); ``recovery`` (two files that pass the scan but fail the
device's decoder in training: found, reported, left out); ``checkpoint`` (restore gives the same
next batch);
``exact/<op>/<path>`` (MixUp and CutMix, native and composed, on injected draws with halves and
empty, clipped and full boxes, against NumPy); ``same/<aug>/<granularity>`` (native vs
composed: bit-identical, or the largest difference); ``loader/<aug>/<path>/<granularity>``
(train_loader for every built-in recipe, native and composed mixing, chosen by
``DataConfig.mixing``, 3 batches: device, dtype, shape, value range). train, torchrun and
profile run ``--mixing auto`` and say the path they resolved.

Every case but the JPEG set-up runs in a child process with its own timeout (a hang or a crash
in DALI, NCCL or the plugin becomes a FAIL line), and all of them share a time budget
(``--budget``, 290 s): a case that would start after it is reported FAIL, not run. A case's
timeout also leaves each case still to come its ``RESERVE`` seconds, so one slow case cannot
starve the rest; and by default the cases run in ``CASES`` order, the data-loading efficiency
(``profile``) right after the set-up and the long ``loader`` matrix last. Each case's seconds
go to ``"seconds"`` in the JSON, to plan the next lease.
Without CUDA, ``--device gpu`` (the default) prints one line and exits 0. ``--device cpu`` is a
dry run of this script's logic on CPU with tiny sizes (its results say nothing about GPUs;
give it ``--budget 1200`` on a slow machine).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CASES = (
    "doctor",
    "jpegs",
    "profile",
    "train",
    "torchrun",
    "recovery",
    "checkpoint",
    "exact",
    "same",
    "loader",
)
# Seconds on one H200 that each case is expected to need at least: what a case's timeout must
# leave for the cases after it (scaled like the timeouts in the CPU dry run). 275 of the 290.
RESERVE = {"doctor": 30, "jpegs": 10, "profile": 80, "train": 30, "torchrun": 30,
           "recovery": 15, "checkpoint": 10, "exact": 10, "same": 20, "loader": 40}  # fmt: skip
MIXING = ("mixup", "cutmix", "cutmixpick")
MARK = "@@case "  # a child's result line: MARK + {"name", "ok", "detail"}


# -- synthetic data (parent, PIL only) -----------------------------------------------------------


def _save_jpeg(job: tuple[Path, int, int, int]) -> str:
    """One smooth noisy image, 64-500 px a side; i % 7 picks CMYK (0), grayscale (1),
    progressive (2) or plain RGB. Returns its kind."""
    path, c, i, seed = job
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(64, 500, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * c % 256)], -1)
    pixels = np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    image, options, kind = Image.fromarray(pixels), {"quality": 90}, "rgb"
    if i % 7 == 0:
        image, kind = image.convert("CMYK"), "cmyk"
    elif i % 7 == 1:
        image, kind = image.convert("L"), "gray"
    elif i % 7 == 2:
        options, kind = {"quality": 90, "progressive": True}, "progressive"
    image.save(path, **options)
    return kind


def make_jpegs(root: Path, classes: int, per_class: int, val_per_class: int) -> dict[str, int]:
    """``root/{train,val}/c<i>/<j>.jpg`` (see :func:`_save_jpeg`), made by a process pool.
    Returns how many of each kind."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{i}.jpg", c, i, len(jobs) + i) for i in range(n)]
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        made = list(pool.map(_save_jpeg, jobs, chunksize=16))
    return {k: made.count(k) for k in ("rgb", "cmyk", "gray", "progressive")}


# -- the cases, run in children (python gpu_check.py --child CASE ...) ---------------------------


def report(name: str, ok: bool, detail: str) -> None:
    print(MARK + json.dumps({"name": name, "ok": bool(ok), "detail": detail}), flush=True)


def sizes(device: str) -> dict[str, int]:
    return {"image_size": 64, "batch_size": 32} if device == "gpu" else {
        "image_size": 32, "batch_size": 4}  # fmt: skip


def _loader(data_root: Path, device: str, aug: str, granularity: str, seed: int = 0,
            mixing: str = "auto", pool_size: int = 2, checkpoint=None):  # fmt: skip
    """train_loader on the mixing path ``mixing`` (DataConfig.mixing: auto|native|composed),
    its data plan resolved as training resolves one (a saved state's paths win over auto)."""
    from dalikd import loaders
    from dalikd.config import DataConfig
    from dalikd.data import scan_dataset
    from dalikd.plan import resolve_plan

    data = DataConfig(path=str(data_root), threads=2, mixing=mixing, **sizes(device))
    plan = resolve_plan(data, aug, device=device, seed=seed, granularity=granularity,
                        pool_size=pool_size, dali_state=checkpoint)  # fmt: skip
    return loaders.train_loader(scan_dataset(data_root).train, plan, checkpoint=checkpoint)


def check_batch(batch, device: str, aug: str, mixing: bool, pool: int) -> str:
    """'' when the batch has the right device, dtype, shape and value ranges, else what not."""
    import torch

    n, s = sizes(device)["batch_size"], sizes(device)["image_size"]
    want = "cuda" if device == "gpu" else "cpu"
    problems = []
    tensors = {"images": batch.images, "labels": batch.labels, "aug_images": batch.aug_images,
               "lam": batch.lam, "perm": batch.perm}  # fmt: skip
    for name, t in tensors.items():
        if t is not None and t.device.type != want:
            problems.append(f"{name} on {t.device}")
    if batch.images.dtype != torch.uint8 or tuple(batch.images.shape) != (n, s, s, 3):
        problems.append(f"images {batch.images.dtype} {tuple(batch.images.shape)}")
    if aug != "none":
        x2 = batch.aug_images
        if x2 is None or x2.dtype != torch.uint8 or tuple(x2.shape) != (n * pool, s, s, 3):
            problems.append("aug_images " + ("missing" if x2 is None else f"{tuple(x2.shape)}"))
    if int(batch.images.max()) == 0:
        problems.append("images all zero")
    if mixing:
        if batch.lam is None or batch.perm is None:
            return "; ".join([*problems, "lam/perm missing"])
        lam, perm = batch.lam.float().cpu(), batch.perm.cpu()
        if lam.shape != (n * pool,) or not bool(((lam >= 0) & (lam <= 1)).all()):
            problems.append(f"lam {tuple(lam.shape)} in [{lam.min():.3f}, {lam.max():.3f}]")
        if perm.dtype != torch.int64 or not bool(((perm >= 0) & (perm < n)).all()):
            problems.append(f"perm {perm.dtype} in [{perm.min()}, {perm.max()}]")
    elif batch.lam is not None:
        problems.append("lam from a non-mixing recipe")
    return "; ".join(problems)


def child_loader(data_root: Path, device: str, chosen) -> None:
    from dalikd.recipes import builtin_recipes, recipe_info

    for aug, recipe in builtin_recipes().items():
        mixing = recipe_info(recipe).mixing
        for path in ("native", "composed") if mixing else ("composed",):
            for granularity in ("sample", "batch"):
                name = f"loader/{aug}/{path}/{granularity}"
                if not chosen(name):
                    continue
                try:
                    pool = 2 if aug == "cutmixpick" else 1
                    loader = _loader(data_root, device, aug, granularity, mixing=path,
                                     pool_size=pool)  # fmt: skip
                    batches = [b for _, b in zip(range(3), loader, strict=False)]
                    bad = [check_batch(b, device, aug, mixing, pool) for b in batches]
                    bad = [b for b in bad if b]
                    ok = len(batches) == 3 and not bad
                    report(name, ok, bad[0] if bad else f"{len(batches)} batches ok")
                except Exception as e:
                    report(name, False, f"{type(e).__name__}: {_line(e)}")


def child_same(data_root: Path, device: str, chosen) -> None:
    import torch

    for aug in MIXING:
        for granularity in ("sample", "batch"):
            name = f"same/{aug}/{granularity}"
            if not chosen(name):
                continue
            try:
                runs = {}
                for path in ("native", "composed"):
                    loader = _loader(data_root, device, aug, granularity, seed=3, mixing=path)
                    runs[path] = [b for _, b in zip(range(2), loader, strict=False)]
                diffs = []
                for a, b in zip(runs["native"], runs["composed"], strict=True):
                    for field in ("images", "aug_images", "lam", "perm", "labels"):
                        x, y = getattr(a, field), getattr(b, field)
                        if not torch.equal(x, y):
                            diff = (x.double() - y.double()).abs().max().item()
                            diffs.append(f"{field} differ (max |diff| {diff:g})")
                report(name, not diffs, diffs[0] if diffs else "bit-identical (2 batches)")
            except Exception as e:
                report(name, False, f"{type(e).__name__}: {_line(e)}")


def child_checkpoint(data_root: Path, device: str, chosen) -> None:
    import torch

    first = _loader(data_root, device, "cutmixpick", "sample", seed=5)
    batches = iter(first)
    next(batches)
    saved = first.checkpoint()
    expected = next(batches)
    resumed = next(iter(_loader(data_root, device, "cutmixpick", "sample", seed=5,
                                checkpoint=saved)))  # fmt: skip
    fields = ("images", "labels", "aug_images", "lam", "perm")
    differ = [f for f in fields if not torch.equal(getattr(resumed, f), getattr(expected, f))]
    same = "the restored loader's first batch equals the saved one's next (cutmixpick)"
    report("checkpoint", not differ, "differ: " + ", ".join(differ) if differ else same)


def mixing_reference(op: str, x, lam, perm, centres):
    """NumPy's MixUp / CutMix of ``x`` (n, S, S, 3) uint8 on the given draws: ``(images, λ)``.
    MixUp: float32 ``x·λ + x[perm]·(1 − λ)``, then ``floor(v + 0.5)``; CutMix: Yun et al.'s box,
    half = floor(S·√(1 − λ)) // 2, [c − half, c + half) clipped, λ = 1 − area / S² (dalikd.ops)."""
    f32 = np.float32
    n, s = x.shape[0], x.shape[1]
    if op == "mixup":
        lam = np.asarray(lam, f32).reshape(n, 1, 1, 1)
        v = x.astype(f32) * lam + x[perm].astype(f32) * (f32(1) - lam)
        return np.floor(v + f32(0.5)).astype(np.uint8), np.asarray(lam, f32).ravel()
    out, lam_out = x.copy(), np.empty(n, f32)
    for i, (cy, cx) in enumerate(centres):
        half = int(np.floor(f32(s) * np.sqrt(f32(1) - f32(lam[i])))) // 2
        y0, y1, x0, x1 = max(cy - half, 0), min(cy + half, s), max(cx - half, 0), min(cx + half, s)
        out[i, y0:y1, x0:x1] = x[perm[i], y0:y1, x0:x1]
        lam_out[i] = f32(1) - f32((y1 - y0) * (x1 - x0)) / f32(s * s)
    return out, lam_out


def child_exact(data_root: Path, device: str, chosen) -> None:
    from nvidia.dali import fn, pipeline_def

    from dalikd import ops

    s = 16
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (8, s, s, 3), np.uint8)
    perm = [3, 2, 4, 5, 1, 0, 7, 6]
    lams = {
        "mixup": [0.5, 0.5, 0.25, 0.75, 0.1, 0.9, 0.0, 1.0],  # halves: x + x[perm] odd
        "cutmix": [1.0, 1.0, 0.999, 0.99, 0.5, 0.0, 0.3, 0.9],
    }  # 4 empty boxes, then real
    centres = [(5, 5), (0, 0), (15, 15), (8, 3), (9, 14), (8, 8), (0, 15), (7, 7)]

    def arg(values, dtype):
        return fn.external_source(source=lambda: [np.asarray(v, dtype) for v in values],
                                  batch=True)  # fmt: skip

    for op in ("mixup", "cutmix"):
        for path in ("native", "composed"):
            name = f"exact/{op}/{path}"
            if not chosen(name):
                continue
            try:

                def graph(op=op, path=path):
                    images = fn.external_source(source=lambda: list(x), batch=True, layout="HWC")
                    images = images.gpu() if device == "gpu" else images
                    kw = dict(lam=arg(lams[op], np.float32), perm=arg(perm, np.int32),
                              native=path == "native")  # fmt: skip
                    if op == "mixup":
                        mixed, lam, _ = ops.mixup(images, **kw)
                    else:
                        mixed, lam, _ = ops.cutmix(images, s, centre=arg(centres, np.int32), **kw)
                    return mixed, lam

                pipe = pipeline_def(graph, batch_size=8, num_threads=1, seed=0,
                                    device_id=0 if device == "gpu" else None)()  # fmt: skip
                pipe.build()
                got, got_lam = (np.asarray(o.as_cpu().as_array() if hasattr(o, "as_cpu")
                                else o.as_array()) for o in pipe.run())  # fmt: skip
                want, want_lam = mixing_reference(op, x, lams[op], perm, centres)
                bad = [i for i in range(8) if not np.array_equal(got[i], want[i])]
                bad_lam = [i for i in range(8) if got_lam.ravel()[i] != want_lam[i]]
                if bad or bad_lam:
                    diff = int(np.abs(got.astype(int) - want.astype(int)).max())
                    report(name, False, f"samples {bad} differ from NumPy (max |diff| {diff}), "
                           f"lam differs at {bad_lam}")  # fmt: skip
                else:
                    report(name, True, f"equal to NumPy on {device}: 8 samples, lam too")
            except Exception as e:
                report(name, False, f"{type(e).__name__}: {_line(e)}")


def child_jpegs(data_root: Path, device: str, chosen) -> None:
    from dalikd import loaders
    from dalikd.config import DataConfig
    from dalikd.data import scan_dataset

    split = scan_dataset(data_root).val
    data = DataConfig(path=str(data_root), threads=2, **sizes(device))
    seen, flat = 0, 0
    from dalikd.plan import resolve_plan

    for batch in loaders.val_loader(split, resolve_plan(data, device=device)):
        seen += len(batch)
        flat += int((batch.images.amax(dim=(1, 2, 3)) == batch.images.amin(dim=(1, 2, 3))).sum())
    ok = seen == len(split.files) and flat == 0
    report("jpegs", ok, f"{seen}/{len(split.files)} decoded on {device}, {flat} flat")


def child_main(args) -> None:
    patterns = args.select.split(",") if args.select else ["*"]

    def chosen(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    {"loader": child_loader, "same": child_same, "checkpoint": child_checkpoint,
     "jpegs": child_jpegs, "exact": child_exact}[args.child](Path(args.data), args.device,
                                                            chosen)  # fmt: skip


def _line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


# -- the parent: runs cases, prints, records -----------------------------------------------------


class Check:
    def __init__(self, out: Path, device: str, budget_s: float):
        self.out, self.device = out, device
        self.deadline = time.monotonic() + budget_s
        # the CPU dry run checks logic, on a slower machine: its cases get more time
        self.timeout_scale = 3 if device == "cpu" else 1
        self.result = {**versions(device), "device": device, "cases": [], "efficiency": {},
                       "seconds": {}}  # fmt: skip
        self.pending: list[str] = []  # the top-level cases still to come after the current one

    def record(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'ok' if ok else 'FAIL'} {name} {detail}", flush=True)
        self.result["cases"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.save()

    def save(self) -> None:
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")

    def timeout(self, nominal_s: float, left_s: float) -> float:
        """A case's timeout: its nominal seconds (scaled), but no more than what leaves every
        case still to come its RESERVE, and never under 5 s (or the nominal, or what is left)."""
        nominal_s *= self.timeout_scale
        later = self.timeout_scale * sum(RESERVE.get(c, 0) for c in self.pending)
        return max(min(nominal_s, left_s - later), min(nominal_s, left_s, 5.0))

    def run(self, case: str, cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple:
        """Run a child; relay its MARK lines as cases. Returns (returncode or None on timeout,
        the last lines of its output)."""
        left = self.deadline - time.monotonic()
        if left < 5:
            self.record(case, False, "not run: the time budget (--budget) was spent")
            return None, ""
        timeout_s = self.timeout(timeout_s, left)
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )  # fmt: skip
        tail: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(MARK):
                    c = json.loads(line[len(MARK) :])
                    self.record(c["name"], c["ok"], c["detail"])
                else:
                    tail.append(line.rstrip())
                    del tail[:-200]  # doctor --json is ~30 lines, warnings may come with it

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = None
        reader.join(timeout=5)
        self.result["seconds"][case] = round(time.monotonic() - started, 1)
        self.save()
        if code is None:
            self.record(case, False, f"timed out after {timeout_s:.0f} s: {_last(tail)}")
        return code, "\n".join(tail)

    def child(self, case: str, data: Path, timeout_s: float, select: list[str]) -> None:
        before = len(self.result["cases"])
        cmd = [sys.executable, __file__, "--child", case, "--data", str(data),
               "--device", self.device, "--select", ",".join(select)]  # fmt: skip
        code, tail = self.run(case, cmd, timeout_s)
        if code not in (0, None) or (code == 0 and len(self.result["cases"]) == before):
            self.record(case, False, f"exited {code}: {_last(tail.splitlines())}")


def _last(lines: list[str]) -> str:
    """The line that says what went wrong: the last error line (``XError: ...`` or dalikd's
    ``error: ...``, torchrun's ``[rank0]:`` prefix dropped), else the last unindented one."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln) for ln in lines]
    errors = [ln for ln in lines if re.match(r"(\w+(Error|Exception)|error):", ln)]
    useful = errors or [ln for ln in lines if ln.strip() and not ln.startswith(" ")]
    return (useful or lines or ["no output"])[-1][:300]


def versions(device: str) -> dict:
    import torch

    info = {"gpu": None, "driver": None, "cuda": torch.version.cuda, "torch": torch.__version__}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError as e:
        info["dali"] = f"unavailable: {e}"
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def dalikd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dalikd", *args]


def case_doctor(check: Check) -> None:
    code, out = check.run("doctor", dalikd("doctor", "--json"), 180)
    if code is None:
        return
    try:  # the JSON starts on a line of its own; warnings may come before or after it
        start = next(i for i, ln in enumerate(out.splitlines()) if ln.startswith("{"))
        text = "\n".join(out.splitlines()[start:])
        info = json.JSONDecoder().raw_decode(text)[0]
    except (StopIteration, ValueError):
        check.record("doctor", False, f"exited {code}: {_last(out.splitlines())}")
        return
    backend = info.get("gpu_backend", "")
    if check.device == "gpu":
        ok = code == 0 and backend.startswith("verified on")
        check.record(
            "doctor", ok, f"GPU backend: {backend}; mixing on gpu: {info['mixing']['gpu']}"
        )
    else:
        ok = code == 0 and info["mixing"]["cpu"] == "native"
        check.record("doctor", ok, f"mixing on cpu: {info['mixing']['cpu']}")


def undecodable_jpegs(good: bytes) -> dict[str, bytes]:
    """Two files that pass dalikd's scan (JPEG head, end-of-image marker near the tail) but
    fail to decode, from one good JPEG: its frame header set to 0 x 0 pixels; and the file cut
    inside its scan, with a thumbnail segment (APP1) ahead whose end-of-image marker then lies
    in the last 4 KiB."""
    zero = bytearray(good)
    at = zero.find(b"\xff\xc0")  # start of frame: length (2), precision (1), height, width
    zero[at + 5 : at + 9] = b"\x00\x00\x00\x00"
    thumb = b"Exif\x00\x00" + good[:2] + b"\xff\xd9"  # SOI + EOI: an (empty) thumbnail
    app1 = b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    cut = (good[:2] + app1 + good[2:])[: len(app1) + good.find(b"\xff\xda") + 300]
    return {"zero_size.jpg": bytes(zero), "cut_in_scan.jpg": cut}


def case_recovery(check: Check, data: Path, runs: Path) -> None:
    """A run over 2 classes plus two files that fail to decode only in training: the decode
    failure of the device's decoder is found, the files left out and reported, the epoch done."""
    root = runs.parent / "bad_data"
    for split in ("train", "val"):
        for c in ("c0", "c1"):
            shutil.copytree(data / split / c, root / split / c)
    good = next(iter(sorted((root / "train" / "c0").glob("*.jpg")))).read_bytes()
    files = undecodable_jpegs(good).items()
    bad = {root / "train" / c / name: body
           for c, (name, body) in zip(("c0", "c1"), files, strict=True)}  # fmt: skip
    for path, body in bad.items():
        path.write_bytes(body)
    size = sizes(check.device)
    run = runs / "recovery"
    cmd = dalikd("train", "--data", str(root), "--device", check.device, "--aug", "none",
                 "--student", "resnet18", "--epochs", "1", "--batch-size",
                 str(max(2, size["batch_size"] // 4)), "--image-size", str(size["image_size"]),
                 "--threads", "2", "--out", str(run))  # fmt: skip
    code, tail = check.run("recovery", cmd, 60)
    if code is None:
        return
    try:
        report = (run / "data_report.tsv").read_text(errors="replace")
    except OSError:
        report = ""
    found = [p.name for p in bad if f"{p}\tfailed in training" in report]
    ok = code == 0 and len(found) == len(bad)
    detail = (f"left out in training, the epoch done: {', '.join(found)}" if ok else
              f"exited {code}; reported {found or 'none'}: {_last(tail.splitlines())}")  # fmt: skip
    check.record("recovery", ok, detail)


def case_train(check: Check, data: Path, teacher: Path, runs: Path, torchrun: bool) -> None:
    name = "torchrun" if torchrun else "train"
    size = sizes(check.device)
    # --mixing auto: the native operator where it runs (doctor says whether), else composed
    args = ["train", "--data", str(data), "--device", check.device, "--aug", "cutmixpick",
            "--mixing", "auto",
            "--teacher", "resnet18", "--teacher-weights", str(teacher), "--student", "resnet18",
            "--epochs", "1", "--batch-size", str(size["batch_size"]), "--image-size",
            str(size["image_size"]), "--threads", "2", "--out", str(runs / name)]  # fmt: skip
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "1", "-m", "dalikd", *args]  # fmt: skip
    else:
        cmd = dalikd(*args)
    code, tail = check.run(name, cmd, 90)
    if code is None:
        return
    done = code == 0 and (runs / name / "last.pt").exists()
    try:
        mixing = json.loads((runs / name / "config.json").read_text())["data"]["mixing"]
    except (OSError, ValueError, KeyError, TypeError):
        mixing = "?"
    what = f"1 epoch, mixing {mixing}"
    if torchrun:  # the group train joined, as it says: "distributed: 1 rank(s), nccl, DDP"
        backend = "nccl" if check.device == "gpu" else "gloo"
        said = [ln for ln in tail.splitlines() if "distributed:" in ln]
        done = done and any(f", {backend}, DDP" in ln for ln in said)
        what = f"{what}; {said[-1].split('distributed: ')[-1] if said else 'no process group'}"
    check.record(name, done, what if code == 0 else f"exited {code}: {_last(tail.splitlines())}")


def case_profile(check: Check, data: Path) -> None:
    path = check.out / "profile.json"
    if check.device == "gpu":
        models = ["--teacher", "resnet34", "--student", "resnet18", "--batch-size", "256",
                  "--image-size", "224", "--windows", "3", "--window-seconds", "1"]  # fmt: skip
    else:
        models = ["--teacher", "resnet18", "--student", "resnet18", "--batch-size", "4",
                  "--image-size", "32", "--windows", "1", "--window-seconds", "0.1",
                  "--warmup", "1"]  # fmt: skip
    cmd = dalikd("profile", "--data", str(data), "--device", check.device, "--aug",
                 "cutmix,cutmixpick", "--baseline", "none", "--mixing", "auto", *models,
                 "--json", str(path))  # fmt: skip
    code, tail = check.run("profile", cmd, 150)
    if code is None:
        return
    if code != 0 or not path.exists():
        check.record("profile", False, f"exited {code}: {_last(tail.splitlines())}")
        return
    prof = json.loads(path.read_text())
    check.result["efficiency"] = {a: round(v, 4) for a, v in prof["efficiency"].items()}
    check.result["profile_bound"] = prof.get("bound")
    want = {"none", "cutmix", "cutmixpick"}
    got = set(prof["efficiency"])
    detail = ", ".join(f"{a} {v:.3f}" for a, v in prof["efficiency"].items())
    check.record("profile", want <= got, f"data-loading efficiency: {detail}; mixing: "
                 f"{prof.get('mixing')}")  # fmt: skip


def save_teacher(path: Path, classes: int) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), path)  # random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: a dry run of this script's logic with tiny sizes")  # fmt: skip
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset; loader and same take patterns of their "
                        "cases too, e.g. same/cutmix/*,loader/mixup/native/batch")  # fmt: skip
    parser.add_argument("--budget", type=float, default=290, help="s, for all cases together")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--select", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    import torch

    if args.device == "gpu" and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch sees none); --device cpu is a dry run of its "
              "logic", flush=True)  # fmt: skip
        return
    # each top-level case once, in the order given, with its patterns ("loader/cutmix/*")
    select: dict[str, list[str]] = {}
    for item in (c.strip() for c in args.cases.split(",") if c.strip()):
        top = item.split("/")[0]
        select.setdefault(top, []).append(item if "/" in item else f"{top}*")
    cases = list(select)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.device, args.budget)
    check.save()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    data, classes = work / "data", 4
    # The profile's batches of 256: 4 per epoch, so epoch ends are not every other batch.
    per_class = 256 if args.device == "gpu" else 6
    kinds = make_jpegs(data, classes, per_class, val_per_class=7)
    print(f"data: {data} ({', '.join(f'{n} {k}' for k, n in kinds.items())})", flush=True)
    teacher = work / "teacher.pt"
    for i, case in enumerate(cases):
        check.pending = cases[i + 1 :]
        if case == "doctor":
            case_doctor(check)
        elif case in ("jpegs", "loader", "same", "checkpoint", "exact"):
            check.child(case, data, {"loader": 120, "same": 60}.get(case, 45), select[case])
        elif case == "profile":
            case_profile(check, data)
        elif case in ("train", "torchrun"):
            if not teacher.exists():
                save_teacher(teacher, classes)
            case_train(check, data, teacher, work / "runs", torchrun=case == "torchrun")
        elif case == "recovery":
            case_recovery(check, data, work / "runs")
    shutil.rmtree(work, ignore_errors=True)
    failed = [c["name"] for c in check.result["cases"] if not c["ok"]]
    print(f"{len(check.result['cases']) - len(failed)} ok, {len(failed)} FAIL; "
          f"{out / 'gpu_check.json'}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

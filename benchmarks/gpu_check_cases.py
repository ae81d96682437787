"""The parts of ``benchmarks/gpu_check.py`` that run in its child processes (one per case:
``gpu_check.py --child CASE``), the synthetic JPEG set, and the bad files of the recovery case.
Imported after gpu_check's pre-flight, so numpy, PIL, torch and DALI are known to import."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

MIXING = ("mixup", "cutmix", "cutmixpick")
MARK = "@@case "  # a child's result line: MARK + {"name", "ok", "detail"}


# -- synthetic data (parent) ---------------------------------------------------------------------


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
    from dalikd.plan import resolve_plan

    split = scan_dataset(data_root).val
    data = DataConfig(path=str(data_root), threads=2, **sizes(device))
    seen, flat = 0, 0
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


# -- the recovery case's bad files (parent) -------------------------------------------------------


def ycbcr_jpeg(folder: Path) -> Path:
    """The first baseline YCbCr JPEG in ``folder`` (an RGB image saved plainly): one that
    nvJPEG decodes on the GPU itself. A CMYK one would go to nvImageCodec's CPU fallback, a
    progressive one may."""
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            if image.mode == "RGB" and not image.info.get("progressive"):
                return path
    raise FileNotFoundError(f"no baseline RGB JPEG in {folder}")


def bad_jpegs(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Files made from one good baseline YCbCr JPEG, each ``name: (bytes, where)``: where the
    run must leave it out, "scan" (dalikd's data scan, before DALI reads it) or "decoder" (its
    decoder fails in training; recovery leaves it out). Both "decoder" files keep their
    end-of-image marker as their last bytes, so every version of the scan passes them:

    - ``zero_size.jpg``: the frame header says 0 x 0 pixels;
    - ``bad_sos.jpg``: the scan header names a component the frame does not have;
    - ``cut_short.jpg``: cut inside its entropy-coded data, no end-of-image marker (nvJPEG
      would decode it as a partly grey image and report success: the scan must catch it);
    - ``cut_after_thumbnail.jpg``: the same cut, with an (empty) thumbnail ahead whose
      end-of-image marker lies in the file's last 4 KiB but not in its last bytes. Never
      trained on: the scan's tail rule leaves it out ("scan"), or, with a scan that looks
      4 KiB deep, the CPU decoder fails it in training; on the GPU only the scan can.
    """
    sof, sos = good.find(b"\xff\xc0"), good.find(b"\xff\xda")
    if sof < 0 or sos < 0 or good[sos + 4] < 1:
        raise ValueError("not a baseline JPEG")
    zero = bytearray(good)
    zero[sof + 5 : sof + 9] = b"\x00\x00\x00\x00"  # length (2), precision (1), height, width
    bad_sos = bytearray(good)
    bad_sos[sos + 5] = 0xF9  # the first component selector: no frame component has this id
    cut = good[: sos + 300]
    thumb = b"Exif\x00\x00" + good[:2] + b"\xff\xd9"  # SOI + EOI
    app1 = b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    cut_thumb = (good[:2] + app1 + good[2:])[: len(app1) + sos + 300]
    return {
        "zero_size.jpg": (bytes(zero), "decoder"),
        "bad_sos.jpg": (bytes(bad_sos), "decoder"),
        "cut_short.jpg": (cut, "scan"),
        "cut_after_thumbnail.jpg": (cut_thumb, "scan or decoder"),
    }


def left_out(report_text: str, path: Path) -> str:
    """Where ``data_report.tsv`` says a file was left out: "decoder" (failed in training),
    "scan" (any other reason: the scan's), or "" when it is not listed."""
    for line in report_text.splitlines()[1:]:
        listed, _, reason = line.partition("\t")
        if listed == str(path):
            return "decoder" if reason.startswith("failed in training") else "scan"
    return ""

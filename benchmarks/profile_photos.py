"""Profile dalikd's data path on real photographs against a torchvision DataLoader.

    pip install -e ".[bench]"         # scikit-image (the photographs)
    python benchmarks/profile_photos.py

Builds, once, an ImageNet-like JPEG set from the colour photographs that ship inside
scikit-image (astronaut, chelsea, coffee, hubble_deep_field, immunohistochemistry, retina,
rocket, and the two motorcycle stereo views; nothing is downloaded): each class is one
photograph, each image a random window of it, downscaled (never upscaled) to an ImageNet size
such as 500×375 or 375×500 and saved at JPEG quality 90. It lands in
``$DALIKD_CACHE/photos-v1`` (default ``~/.cache/dalikd``). Then it runs

    dalikd profile --data SET --device cpu --threads 2 --batch-size 32 --image-size 224 \\
        --aug flip,mixup,cutmix,cutmixpick --json OUT/profile.json --plot OUT/profile.png

and prints the ratios the project's targets are about: DALI ÷ torchvision per scheme (2.0× for
the plain pipeline), the CutMix and CutMixPick-pool pipelines against the plain one (within
10%), the plain pipeline against the decode-only rate (>= 60%), dalikd's resize
(fn.dalikd_resize, where it loads) against DALI's fn.resize, and the plain hand-off against timm's
own training loader (``timm.data.create_loader`` with its prefetcher; where timm is installed,
target 1.6×), all from interleaved windows of the same run. A second, short run with
--no-antialias is reported separately: that mode resizes at a lower quality than
torchvision's RandomResizedCrop, so it is never the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SIZES = [(500, 375), (500, 333), (500, 400), (375, 500), (333, 500), (500, 500)]  # (w, h)
VERSION = "photos-v1"  # bump when the recipe below changes: the set is cached by this name


def photographs() -> dict:
    """name -> HxWx3 uint8 array, for the colour photographs bundled with scikit-image."""
    try:
        from skimage import data
    except ImportError:
        sys.exit('this benchmark needs scikit-image: pip install -e ".[bench]"')
    photos = {
        name: getattr(data, name)()
        for name in ("astronaut", "chelsea", "coffee", "hubble_deep_field",
                     "immunohistochemistry", "retina", "rocket")
    }  # fmt: skip
    photos["motorcycle_left"], photos["motorcycle_right"], _ = data.stereo_motorcycle()
    return photos


def build_photo_set(root: Path, per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """ImageNet layout (train/<photo>/*.JPEG, val/<photo>/*.JPEG); kept once complete."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{per_class},{val_per_class},{seed}":
        return root
    rng = np.random.default_rng(seed)
    for name, pixels in photographs().items():
        photo = Image.fromarray(pixels)
        for split, count in (("train", per_class), ("val", val_per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = SIZES[rng.integers(len(SIZES))]
                fit = min(photo.width / w, photo.height / h)
                if fit < 1:  # a small photograph: a smaller image rather than an upscaled one
                    w, h, fit = int(w * fit), int(h * fit), 1.0
                scale = rng.uniform(1.0, min(fit, 2.0))  # window = output size x scale
                cw, ch = w * scale, h * scale
                x0, y0 = rng.uniform(0, photo.width - cw), rng.uniform(0, photo.height - ch)
                image = photo.resize((w, h), Image.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.5:
                    image = image.transpose(Image.FLIP_LEFT_RIGHT)
                image.save(folder / f"{name}_{i:04d}.JPEG", quality=90)
    done.write_text(f"{per_class},{val_per_class},{seed}")
    return root


def profile(data: Path, out: Path, args, extra: list[str]) -> dict:
    command = [
        sys.executable, "-m", "dalikd", "profile", "--data", str(data), "--device", "cpu",
        "--threads", str(args.threads), "--batch-size", str(args.batch_size),
        "--image-size", str(args.image_size), "--windows", str(args.windows),
        "--window-seconds", str(args.window_seconds), "--json", str(out), *extra,
    ]  # fmt: skip
    print("$", " ".join(command[1:]).replace(sys.executable, "python"), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


DALI = "DALI's fn.resize"


def names(report: dict) -> list[str]:
    return [st["name"] for st in report["stages"]]


def rate(report: dict, name: str) -> float:
    return next(st["img_per_s"] for st in report["stages"] if st["name"] == name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/profile_photos"))
    parser.add_argument("--per-class", type=int, default=120, help="train images per photo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--window-seconds", type=float, default=1.5)
    parser.add_argument("--aug", default="flip,mixup,cutmix,cutmixpick")
    parser.add_argument("--teacher", default="", help="e.g. resnet18 (slow on CPU)")
    parser.add_argument("--student", default="", help="e.g. mobilenet_v3_small")
    args = parser.parse_args()

    load = os.getloadavg()
    cache = Path(os.environ.get("DALIKD_CACHE", Path.home() / ".cache" / "dalikd"))
    data = build_photo_set(cache / VERSION, args.per_class, val_per_class=5)
    args.out.mkdir(parents=True, exist_ok=True)
    models = ["--teacher", args.teacher] * bool(args.teacher)
    models += ["--student", args.student] * bool(args.student)
    report = profile(
        data, args.out / "profile.json", args,
        ["--aug", args.aug, "--plot", str(args.out / "profile.png"), *models],
    )  # fmt: skip
    no_aa = profile(
        data, args.out / "profile_no_antialias.json", args,
        ["--aug", "none", "--no-antialias", "--baseline", "torchvision"],
    )  # fmt: skip

    s = args.image_size
    plain = rate(report, "+ flip (plain pipeline)")
    print(f"\n{report['cpu_count']} cores, {report['threads']} DALI threads = torchvision "
          f"workers, batch {report['batch_size']}, {s} px, {report['dataset']['train_images']} "
          f"photos ({report['dataset']['mean_file_kb']} KB mean)")  # fmt: skip
    decode = rate(report, "+ decode, random crop")
    print(f"load average at the start (1, 5, 15 min): {load}")
    print(f"decode-only ceiling: {decode:,.0f} samples/s; "
          f"+ antialiased resize: {rate(report, f'+ resize {s}² (antialias)'):,.0f}; "
          f"plain pipeline: {plain:,.0f}")  # fmt: skip
    for aug, r in report["ratio"].items():
        target = "  (target 2.0x)" if aug == "none" else ""
        print(f"DALI / torchvision, {aug:>10}: {r:.2f}x{target}  bound: "
              f"{report['bound'][aug]['stage']}")  # fmt: skip
    for st in report["stages"]:
        if "vs_plain" in st:  # measured in the same windows as the plain pipeline
            target = "  (target >= 0.90)" if st["aug"] in ("cutmix", "cutmixpick") else ""
            cpu = f"; CPU time per image: {st['vs_plain_cpu']:.2f}" if "vs_plain_cpu" in st else ""
            print(f"{st['name']}: {st['vs_plain']:.2f} of the plain pipeline's rate{cpu}{target}")
    print(f"resize: {report['resize']}")
    if f"+ flip (plain pipeline) ({DALI})" in names(report):  # same windows as the chain
        dali_plain = rate(report, f"+ flip (plain pipeline) ({DALI})")
        native = rate(report, f"+ resize {s}² (antialias)")
        print(f"antialiased resize to {s}²: native {native:,.0f}"
              f" vs DALI's fn.resize {rate(report, f'+ resize {s}² (antialias) ({DALI})'):,.0f}; "
              f"plain pipeline native / DALI resize + flip: {plain / dali_plain:.2f}x")  # fmt: skip
    print(f"plain pipeline / decode-only ceiling: {plain / decode:.2f}  (target >= 0.60)")
    for name, alt in report["alternatives"].items():  # the plain hand-off's windows
        target = "  (target 1.6x)" if name == "timm" else ""
        label = "timm.data.create_loader (prefetcher)" if name == "timm" else f"dalikd with {name}"
        print(f"dalikd (plain) / {label}: {alt['dalikd_ratio']:.2f}x{target}"
              f"  ({alt['img_per_s']:,.0f} samples/s)")  # fmt: skip
    if "timm" not in report["alternatives"]:
        print("timm is not installed: no comparison with timm's loader (pip install timm)")
    print(f"--no-antialias (separate, lower quality): DALI / torchvision "
          f"{no_aa['ratio']['none']:.2f}x")  # fmt: skip
    print(
        f"load average at the end (1, 5, 15 min): {os.getloadavg()}; ratios come from "
        "interleaved windows of one run, absolute rates from a machine others may share"
    )


if __name__ == "__main__":
    main()

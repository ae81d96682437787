"""dalikd's CIFAR-100 training hand-off against the reference code's loader, images per CPU
second, side by side in one run; and the data's share of a KD step.

- dalikd: an imported CIFAR-100 folder (raw ``.hwc`` files, ``dalikd data import``'s format),
  the training loader of ``configs/paper/cifar100_*.toml`` (x = pad-crop 4 + flip, x' = CutMix
  drawn per batch; DALI's threads as dalikd chooses them: one for raw images) and the hand-off
  to the model: x and x' normalized with CIFAR-100's mean/std into float32 NCHW tensors
  (``dalikd.device.prepare_batch``).
- reference: what ``dataset/cifar100.py`` and ``helper/loops.py`` do: an in-memory CIFAR100-style
  dataset (uint8 HWC array, ``Image.fromarray`` per image), PIL ``RandomCrop(32, padding=4)`` +
  ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``, a ``DataLoader`` with 2 workers and
  batch 64, and x' = CutMix of the normalized batch in torch in the main process (λ ~ Beta(1, 1),
  the reference's box, a partner permutation without fixed points, a mask multiply).

The reference runs in a child process of its own, in two environments: as it runs for its users
(OMP_WAIT_POLICY as the shell has it; unset, OpenMP's threads spin a while before they sleep,
and the CutMix of the batch runs on them) and with dalikd's setting (PASSIVE, which the dalikd
command sets for itself: cli/main.py). dalikd runs in this process, as the dalikd command runs.
All take turns in short windows (A, B, C, A, B, C, ...); CPU time is each process's (all its
threads) plus its DataLoader worker processes'. Then a KD step (``dalikd.step.Distiller``:
cifar:resnet56 teacher, cifar:resnet20 student, x and x' = CutMix, fp32, batch 64) on tensors
already in memory gives the step's CPU time, and each loader's share of a step is its CPU time
per batch over that plus the step's.

    python benchmarks/cifar_loader.py                 # 20,000 images, 7 windows of 2 s
    python benchmarks/cifar_loader.py --images 50000 --windows 9
"""

from __future__ import annotations

import os

USER_OMP = os.environ.get("OMP_WAIT_POLICY")  # the reference runs with the shell's setting
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the dalikd command (cli/main.py)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dalikd import loaders  # noqa: E402
from dalikd.batch import data_norm  # noqa: E402
from dalikd.config import KDConfig  # noqa: E402
from dalikd.data import scan_dataset  # noqa: E402
from dalikd.dataimport import data_defaults  # noqa: E402
from dalikd.device import prepare_batch  # noqa: E402
from dalikd.manifest import RAW_EXTENSION, Manifest, SplitInfo, write_manifest  # noqa: E402
from dalikd.plan import plan_for  # noqa: E402
from dalikd.profile.baseline import BaselineStream  # noqa: E402
from dalikd.profile.timing import Runner, time_interleaved  # noqa: E402
from dalikd.settings import command_config  # noqa: E402

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # dataset/cifar100.py:220-221
CLASSES = 100


def write_raw_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The layout ``dalikd data import cifar100`` writes: train/<class>/<row>.hwc + dataset.json
    (val/ holds a few images: the scan wants one)."""
    classes = tuple(f"c{i:03d}" for i in range(CLASSES))
    for split, rows in (("train", range(len(images))), ("val", range(CLASSES))):
        for i in rows:
            folder = root / split / classes[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}{RAW_EXTENSION}").write_bytes(images[i].tobytes())
    counts = {
        split: tuple(int(n) for n in np.bincount(labels[: len(rows)], minlength=CLASSES))
        for split, rows in (("train", images), ("val", range(CLASSES)))
    }
    write_manifest(Manifest(
        name="cifar100", layout="folder", codec="raw", classes=classes,
        splits={s: SplitInfo(sum(c), c) for s, c in counts.items()}, image_shape=(32, 32, 3),
        data_defaults=data_defaults("cifar100", (32, 32, 3)),
    ), root)  # fmt: skip
    return root


def dalikd_handoff(root: Path, batch: int, threads: int):
    """(the KD config's data plan, a Runner of one batch: x and x' = CutMix, normalized)."""
    cfg = command_config(
        overrides={"data.path": str(root), "data.batch_size": batch, "data.threads": threads}
    )  # the dataset's own settings
    norm = data_norm(cfg.data.mean, cfg.data.std)
    dataset = scan_dataset(root, cache=False)
    plan = plan_for(cfg.data, KDConfig(aug="cutmix", granularity="batch"), device="cpu",
                    seed=0, norm=norm, raw_shape=dataset.raw_shape)  # fmt: skip
    loader = loaders.train_loader(dataset.train, plan)

    def batches():
        while True:
            yield from loader

    it = batches()
    return plan, Runner(lambda: prepare_batch(next(it), "cpu", norm), batch)


class InMemoryCIFAR(torch.utils.data.Dataset):
    """torchvision's CIFAR100 as the reference uses it: uint8 HWC rows, a PIL image each."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(MEAN, STD)])  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_cutmix(x: torch.Tensor) -> torch.Tensor:
    """helper/loops.py's cutmix of a normalized batch: one λ and box per batch, a partner
    permutation without fixed points, ``x * mask + x[perm] * (1 - mask)``."""
    b, _, h, w = x.shape
    lam = np.random.beta(1.0, 1.0)
    cut = np.sqrt(1.0 - lam)
    cw, ch = int(w * cut), int(h * cut)
    cx, cy = np.random.randint(w), np.random.randint(h)
    x1, y1 = np.clip(cx - cw // 2, 0, w), np.clip(cy - ch // 2, 0, h)
    x2, y2 = np.clip(cx + cw // 2, 0, w), np.clip(cy + ch // 2, 0, h)
    perm = torch.randperm(b)
    while (perm == torch.arange(b)).any():
        perm = torch.randperm(b)
    mask = torch.ones(h, w)
    mask[y1:y2, x1:x2] = 0
    return x * mask + x[perm] * (1 - mask)


def reference_loader(images: np.ndarray, labels: np.ndarray, batch: int, workers: int):
    loader = torch.utils.data.DataLoader(
        InMemoryCIFAR(images, labels), batch_size=batch, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, drop_last=True,
    )  # fmt: skip
    stream = BaselineStream(loader, torch.device("cpu"))
    it = stream._batches()

    def step():
        x, _ = next(it)
        reference_cutmix(x)

    return stream, Runner(step, batch, pids=stream.worker_pids)


def images_and_labels(count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, CLASSES, count)


def reference_child(count: int, batch: int, workers: int) -> None:
    """The reference's side, in its own process: one line "SECONDS MIN_BATCHES" in, one JSON
    line [wall s, images, CPU s (this process and its workers)] out, until EOF."""
    images, labels = images_and_labels(count)
    stream, run = reference_loader(images, labels, batch, workers)
    for line in sys.stdin:
        seconds, calls = line.split()
        print(json.dumps(run.window(float(seconds), int(calls))), flush=True)
    stream.close()


class ChildRunner:
    """A Runner (``window``) whose batches the reference's child process makes."""

    def __init__(self, omp: str | None, args) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({"OMP_WAIT_POLICY": omp} if omp else {})
        command = [sys.executable, __file__, "--reference-child", "--images", str(args.images),
                   "--batch-size", str(args.batch_size),
                   "--workers", str(args.workers)]  # fmt: skip
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip

    def window(self, seconds: float, min_calls: int = 1) -> tuple[float, int, float]:
        self.proc.stdin.write(f"{seconds} {min_calls}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the reference's process ended (exit {self.proc.wait()})")
        return tuple(json.loads(line))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def kd_step_cpu_seconds(batch: int, steps: int) -> float:
    """CPU seconds of one KD step (x and x' = CutMix) on tensors in memory, fp32."""
    from dalikd.batch import Batch
    from dalikd.config import ModelConfig, OptimConfig
    from dalikd.step import Distiller, make_optimizer

    model = ModelConfig(student="cifar:resnet20", teacher="cifar:resnet56")
    norm = data_norm(tuple(v * 255 for v in MEAN), tuple(v * 255 for v in STD))
    distiller = Distiller.build(model, KDConfig(aug="cutmix"), CLASSES, "cpu", "fp32",
                                weights=False, data_norm=norm).train()  # fmt: skip
    optimizer = make_optimizer(distiller.student, OptimConfig(lr=0.05))
    scaler = torch.amp.GradScaler(enabled=False)
    gen = torch.Generator().manual_seed(0)

    def pixels():
        return torch.randint(256, (batch, 32, 32, 3), generator=gen, dtype=torch.uint8)

    b = Batch(images=pixels(), labels=torch.randint(CLASSES, (batch,), generator=gen),
              aug_images=pixels(), lam=torch.rand(batch, generator=gen),
              perm=torch.roll(torch.arange(batch), 1))  # fmt: skip
    distiller.step(b, optimizer, scaler)  # warm-up
    cpu0 = time.process_time()
    for _ in range(steps):
        distiller.step(b, optimizer, scaler)
    return (time.process_time() - cpu0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="training images (CIFAR: 50k)")
    parser.add_argument("--batch-size", type=int, default=64, help="the reference's batch")
    parser.add_argument("--workers", type=int, default=2, help="the reference's loader workers")
    parser.add_argument(
        "--dali-threads", type=int, default=0,
        help="DALI threads (0: dalikd's default, --threads 0: one for raw images)",
    )  # fmt: skip
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--window-seconds", type=float, default=2.0)
    parser.add_argument("--kd-steps", type=int, default=3, help="KD steps timed (0: skip)")
    parser.add_argument("--reference-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_child:
        return reference_child(args.images, args.batch_size, args.workers)
    print(f"load average at the start (1, 5, 15 min): {os.getloadavg()}; {os.cpu_count()} cores, "
          f"{args.workers} DataLoader workers, batch {args.batch_size}, "
          f"{args.images:,} images, torch {torch.get_num_threads()} threads; the reference's "
          f"OMP_WAIT_POLICY: {USER_OMP or 'unset'} (as run), PASSIVE (dalikd's)")  # fmt: skip
    images, labels = images_and_labels(args.images)
    children = {"reference": ChildRunner(USER_OMP, args),
                "reference, PASSIVE": ChildRunner("PASSIVE", args)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dalikd-cifar-") as tmp:
        root = write_raw_folder(Path(tmp) / "cifar100", images, labels)
        plan, dalikd_run = dalikd_handoff(root, args.batch_size, args.dali_threads)
        cfg = SimpleNamespace(warmup=3, windows=args.windows, window_seconds=args.window_seconds)
        t = time_interleaved({"dalikd": dalikd_run, **children}, cfg,
                             settle_seconds=args.window_seconds / 2)  # fmt: skip
    for child in children.values():
        child.close()
    report(t, plan, args)


def report(t: dict, plan, args) -> None:
    d = t["dalikd"]
    print(f"\nx = pad-crop {plan.data.pad} + flip, x' = CutMix (one draw per batch), both "
          f"normalized to float32; dalikd: {plan.data.threads} DALI thread(s), mixing path "
          f"{plan.data.mixing}")  # fmt: skip
    print(f"{'loader':<20}{'img/s wall':>12}{'CPU us/img':>12}{'img/CPU s':>12}")
    for name, timing in t.items():
        print(f"{name:<20}{timing.img_per_s:>12,.0f}{1e3 * timing.cpu_ms_per_img:>12.1f}"
              f"{1e3 / timing.cpu_ms_per_img:>12,.0f}")  # fmt: skip
    for name in ("reference", "reference, PASSIVE"):
        r = t[name]
        print(
            f"dalikd / {name}: {r.cpu_ms_per_img / d.cpu_ms_per_img:.1f}x images per CPU "
            f"second (target >= 5x), {d.img_per_s / r.img_per_s:.1f}x per wall second"
        )
    if args.kd_steps:
        step = kd_step_cpu_seconds(args.batch_size, args.kd_steps)
        print(f"\nKD step on tensors in memory (cifar:resnet56 -> cifar:resnet20, x and x', fp32, "
              f"batch {args.batch_size}): {1e3 * step:,.0f} ms of CPU")  # fmt: skip
        for name, timing in t.items():
            data = timing.cpu_ms_per_img * args.batch_size / 1e3
            print(f"  {name:<19} data {1e3 * data:7.1f} ms of CPU a batch: "
                  f"{100 * data / (data + step):.1f}% of a KD step's CPU")  # fmt: skip
    print(
        f"load average at the end (1, 5, 15 min): {os.getloadavg()}; ratios come from "
        "interleaved windows of one run, absolute rates from a machine others may share"
    )


if __name__ == "__main__":
    main()

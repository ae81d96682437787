"""On a CUDA GPU, without DALI: what the torch side of the uint8 hand-off and the mixing kernel
cost next to the models of a CutMixPick step.

    python benchmarks/gpu_handoff.py     # --batch-size 256 --image-size 224 --pool 2

Times (CUDA events around a synchronized region; median of ``--repeats``), for B images of x
and a pool of k·B candidates:

    normalize x and the pool     dalikd.device.prepare_batch: uint8 NHWC -> float32 channels_last
    teacher forward, (1 + k)·B   resnet34, bf16 autocast, channels_last (the pool step's teacher)
    student fwd + bwd, 2·B       resnet18, bf16, x and the B picked candidates
    mixing kernel, cutmix/mixup  dalikd/native/mix_gpu.cu through the test shim (compiled here
                                 with nvcc; includes the shim's host-to-device copy of the
                                 per-candidate structs and a synchronize: an upper bound)
    copy floor                   torch copy_ of the same k·B images (device to device)

and prints each as a share of the teacher forward. Random weights and pixels: speed only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int) -> float:
    """Median ms of ``fn`` between two CUDA events, after three warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_shim():
    """tests/test_cuda_mix_kernel.py's ctypes shim around the kernel, or None without nvcc."""
    path = ROOT / "tests" / "test_cuda_mix_kernel.py"
    spec = importlib.util.spec_from_file_location("cuda_mix_kernel", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as skip:  # pytest.skip when nvcc is missing
        print(f"(no kernel timing: {skip})")
        return None
    return module.build_shim(Path(tempfile.mkdtemp()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--pool", type=int, default=2, help="k, candidates per image")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    import torchvision

    from dalikd.batch import Batch
    from dalikd.device import autocast, prepare_batch

    torch.backends.cudnn.benchmark = True
    b, s, k, cuda = args.batch_size, args.image_size, args.pool, torch.device("cuda")
    images = torch.randint(256, (b, s, s, 3), dtype=torch.uint8, device=cuda)
    pool = torch.randint(256, (k * b, s, s, 3), dtype=torch.uint8, device=cuda)
    batch = Batch(images=images, labels=torch.zeros(b, dtype=torch.int64, device=cuda),
                  aug_images=pool, pool_size=k)  # fmt: skip
    rows: dict[str, float] = {}
    rows[f"normalize x and the pool ({(1 + k) * b} images)"] = timed(
        lambda: prepare_batch(batch, "gpu"), args.repeats
    )
    prepared = prepare_batch(batch, "gpu")
    teacher_in = torch.cat([prepared.images, prepared.aug_images])
    teacher = torchvision.models.resnet34().to(cuda, memory_format=torch.channels_last).eval()
    student = torchvision.models.resnet18().to(cuda, memory_format=torch.channels_last)

    def teacher_forward():
        with torch.no_grad(), autocast("gpu", "auto"):
            teacher(teacher_in)

    def student_step():
        for x in (prepared.images, prepared.aug_images[:b]):
            with autocast("gpu", "auto"):
                loss = student(x).float().logsumexp(1).mean()
            loss.backward()
        student.zero_grad(set_to_none=True)

    rows[f"teacher forward, resnet34 bf16 ({(1 + k) * b} images)"] = timed(
        teacher_forward, args.repeats
    )
    rows[f"student fwd + bwd, resnet18 bf16 ({2 * b} images)"] = timed(student_step, args.repeats)

    lib = kernel_shim()
    if lib is not None:
        rng = np.random.default_rng(0)
        partner = ((np.arange(b)[:, None] + rng.integers(1, b, (b, k))) % b).astype(np.int32)
        y0 = rng.integers(0, s // 2, (b, k)).astype(np.int32)
        x0 = rng.integers(0, s // 2, (b, k)).astype(np.int32)
        y1, x1 = y0 + s // 2, x0 + s // 2
        lam = rng.random((b, k), dtype=np.float32)
        out = torch.empty((k, b, s, s, 3), dtype=torch.uint8, device=cuda)
        lam_out = torch.empty((b, k), dtype=torch.float32, device=cuda)
        for name, mode in (("cutmix", 0), ("mixup", 1)):

            def mix(mode=mode):
                rc = lib.dalikd_test_launch_mix(
                    images.data_ptr(), out.data_ptr(), lam_out.data_ptr(), b, k, s, s, 3,
                    partner, y0, x0, y1, x1, lam, mode,
                )  # fmt: skip
                assert rc == 0, f"CUDA error {rc}"

            rows[f"mixing kernel, {name} ({k * b} candidates)"] = timed(mix, args.repeats)
        flat = out.view(k, b, -1)
        rows[f"copy floor: copy_ of {k * b} images"] = timed(
            lambda: flat.copy_(images.view(1, b, -1).expand(k, b, -1)), args.repeats
        )

    name = torch.cuda.get_device_name()
    print(f"\n{name}, torch {torch.__version__}, batch {b}, {s} px, pool k = {k}\n")
    print("| stage | ms | share of the teacher forward |")
    print("|---|---|---|")
    teacher_ms = next(v for n, v in rows.items() if n.startswith("teacher"))
    for n, ms in rows.items():
        print(f"| {n} | {ms:.3f} | {100 * ms / teacher_ms:.1f}% |")


if __name__ == "__main__":
    main()

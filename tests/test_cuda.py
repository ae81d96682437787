"""dalikd's torch side on a CUDA GPU, without DALI: the normalization of the hand-off, the
training step in every precision, the pick and evaluation, each against the CPU.

On a machine with a CUDA GPU: ``python -m pytest tests/test_cuda.py`` (DALI need not be
installed: nothing here builds a loader). Skipped everywhere else.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from dalikd.batch import Batch, normalize  # noqa: E402
from dalikd.config import build_config  # noqa: E402
from dalikd.device import amp_dtype, autocast, place, prepare_images  # noqa: E402
from dalikd.evaluate import evaluate  # noqa: E402
from dalikd.pick import pick, pick_count, scores  # noqa: E402
from dalikd.step import Distiller  # noqa: E402

CUDA = torch.device("cuda")
B, S, CLASSES = 8, 64, 10


def small_resnet() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=CLASSES)


def pool_batch(device: torch.device, k: int = 2) -> Batch:
    """A CutMixPick-shaped batch of random uint8 images: x, and k·B candidate rows."""
    gen = torch.Generator().manual_seed(1)
    rows = k * B
    batch = Batch(
        images=torch.randint(256, (B, S, S, 3), generator=gen, dtype=torch.uint8),
        labels=torch.randint(CLASSES, (B,), generator=gen),
        aug_images=torch.randint(256, (rows, S, S, 3), generator=gen, dtype=torch.uint8),
        lam=torch.rand(rows, generator=gen),
        perm=torch.randint(B, (rows,), generator=gen),
        pool_size=k,
    )
    return Batch(**{f: (v.to(device) if torch.is_tensor(v) else v)
                    for f, v in vars(batch).items()})  # fmt: skip


def test_normalize_on_the_gpu_equals_the_cpu_and_is_channels_last():
    images = torch.randint(256, (16, 33, 47, 3), dtype=torch.uint8)
    gpu = prepare_images(images.to(CUDA), "gpu")
    assert gpu.is_contiguous(memory_format=torch.channels_last) and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), normalize(images), rtol=0, atol=5e-7)  # FMA or not


def test_the_pick_on_the_gpu_keeps_the_rows_the_cpu_keeps():
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(64, CLASSES, generator=gen) * 3
    count = pick_count(64, 0, 0.5)
    cpu = pick(scores("teacher_entropy", teacher, None, 4.0), count)
    gpu = pick(scores("teacher_entropy", teacher.to(CUDA), None, 4.0), count)
    assert sorted(cpu.tolist()) == sorted(gpu.cpu().tolist())


def _step(device: str, precision: str, student, teacher) -> tuple[float, nn.Module]:
    cfg = build_config(overrides={"kd.aug": "cutmixpick", "kd.mixed_label_ce": 1.0,
                                  "precision": precision, "device": device})  # fmt: skip
    tdev = CUDA if device == "gpu" else torch.device("cpu")
    student, teacher = place(student, device), place(teacher, device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    # fp16: a scale of 2^8, not the default 2^16, at which a first step's gradients overflow
    # and GradScaler skips it by design (seen on an H200), which would leave nothing to compare.
    fp16 = amp_dtype(device, precision) == torch.float16
    scaler = torch.amp.GradScaler(init_scale=2.0**8, enabled=fp16)
    distiller = Distiller(student, teacher, cfg.kd, device, precision)
    out = distiller.step(pool_batch(tdev), optimizer, scaler)
    assert not fp16 or scaler.get_scale() == 2.0**8, "the fp16 step was skipped (overflow)"
    return out.losses["loss"].item(), student


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_cutmixpick_train_step_on_the_gpu_matches_the_cpu(precision):
    """The whole step (normalize, teacher over x and the pool, pick, two student passes, KD and
    mixed-label losses, backward, SGD) on the GPU with autocast and channels_last, against the
    same step in fp32 on the CPU: the loss agrees to the precision's tolerance and the student
    moves the same way."""
    student, teacher = small_resnet(), small_resnet()
    cpu_loss, cpu_student = _step("cpu", "fp32", copy.deepcopy(student), copy.deepcopy(teacher))
    gpu_loss, gpu_student = _step("gpu", precision, student, teacher)
    assert torch.isfinite(torch.tensor(gpu_loss))
    tol = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 2e-2}[precision]  # fp32 convs use TF32 on GPU
    assert gpu_loss == pytest.approx(cpu_loss, rel=tol)
    before = small_resnet().fc.weight
    moved_cpu = cpu_student.fc.weight.detach() - before
    moved_gpu = gpu_student.fc.weight.detach().cpu() - before
    cos = torch.nn.functional.cosine_similarity(moved_cpu.flatten(), moved_gpu.flatten(), dim=0)
    assert cos > 0.95, f"the GPU step moved the classifier elsewhere (cosine {cos:.3f})"
    for p in gpu_student.parameters():
        assert torch.isfinite(p).all()


def test_bf16_autocast_runs_the_model_in_bf16_on_the_gpu():
    model = small_resnet().to(CUDA).to(memory_format=torch.channels_last)
    x = prepare_images(pool_batch(CUDA).images, "gpu")
    with autocast("gpu", "auto"):
        assert model(x).dtype == torch.bfloat16


def test_evaluation_on_the_gpu_counts_as_on_the_cpu():
    model = small_resnet().eval()
    batches = [pool_batch(torch.device("cpu")) for _ in range(3)]
    cpu = evaluate(model, batches, "cpu", "fp32")
    gpu_batches = [Batch(images=b.images.to(CUDA), labels=b.labels.to(CUDA)) for b in batches]
    gpu = evaluate(copy.deepcopy(model).to(CUDA), gpu_batches, "gpu", "fp32")
    assert gpu["count"] == cpu["count"] == 3 * B
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-2)

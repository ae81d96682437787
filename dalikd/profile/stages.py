"""What is timed: the cumulative DALI stages, and the model stages and KD step (the
training step, :class:`dalikd.step.Distiller`, on randomly initialised models)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalikd import loaders
from dalikd.config import DataConfig, KDConfig, ModelConfig, OptimConfig
from dalikd.device import autocast, prepare_images
from dalikd.errors import DalikdError
from dalikd.models import input_norm
from dalikd.pick import pick_count
from dalikd.plan import DataPlan
from dalikd.profile.config import ProfileConfig
from dalikd.profile.timing import Runner
from dalikd.step import Distiller, make_optimizer

# -- DALI stages (graphs return dicts of named DataNodes, see loaders.build_pipeline) ----------


def read_graph(split, plan, seeds):
    jpegs, labels, _ = loaders.read(split, shuffle=True, shard_id=0, num_shards=1,
                                     small_files=bool(plan.raw_shape))  # fmt: skip
    return {"jpegs": jpegs, "labels": labels}


def pixels_graph(split, plan, seeds):
    jpegs, labels, _ = loaders.read(split, shuffle=True, shard_id=0, num_shards=1,
                                 small_files=bool(plan.raw_shape))  # fmt: skip
    return {"images": loaders.pixels(jpegs, plan), "labels": labels}


def decode_graph(split, plan, seeds):
    jpegs, labels, _ = loaders.read(split, shuffle=True, shard_id=0, num_shards=1)
    images = loaders.random_crop_decode(jpegs, plan, seeds.stream("base"))
    return {"images": images, "labels": labels}


def resize_graph(split, plan, seeds):
    jpegs, labels, _ = loaders.read(split, shuffle=True, shard_id=0, num_shards=1)
    images = loaders.random_resized_crop(jpegs, plan, seeds.stream("base"))
    return {"images": images, "labels": labels}


def dali_runner(graph, plan: DataPlan, seed: int, **kw) -> Runner:
    """A built pipeline's run()."""
    pipe, _ = loaders.build_pipeline(graph, plan, seed=seed, **kw)
    pipe.build()
    return Runner(pipe.run, plan.data.batch_size)


def forever(loader: loaders.Loader) -> Iterator[loaders.Batch]:
    while True:
        yield from loader


# -- models and the KD step ------------------------------------------------------------------


@dataclass
class Models:
    distiller: Distiller  # the training step's models and losses
    optimizer: torch.optim.Optimizer

    def step(self, batch: loaders.Batch) -> None:
        """The training loop's step on one batch, fp32 or bf16 (no loss scaling)."""
        self.distiller.step(batch, self.optimizer, _NO_SCALER)


def build_models(cfg: ProfileConfig, kd: KDConfig, num_classes: int, device: str, data_norm=None):
    """Randomly initialised models (weights do not change throughput), or None without a
    student. ``data_norm``: the data's normalization, where it sets one."""
    if not cfg.student:
        if cfg.teacher:
            raise DalikdError("--teacher needs --student: the KD step trains a student")
        return None
    model = ModelConfig(student=cfg.student, teacher=cfg.teacher)
    distiller = Distiller.build(model, kd, num_classes, device, weights=False,
                                data_norm=data_norm).train()  # fmt: skip
    return Models(distiller, make_optimizer(distiller.student, OptimConfig(lr=0.01)))


_NO_SCALER = torch.amp.GradScaler(enabled=False)


def _synthetic_batch(pool_size: int, mixing: bool, data: DataConfig, classes: int, device: str):
    """A Batch of random uint8 images already on the device, shaped as the Loader's: x' holds
    pool_size·B rows, view-major, with per-row λ and partner for mixing schemes."""
    tdev = loaders.torch_device(device)
    b, s = data.batch_size, data.image_size
    gen = torch.Generator().manual_seed(0)
    rows = pool_size * b

    def pixels(n: int) -> torch.Tensor:
        return torch.randint(256, (n, s, s, 3), generator=gen, dtype=torch.uint8).to(tdev)

    return loaders.Batch(
        images=pixels(b),
        labels=torch.randint(classes, (b,), generator=gen).to(tdev),
        aug_images=pixels(rows) if pool_size else None,
        lam=torch.rand(rows, generator=gen).to(tdev) if pool_size and mixing else None,
        perm=torch.randint(b, (rows,), generator=gen).to(tdev) if pool_size and mixing else None,
        pool_size=max(pool_size, 1),
    )


def model_runners(
    pool_size: int, mixing: bool, models: Models, data: DataConfig, classes: int
) -> dict[str, Runner]:
    """Teacher forward (B + k·B images: x and every x' row, a pool included), student
    forward + backward (x, and the B' rows of x' it trains on: all of them, or the pick of a
    pool), and the whole KD step on synthetic tensors already on the device."""
    distiller = models.distiller
    student = distiller.student
    teacher = distiller.teacher.module() if distiller.teacher is not None else None
    device, precision, b = distiller.device, distiller.precision, data.batch_size
    batch = _synthetic_batch(pool_size, mixing, data, classes, device)
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    runs: dict[str, Runner] = {}
    seen = [batch.images] if batch.aug_images is None else [batch.images, batch.aug_images]
    if teacher is not None:
        teacher_input = prepare_images(torch.cat(seen), device, input_norm(teacher))

        def teacher_forward():
            with torch.no_grad(), autocast(device, precision):
                teacher(teacher_input)

        runs["teacher"] = Runner(teacher_forward, b, sync)
    if pool_size > 1:  # the student trains on the picked rows only
        kd = distiller.kd
        seen[1] = seen[1][: pick_count(len(seen[1]), kd.pick_count, kd.pick_fraction)]
    student_views = [prepare_images(x, device, distiller.input_norm) for x in seen]
    targets = [batch.labels.repeat(-(-len(x) // b))[: len(x)] for x in seen]

    def student_step():
        for x, y in zip(student_views, targets, strict=True):
            with autocast(device, precision):
                loss = F.cross_entropy(student(x), y)
            loss.backward()
        student.zero_grad(set_to_none=True)

    runs["student"] = Runner(student_step, b, sync)

    def synthetic_step():
        models.step(batch)

    runs["synthetic"] = Runner(synthetic_step, b, sync)
    return runs

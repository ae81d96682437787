"""The T. stddev probe: rank augmentations (--aug values) for KD with the teacher alone.

Wang et al. (NeurIPS 2022): the lower the T. stddev of a scheme (the standard deviation of the
teacher's mean probability, dalikd.metrics), the lower the test loss of a student distilled
with it. The probe trains nothing. For each scheme it runs the training data
(:class:`dalikd.recovery.TrainData`, what ``dalikd train`` reads) for a number of steps;
the frozen teacher sees x and x' of every step, and its softmax rows, x's then those of the x'
a student would be trained on (for a candidate pool: the picked ones, by the same
:class:`dalikd.step.Distiller` as training), go into one :class:`~dalikd.metrics.TStddev`, in the
order of the paper's reference code. ``none`` contributes x only.

A group is ``group_steps`` steps of teacher rows for every scheme and batch size, as in the
reference code (5 steps: 640 rows with x' at batch 64, 320 for ``none``). Every
scheme sees the same batches of x (the same seed), so with groups of whole steps each group
holds the same images of x whatever the scheme, and ``identity`` (x' = x: every row twice, the
same group means) gives exactly the number of ``none``. Groups of equal rows would
instead credit ``none`` with twice the distinct images per group, a lower T. stddev (by about
√2) that says nothing about the augmentation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from dalikd import pick, recovery
from dalikd.atomic import write_atomic, write_text_atomic
from dalikd.batch import data_norm
from dalikd.config import (
    PAPER_AUGS,
    DataConfig,
    KDConfig,
    ModelConfig,
    TrainConfig,
    flags_named_as_keys,
    read_config_file,
    validate,
)
from dalikd.device import autocast, prepare_batch, resolve_device
from dalikd.errors import DalikdError
from dalikd.metrics import GROUP_STEPS, TStddev
from dalikd.models import check_classes, checkpoint_classes
from dalikd.plan import plan_for
from dalikd.sources import open_dataset
from dalikd.step import Distiller


@dataclass(frozen=True)
class ProbeConfig:
    data: DataConfig  # path, image_size, batch_size (the paper's is 64), threads
    model: ModelConfig  # teacher + teacher_weights; student only for student-based picks
    augs: tuple[str, ...] = PAPER_AUGS  # --aug values, one probe each, in this order
    epochs: int = 0  # probe length in epochs of train/ ...
    samples: int = 0  # ... or in images of x (one of the two, > 0)
    group_steps: int = GROUP_STEPS  # steps per group (the reference's 5: 640 rows at batch 64
    # with x', 320 for none); group_rows = group_steps x the teacher rows of one step
    kd: KDConfig = field(default_factory=KDConfig)  # granularity, pool_size, pick_*
    device: str = "auto"  # auto | cpu | gpu
    precision: str = "auto"  # autocast of the teacher (auto: bf16 on GPU, fp32 on CPU)
    seed: int = 0


@dataclass(frozen=True)
class ProbeResult:
    aug: str
    t_stddev: float  # lower = better for KD
    mean_entropy: float  # mean teacher entropy (nats, T = 1) of all the rows counted
    samples: int  # images of x seen
    rows: int  # teacher probability rows counted (x and x')
    groups: int  # complete groups
    group_rows: int  # rows per group: group_steps x the teacher rows of one step
    seconds: float
    plan: dict = field(default_factory=dict)  # the data plan the scheme ran (DataPlan.to_dict)

    def to_dict(self) -> dict:
        return {"aug": self.aug, "t_stddev": self.t_stddev, "mean_entropy": self.mean_entropy,
                "samples": self.samples, "rows": self.rows, "groups": self.groups,
                "group_rows": self.group_rows, "plan": self.plan}  # fmt: skip


class ProbeReporter(Protocol):
    """What the probe tells the outside world; the CLI draws a bar per scheme."""

    def aug_start(self, aug: str, steps: int) -> None: ...
    def step(self, done: int) -> None: ...
    def aug_end(self, result: ProbeResult) -> None: ...


class SilentProbeReporter:
    def aug_start(self, aug: str, steps: int) -> None:
        pass

    def step(self, done: int) -> None:
        pass

    def aug_end(self, result: ProbeResult) -> None:
        pass


def probe_config(
    config_file: str | None,
    given: dict,
    samples: int = 0,
    flags: dict[str, str] | None = None,
) -> ProbeConfig:
    """The probe's settings from its layers: the probe's defaults (batch 64, 10 epochs, groups
    of 5 steps, the paper's schemes) < the dataset's own (dataset.json) < ``config_file`` (a
    config with [data], [model], [kd] and [probe] tables: a paper config) < ``given`` (dotted
    keys: the flags). ``samples`` > 0: the probe's length in images instead of epochs."""
    from dalikd.settings import command_config

    file_values = read_config_file(config_file) if config_file else None
    model = (file_values or {}).get("model")
    teacher = given.get("model.teacher") or (model.get("teacher") if isinstance(model, dict)
                                             else None)  # fmt: skip
    if not teacher:
        raise DalikdError("the T. stddev probe needs --teacher and --teacher-weights")
    # the reference's batch; a student only where a pick criterion needs one
    base = TrainConfig(data=DataConfig(batch_size=64), model=ModelConfig(student=""))
    cfg = command_config(file_values, given, base=base, flags=flags)
    return ProbeConfig(data=cfg.data, model=cfg.model, augs=cfg.probe.augs,
                       epochs=0 if samples else cfg.probe.epochs, samples=samples,
                       group_steps=cfg.probe.group_steps, kd=cfg.kd, device=cfg.device,
                       precision=cfg.precision, seed=cfg.seed)  # fmt: skip


def group_rows(group_steps: int, batch_size: int, pool_size: int, kd: KDConfig) -> int:
    """Rows per group: ``group_steps`` steps of teacher rows (the reference's 5 steps: 640 rows
    at batch 64 with x', 320 of x alone for plain KD)."""
    return group_steps * rows_per_step(batch_size, pool_size, kd)


def rows_per_step(batch_size: int, pool_size: int, kd: KDConfig) -> int:
    """Teacher rows one step adds: B for x, plus B for x' (the kept count for a pool of
    ``pool_size`` views per image; 0: no x')."""
    if pool_size == 0:
        return batch_size
    if pool_size == 1:
        return 2 * batch_size
    return batch_size + pick.pick_count(pool_size * batch_size, kd.pick_count, kd.pick_fraction)


def _check(cfg: ProbeConfig) -> None:
    flags = flags_named_as_keys("data.image_size", "data.batch_size", "data.threads",
                                "data.crop_scale", "kd.pool_size", "seed")  # fmt: skip
    validate(TrainConfig(data=cfg.data, model=cfg.model, kd=cfg.kd, device=cfg.device,
                         precision=cfg.precision, seed=cfg.seed), flags)  # fmt: skip
    if not cfg.model.teacher:
        raise DalikdError("the T. stddev probe needs --teacher and --teacher-weights")
    if (cfg.epochs > 0) == (cfg.samples > 0):
        raise DalikdError("give the probe length as --epochs N or --samples N (one of them)")
    if cfg.epochs < 0 or cfg.samples < 0:
        raise DalikdError("--epochs and --samples must be positive")
    if cfg.group_steps < 1:
        raise DalikdError(f"--group-steps must be at least 1, got {cfg.group_steps}")
    if not cfg.augs:
        raise DalikdError("no --aug to probe")


def run_probe(cfg: ProbeConfig, reporter: ProbeReporter | None = None) -> list[ProbeResult]:
    """T. stddev of every scheme of ``cfg.augs``, ranked: lowest (best for KD) first.

    Everything is checked before the first scheme runs: the recipes, the models, and that the
    probe is long enough to close 2 groups for every scheme.
    """
    _check(cfg)
    reporter = reporter or SilentProbeReporter()
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device != "gpu":
        raise DalikdError("--precision fp16 needs a GPU; on CPU use fp32 (default) or bf16")
    torch.manual_seed(cfg.seed)
    dataset = open_dataset(cfg.data.path)  # a folder of images or a shard set
    w = cfg.model.teacher_weights  # a dalikd checkpoint of other classes: a meaningless probe
    check_classes(checkpoint_classes(w), dataset.classes, f"teacher weights {w}")
    # one data plan per scheme, resolved as training resolves its own
    plans = {aug: plan_for(cfg.data, replace(cfg.kd, aug=aug), device=device, seed=cfg.seed,
                           raw_shape=dataset.raw_shape, validates=False)
             for aug in dict.fromkeys(a.strip() for a in cfg.augs)}  # fmt: skip
    batch_size = cfg.data.batch_size
    steps_per_epoch = len(dataset.train) // batch_size  # the loader drops the incomplete batch
    if steps_per_epoch == 0:
        raise DalikdError(
            f"{len(dataset.train)} training images make no full batch of {batch_size}; "
            "lower --batch-size"
        )
    steps = cfg.epochs * steps_per_epoch if cfg.epochs else math.ceil(cfg.samples / batch_size)
    needed = 2 * cfg.group_steps  # steps that close 2 groups, the same for every scheme
    if needed > steps:
        raise DalikdError(
            f"too few samples for T. stddev: 2 groups of {cfg.group_steps} steps (batch "
            f"{batch_size}) need {needed * batch_size} samples ({needed} steps); this probe has "
            f"{steps * batch_size} ({steps} steps). Use --samples {needed * batch_size} or more, "
            "or a smaller --group-steps"
        )

    needs_student = cfg.kd.pick_criterion != "teacher_entropy" and any(
        p.pool_size > 1 for p in plans.values()
    )
    if needs_student and not cfg.model.student:
        raise DalikdError(
            f"--pick-criterion {cfg.kd.pick_criterion} scores the pool with a student: "
            "pass --student (and --student-weights)"
        )
    # frozen: only the teacher's pass and the pick of a training step run, in eval mode
    dn = data_norm(cfg.data.mean, cfg.data.std)  # the data's normalization, where it sets one
    distiller = Distiller.build(cfg.model, cfg.kd, dataset.num_classes, device, cfg.precision,
                                student=needs_student, data_norm=dn).eval()  # fmt: skip

    source = recovery.source_of(dataset.train)  # a folder's files or a shard set's samples
    results, left_out = [], recovery.LeftOutWarning(source.what)
    for aug, plan in plans.items():
        plan = replace(plan, norm=distiller.input_norm)  # the models' inputs (cutout's fill)
        reporter.aug_start(aug, steps)
        t0 = time.perf_counter()
        # training's own data: every scheme the same x (a file that fails to decode is left
        # out at the same step in each, said once)
        loader = recovery.TrainData(source, plan, epoch=0, on_failure=left_out,
                                    preallocate=False)  # fmt: skip
        acc = TStddev(group_rows(cfg.group_steps, batch_size, plan.pool_size, cfg.kd))
        done = 0
        while done < steps:  # one epoch per iteration, reshuffled each time
            for b in loader:
                b = prepare_batch(b, device, distiller.input_norm)
                with autocast(device, cfg.precision):
                    logits = distiller.teacher_outputs(b).rows()
                acc.add(logits.float().softmax(dim=1))
                done += 1
                reporter.step(done)
                if done == steps:
                    break
        del loader  # frees the DALI pipeline before the next scheme builds its own
        result = ProbeResult(aug, acc.value(), acc.mean_entropy(), done * batch_size, acc.rows,
                             acc.groups, acc.group_size, time.perf_counter() - t0,
                             plan.to_dict())  # fmt: skip
        reporter.aug_end(result)
        results.append(result)
    return sorted(results, key=lambda r: r.t_stddev)


# -- output ------------------------------------------------------------------------------------


def results_json(results: list[ProbeResult], cfg: ProbeConfig) -> dict:
    return {
        "results": [r.to_dict() for r in results],
        "group_steps": cfg.group_steps,
        "batch_size": cfg.data.batch_size,
        "teacher": cfg.model.teacher,
        "teacher_weights": cfg.model.teacher_weights,
    }


def write_json(results: list[ProbeResult], cfg: ProbeConfig, path: str | Path) -> None:
    write_text_atomic(json.dumps(results_json(results, cfg), indent=2) + "\n", path)


def write_plot(results: list[ProbeResult], path: str | Path, title: str = "") -> None:
    """A bar chart of T. stddev per scheme, in the ranked order (best first), as a PNG."""
    # The object API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(max(4.0, 0.9 * len(results) + 1.5), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(results)), [r.t_stddev for r in results], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{r.t_stddev:.3g}" for r in results], fontsize=7)
    ax.set_xticks(range(len(results)), [r.aug for r in results], rotation=30, ha="right")
    ax.set_ylabel("T. stddev (lower = better for KD)")
    ax.margins(y=0.12)  # room for the value labels; bars start at 0
    ax.set_title(title or "teacher T. stddev per augmentation", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))

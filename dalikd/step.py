"""One distillation step: :class:`Distiller` owns the student, a teacher source, the pick of a
candidate pool and the losses (docs/method.md).

Training, the T. stddev probe and the profiler all run this one step. The teacher is a
:class:`dalikd.teacher.TeacherSource` given at construction (the network itself, or a cache of
its outputs that falls back to it): the Distiller asks it for a step's outputs and never reaches
into it; nothing outside assigns to a Distiller's attributes. The teacher is frozen once, by its
source; only the student follows :meth:`Distiller.train` / :meth:`Distiller.eval` (timm's
``task/distillation.py`` works the same way), and in distributed training the Distiller wraps
its own student in DDP. No DALI import: the model side runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dalikd import distributed, pick
from dalikd.batch import Batch, InputNorm
from dalikd.checkpoint import Position
from dalikd.config import KDConfig, ModelConfig, OptimConfig
from dalikd.device import autocast, place, prepare_batch
from dalikd.losses import kd_divergence, soft_labels
from dalikd.metrics import tstddev_sums
from dalikd.models import build_model, input_norm, student_norm
from dalikd.teacher import LiveTeacher, TeacherOut, TeacherSource, TStdSums

__all__ = ["Distiller", "StepOutput", "TeacherOut", "build_student", "make_optimizer"]


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # named losses; "loss" is what to backpropagate
    # The teacher rows the T. stddev metric counts: x's, then those of the x' trained on.
    teacher_logits: torch.Tensor | None
    # their T. stddev sums (dalikd.metrics.tstddev_sums; exact where a cache gave them)
    tstd_sums: TStdSums | None = None


class Distiller:
    """The student, a teacher source (None: supervised) and the KD loss settings.

    ``teacher``: a :class:`~dalikd.teacher.TeacherSource`, or a built network (run live).
    ``device`` ("cpu" | "gpu"), ``precision`` and ``channels_last`` (the input layout on a
    GPU) matter to :meth:`step` only. ``ctx``: a distributed run, whose student the step calls
    through DDP (``student`` stays the module itself: what checkpoints save). ``data_norm``: the
    data's normalization (``DataConfig.mean`` / ``std``), None where it sets none.
    """

    def __init__(
        self,
        student: nn.Module | None,
        teacher: TeacherSource | nn.Module | None,
        kd: KDConfig,
        device: str = "cpu",
        precision: str = "auto",
        channels_last: bool = True,
        ctx: distributed.Dist | None = None,
        data_norm: InputNorm | None = None,
    ) -> None:
        if isinstance(teacher, nn.Module):
            teacher = LiveTeacher(teacher)  # frozen there, once
        self.student, self.teacher, self.kd = student, teacher, kd
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.data_norm = data_norm
        # the module the step calls: DDP synchronises the gradients across the ranks
        self._forward = student
        if ctx is not None and ctx.enabled and student is not None:
            self._forward = distributed.wrap(ctx, student, device)

    @classmethod
    def build(
        cls,
        model: ModelConfig,
        kd: KDConfig,
        num_classes: int,
        device: str,
        precision: str = "auto",
        *,
        weights: bool = True,
        student: bool = True,
        channels_last: bool = True,
        data_norm: InputNorm | None = None,
    ) -> Distiller:
        """The models of ``model`` with ``num_classes`` outputs, set up once for every caller:
        built (and loaded, unless ``weights`` is False: random weights, as the profiler
        times), the teacher live, frozen and fed the student's normalization (AdaptInput maps
        it to its own on the device), on ``device``, channels_last on a GPU.
        ``student=False``: a teacher alone (the probe's teacher-entropy pick)."""
        s = build_student(model, num_classes, device, weights=weights,
                          channels_last=channels_last) if student else None  # fmt: skip
        t = None
        if model.teacher:
            norm = student_norm(s, data_norm) if s is not None else None
            t = LiveTeacher.from_config(model, num_classes, device, norm, weights=weights,
                                        channels_last=channels_last,
                                        data_norm=data_norm)  # fmt: skip
            t.module()  # built now: a wrong weights file is said before the data loads
        return cls(s, t, kd, device, precision, channels_last, data_norm=data_norm)

    @property
    def input_norm(self) -> InputNorm:
        """The normalization the step's input images get: the student's (the teacher adapts)."""
        if self.student is not None:  # the data's where it sets one, else the student's own
            return student_norm(self.student, self.data_norm)
        return input_norm(self.teacher.module(), self.data_norm)  # its own, else the data's

    def train(self) -> Distiller:
        """Only the student goes to train mode; the teacher stays in eval."""
        self.student.train()
        return self

    def eval(self) -> Distiller:
        if self.student is not None:
            self.student.eval()
        return self

    def teacher_outputs(self, batch: Batch, at: Position | None = None) -> TeacherOut:
        """The teacher source's outputs for ``batch`` at ``at``, then the pick of a candidate
        pool (batch.pool_size = k > 1) where the source did not make it: its teacher logits are
        reused as the KD targets of the kept rows (the teacher sees B + k·B images a step)."""
        if self.teacher is None:
            out = TeacherOut(None, None)
        else:
            out = self.teacher.outputs(batch, at or Position())
        if batch.aug_images is not None and batch.pool_size > 1 and out.keep is None:
            keep = pick.select(self.kd, batch.aug_images, out.logits_aug, self.student)
            aug = out.logits_aug[keep] if out.logits_aug is not None else None
            out = TeacherOut(out.logits_x, aug, keep, out.tstd_sums)
        return out

    def __call__(self, batch: Batch, at: Position | None = None) -> StepOutput:
        """Losses of one step on model-ready images.

        With teacher outputs: the two-view KD loss of losses.py, the x' term only when the
        batch carries aug_images. Without: supervised, CE(s(x), y). ``kd.mixed_label_ce`` > 0
        adds CE(s(x'), lam·onehot(y) + (1 - lam)·onehot(y[perm])).
        """
        kd = self.kd
        student_logits = self._forward(batch.images)
        losses = {"ce_loss": F.cross_entropy(student_logits, batch.labels)}
        teacher = self.teacher_outputs(batch, at)
        # Labels of each x' row: its own image's, and its partner's (the same without mixing).
        aug_images, lam = batch.aug_images, batch.lam
        own = batch.labels.repeat(batch.pool_size)
        partner = own if batch.perm is None else batch.labels[batch.perm]
        keep = teacher.keep
        if keep is not None:
            aug_images, own, partner = aug_images[keep], own[keep], partner[keep]
            lam = lam[keep] if lam is not None else None
        # A second, separate student pass: x' is a different batch for BatchNorm statistics.
        aug_student_logits = self._forward(aug_images) if aug_images is not None else None

        if teacher.logits_x is None:
            losses["loss"] = losses["ce_loss"]
        else:
            losses["kd_loss"] = kd_divergence(student_logits, teacher.logits_x, kd.temperature)
            total_kd = losses["kd_loss"]
            if aug_images is not None:
                losses["kd_aug_loss"] = kd_divergence(
                    aug_student_logits, teacher.logits_aug, kd.temperature
                )
                total_kd = total_kd + losses["kd_aug_loss"]
            losses["loss"] = kd.ce_weight * losses["ce_loss"] + kd.kd_weight * total_kd
        if aug_images is not None and kd.mixed_label_ce:
            targets = soft_labels(own, partner, lam, student_logits.shape[1])
            losses["mixed_ce_loss"] = F.cross_entropy(aug_student_logits.float(), targets)
            losses["loss"] = losses["loss"] + kd.mixed_label_ce * losses["mixed_ce_loss"]
        rows = teacher.rows()
        sums = teacher.tstd_sums
        if sums is None and rows is not None:
            sums = tstddev_sums(rows)
        return StepOutput(losses, rows, sums)

    def step(
        self,
        batch: Batch,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        at: Position | None = None,
    ) -> StepOutput:
        """One optimization step on a batch as the loader hands it over (uint8 images) at
        position ``at`` of the run: normalize on the device, the losses under autocast,
        backward (loss-scaled where ``scaler`` is enabled: fp16), optimizer step."""
        batch = prepare_batch(batch, self.device, self.input_norm, self.channels_last)
        with autocast(self.device, self.precision):
            out = self(batch, at)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return out


def build_student(
    model: ModelConfig, num_classes: int, device: str, *, weights: bool = True,
    channels_last: bool = True,
) -> nn.Module:  # fmt: skip
    """``model.student`` with ``num_classes`` outputs (its initial weights unless ``weights`` is
    False), on ``device``, channels_last on a GPU."""
    s = build_model(model.student, num_classes, model.student_weights if weights else "",
                    role="student")  # fmt: skip
    return place(s, device, channels_last)


def make_optimizer(student: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD; 1-d parameters (BatchNorm weights, biases) without weight decay unless
    ``optim.decay_norm_and_bias``."""
    decay, no_decay = [], []
    for p in student.parameters():
        (decay if p.ndim > 1 or optim.decay_norm_and_bias else no_decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": optim.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
    )  # fmt: skip

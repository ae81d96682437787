"""One distillation step: :class:`Distiller` owns the student and the frozen teacher, the
teacher pass over x and x', the pick of a candidate pool and the losses (docs/method.md).

Training, the T. stddev probe and the profiler all build their models with
:meth:`Distiller.build` and run this one step. The teacher is frozen and put in eval mode
once, here; only the student follows :meth:`Distiller.train` / :meth:`Distiller.eval`
(timm's ``task/distillation.py`` works the same way). No DALI import: the model side runs
without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dalikd import pick
from dalikd.batch import Batch, InputNorm
from dalikd.config import KDConfig, ModelConfig, OptimConfig
from dalikd.device import autocast, prepare_batch, torch_device
from dalikd.losses import kd_divergence, soft_labels
from dalikd.models import adapt_input, build_model, input_norm


@dataclass
class TeacherOut:
    """What the teacher contributes to one step; a cache of teacher outputs substitutes it."""

    logits_x: torch.Tensor | None  # [B, classes] teacher logits of x; None without a teacher
    logits_aug: torch.Tensor | None  # [B', classes] of the x' rows trained on; None: no x'
    keep: torch.Tensor | None  # [B'] int64 kept rows of a candidate pool (k·B); None: no pool

    def rows(self) -> torch.Tensor | None:
        """The rows T. stddev counts: x's, then those of the x' trained on."""
        if self.logits_x is None or self.logits_aug is None:
            return self.logits_x
        return torch.cat([self.logits_x, self.logits_aug])


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # named losses; "loss" is what to backpropagate
    # The teacher rows the T. stddev metric counts: x's, then those of the x' trained on.
    teacher_logits: torch.Tensor | None


class Distiller:
    """The student, the frozen teacher (None: supervised) and the KD loss settings.

    ``student`` is the module the step calls (a DDP wrapper in distributed training);
    ``device`` ("cpu" | "gpu"), ``precision`` and ``channels_last`` (the input layout on a
    GPU) matter to :meth:`step` only.
    """

    def __init__(
        self,
        student: nn.Module | None,
        teacher: nn.Module | None,
        kd: KDConfig,
        device: str = "cpu",
        precision: str = "auto",
        channels_last: bool = True,
    ) -> None:
        if teacher is not None:
            teacher.eval().requires_grad_(False)  # frozen once, never switched back to train
        self.student, self.teacher, self.kd = student, teacher, kd
        self.device, self.precision, self.channels_last = device, precision, channels_last

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
    ) -> Distiller:
        """The models of ``model`` with ``num_classes`` outputs, set up once for every caller:
        built (and loaded, unless ``weights`` is False: random weights, as the profiler
        times), the teacher frozen and fed the student's normalization (:class:`AdaptInput`
        maps it to its own on the device), on ``device``, channels_last on a GPU.
        ``student=False``: a teacher alone (the probe's teacher-entropy pick)."""
        s = None
        if student:
            s = build_model(model.student, num_classes, model.student_weights if weights else "",
                            role="student")  # fmt: skip
        t = None
        if model.teacher:
            # The teacher's build leaves the run's torch RNG as it was: a run whose teacher is
            # built late or never (--teacher-cache) draws the same dropout masks etc.
            teacher_weights = model.teacher_weights if weights else ""
            with torch.random.fork_rng(devices=[]):
                t = build_model(model.teacher, num_classes, teacher_weights, role="teacher")
            t.eval().requires_grad_(False)
            if s is not None:  # it gets the student's inputs (a timm model's may differ)
                t = adapt_input(t, input_norm(s))
        for m in (s, t):
            if m is not None:
                place(m, device, channels_last)
        return cls(s, t, kd, device, precision, channels_last)

    @property
    def input_norm(self) -> InputNorm:
        """The normalization the step's input images get: the student's (the teacher adapts)."""
        return input_norm(self.student if self.student is not None else self.teacher)

    def train(self) -> Distiller:
        """Only the student goes to train mode; the teacher stays in eval."""
        self.student.train()
        return self

    def eval(self) -> Distiller:
        if self.student is not None:
            self.student.eval()
        return self

    def teacher_outputs(self, batch: Batch) -> TeacherOut:
        """One teacher pass over x and x' together (eval mode: the same numbers as two), then
        the pick of a candidate pool (batch.pool = k > 1), whose teacher logits are reused as
        the KD targets of the kept rows: the teacher sees B + k·B images per step."""
        logits_x = logits_aug = keep = None
        aug_images = batch.aug_images
        if self.teacher is not None:
            views = [batch.images] if aug_images is None else [batch.images, aug_images]
            with torch.no_grad():
                logits = self.teacher(torch.cat(views))
            logits_x = logits[: len(batch)]
            logits_aug = logits[len(batch) :] if aug_images is not None else None
        if aug_images is not None and batch.pool > 1:
            keep = pick.select(self.kd, aug_images, logits_aug, self.student)
            logits_aug = logits_aug[keep] if logits_aug is not None else None
        return TeacherOut(logits_x, logits_aug, keep)

    def __call__(self, batch: Batch) -> StepOutput:
        """Losses of one step on model-ready images.

        With teacher outputs: the two-view KD loss of losses.py, the x' term only when the
        batch carries aug_images. Without: supervised, CE(s(x), y). ``kd.mixed_label_ce`` > 0
        adds CE(s(x'), lam·onehot(y) + (1 - lam)·onehot(y[perm])).
        """
        kd = self.kd
        student_logits = self.student(batch.images)
        losses = {"ce_loss": F.cross_entropy(student_logits, batch.labels)}
        teacher = self.teacher_outputs(batch)
        # Labels of each x' row: its own image's, and its partner's (the same without mixing).
        aug_images, lam = batch.aug_images, batch.lam
        own = batch.labels.repeat(batch.pool)
        partner = own if batch.perm is None else batch.labels[batch.perm]
        keep = teacher.keep
        if keep is not None:
            aug_images, own, partner = aug_images[keep], own[keep], partner[keep]
            lam = lam[keep] if lam is not None else None
        # A second, separate student pass: x' is a different batch for BatchNorm statistics.
        aug_student_logits = self.student(aug_images) if aug_images is not None else None

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
        return StepOutput(losses, teacher.rows())

    def step(
        self, batch: Batch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> StepOutput:
        """One optimization step on a batch as the loader hands it over (uint8 images):
        normalize on the device, the losses under autocast, backward (loss-scaled where
        ``scaler`` is enabled: fp16), optimizer step."""
        batch = prepare_batch(batch, self.device, self.input_norm, self.channels_last)
        with autocast(self.device, self.precision):
            out = self(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return out


def place(model: nn.Module, device: str, channels_last: bool = True) -> nn.Module:
    """``model`` on ``device``; channels_last memory on a GPU (the layout its convolutions
    prefer, and the one :func:`dalikd.device.prepare_images` hands over there)."""
    model.to(torch_device(device))
    if device == "gpu" and channels_last:
        model.to(memory_format=torch.channels_last)
    return model


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

"""CutMixPick's pick: score a pool of candidate views and keep the highest-scoring ones.

Wang et al. (NeurIPS 2022): candidates on which the teacher is least certain (highest
entropy) make the best KD inputs. The pick is generic over any pool (dalikd.recipes.Pool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalikd.config import KDConfig, PickCriterion, choices
from dalikd.errors import DalikdError
from dalikd.losses import kl_divergence
from dalikd.metrics import entropy

CRITERIA = choices(PickCriterion)


def logit_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (natural log) of softmax(logits) at T = 1, in float32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return entropy(log_p.exp(), log_p)


def pick_count(pool_rows: int, count: int, fraction: float) -> int:
    """How many candidates to keep: ``count`` if set, else round(fraction · pool rows)."""
    n = count or round(fraction * pool_rows)
    if not 1 <= n <= pool_rows:
        raise DalikdError(
            f"the pick keeps {n} of a pool of {pool_rows} candidates; use 1..{pool_rows}"
        )
    return n


def scores(
    criterion: str,
    teacher_logits: torch.Tensor | None,
    student_logits: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """One score per candidate; higher is kept first."""
    if criterion == "teacher_entropy":
        return logit_entropy(teacher_logits)
    if criterion == "student_entropy":
        return logit_entropy(student_logits)
    if criterion == "kld":
        return kl_divergence(student_logits, teacher_logits, temperature, reduction="rows")
    raise DalikdError(f"unknown pick criterion '{criterion}'; known: {', '.join(CRITERIA)}")


def pick(candidate_scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, highest first."""
    return candidate_scores.topk(count, sorted=True).indices


def select(
    kd: KDConfig,
    pool_images: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    student: nn.Module | None,
) -> torch.Tensor:
    """Indices of the pool rows to keep, by ``kd.pick_criterion``: the pick of training
    (dalikd.step.Distiller, which the T. stddev probe runs too), one code path.

    ``teacher_logits`` are the teacher's logits of ``pool_images`` (already computed: reused);
    ``student`` scores the pool only for the student-based criteria, without gradient.
    """
    if teacher_logits is None and kd.pick_criterion != "student_entropy":
        raise DalikdError(
            f"--pick-criterion {kd.pick_criterion} needs a teacher; without --teacher use "
            "student_entropy"
        )
    student_logits = None
    if kd.pick_criterion != "teacher_entropy":
        if student is None:
            raise DalikdError(f"--pick-criterion {kd.pick_criterion} needs a student")
        with torch.no_grad():  # scoring only: no gradient through the candidates
            student_logits = student(pool_images)
    count = pick_count(len(pool_images), kd.pick_count, kd.pick_fraction)
    return pick(scores(kd.pick_criterion, teacher_logits, student_logits, kd.temperature), count)

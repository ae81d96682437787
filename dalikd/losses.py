"""The two-view distillation loss of Wang et al. (NeurIPS 2022), see docs/method.md.

loss = ce_weight * CE(s(x), y) + kd_weight * [D_T(t(x), s(x)) + D_T(t(x'), s(x'))]
D_T(t, s) = T^2 * sum_c KL(softmax(t/T) || softmax(s/T)) / batch size
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: str = "batchmean",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) in ``dtype`` (float32; the teacher cache measures its
    formats in float64), the one KL of dalikd (the loss, the pick's kld score, the val
    agreement, the cache's measure): summed over classes and averaged over the rows
    ("batchmean"), summed over everything ("sum"), or one value per row ("rows")."""
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    if reduction == "rows":
        return (log_t.exp() * (log_t - log_s)).sum(dim=1)
    return F.kl_div(log_s, log_t, reduction=reduction, log_target=True)


def kd_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """D_T: KL(teacher || student) at temperature T, summed over classes, mean over the batch,
    times T^2 (keeps gradient size independent of T, Hinton et al.). Computed in float32."""
    return kl_divergence(student_logits, teacher_logits, temperature) * temperature**2


def soft_labels(
    own_labels: torch.Tensor,
    partner_labels: torch.Tensor,
    lam: torch.Tensor | None,
    num_classes: int,
) -> torch.Tensor:
    """lam · onehot(own) + (1 - lam) · onehot(partner); rows sum to 1. lam None means 1."""
    own = F.one_hot(own_labels, num_classes).float()
    if lam is None:
        return own
    partner = F.one_hot(partner_labels, num_classes).float()
    return lam[:, None] * own + (1 - lam[:, None]) * partner

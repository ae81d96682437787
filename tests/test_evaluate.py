"""Teacher-student agreement on val: top-1 agreement and KL(teacher || student) at T = 1,
against a NumPy reference on fixed logits."""

import numpy as np
import torch
from tiny_models import tiny_cnn

from dalikd.batch import Batch, normalize
from dalikd.evaluate import agreement_sums, evaluate


def numpy_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def numpy_agreement(student: np.ndarray, teacher: np.ndarray) -> tuple[float, float]:
    """(% rows with the same top-1, mean KL(teacher || student) at T = 1), in float64."""
    log_s, log_t = numpy_log_softmax(student), numpy_log_softmax(teacher)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=1)
    return 100.0 * np.mean(student.argmax(1) == teacher.argmax(1)), float(kl.mean())


def test_agreement_sums_on_fixed_logits():
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [0.5, 0.2, 0.1]])
    teacher = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.5, 0.2, 0.1]])
    agree, kl_sum = agreement_sums(student, teacher).tolist()
    assert agree == 3  # rows 0, 2, 3
    ref_agree, ref_kl = numpy_agreement(student.numpy().astype(np.float64), teacher.numpy())
    assert ref_agree == 75.0
    np.testing.assert_allclose(kl_sum / 4, ref_kl, rtol=1e-6)
    # identical logits: full agreement, zero divergence
    agree, kl_sum = agreement_sums(teacher, teacher).tolist()
    assert agree == 4 and abs(kl_sum) < 1e-6


def test_evaluate_with_a_teacher_reports_agreement_over_all_batches():
    torch.manual_seed(0)
    student, teacher = tiny_cnn(4).eval(), tiny_cnn(4).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [
        Batch(torch.randint(0, 256, (n, 12, 12, 3), dtype=torch.uint8, generator=gen),
              torch.randint(0, 4, (n,), generator=gen))
        for n in (5, 3)
    ]  # fmt: skip
    result = evaluate(student, batches, "cpu", teacher=teacher)
    with torch.no_grad():
        x = normalize(torch.cat([b.images for b in batches]))
        s, t = student(x).double().numpy(), teacher(x).double().numpy()
    ref_agree, ref_kl = numpy_agreement(s, t)
    assert result["count"] == 8
    assert result["agree_top1"] == ref_agree
    np.testing.assert_allclose(result["kl_ts"], ref_kl, rtol=1e-5)
    assert result["kl_ts"] > 0  # two different random models disagree
    assert "agree_top1" not in evaluate(student, batches, "cpu")  # no teacher, no agreement

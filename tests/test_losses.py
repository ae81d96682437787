"""The two-view KD loss against an independent NumPy computation."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_cnn

from dalikd.config import build_config
from dalikd.loaders import Batch
from dalikd.losses import kd_divergence
from dalikd.step import Distiller


def kd_step(student, teacher, batch, cfg):
    """The losses of one training step (dalikd.step.Distiller), as training computes them."""
    return Distiller(student, teacher, cfg.kd)(batch)


def np_kd(student, teacher, T):
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(teacher / T), softmax(student / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1)  # per sample, summed over classes
    return kl.mean() * T * T


@pytest.mark.parametrize("T", [1.0, 4.0, 7.5])
def test_kd_divergence_matches_numpy(T):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 10)) * 3, rng.normal(size=(6, 10)) * 3
    got = kd_divergence(torch.tensor(s), torch.tensor(t), T).item()
    assert got == pytest.approx(np_kd(s, t, T), rel=1e-5)


def test_kd_divergence_is_zero_for_identical_logits():
    z = torch.randn(5, 7)
    assert kd_divergence(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_t_squared_scaling():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    # Scaling logits by T makes the softened distributions the T=1 ones; the loss grows by T^2.
    at_1 = kd_divergence(s, t, 1.0)
    at_4 = kd_divergence(s * 4, t * 4, 4.0)
    assert at_4.item() == pytest.approx(16 * at_1.item(), rel=1e-5)


def _models_and_batch(with_aug):
    torch.manual_seed(0)
    student = tiny_cnn(5)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    images = torch.randn(6, 3, 8, 8)
    batch = Batch(images=images, labels=torch.arange(6) % 5,
                  aug_images=torch.randn(6, 3, 8, 8) if with_aug else None)  # fmt: skip
    return student, teacher, batch


def test_student_equal_to_teacher_leaves_only_the_ce_term():
    student, teacher, batch = _models_and_batch(with_aug=False)
    student.eval()  # same BN mode as the teacher: identical logits
    cfg = build_config(overrides={"kd.ce_weight": 0.3, "kd.kd_weight": 0.9})
    losses = kd_step(student, teacher, batch, cfg).losses
    ce = F.cross_entropy(student(batch.images), batch.labels)
    assert losses["kd_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss"].item() == pytest.approx(0.3 * ce.item(), rel=1e-5)


def test_two_view_loss_is_weighted_sum_of_its_terms():
    student, teacher, batch = _models_and_batch(with_aug=True)
    student.train()
    cfg = build_config(overrides={"kd.ce_weight": 0.1, "kd.kd_weight": 0.9, "kd.temperature": 4.0})
    torch.manual_seed(1)
    losses = kd_step(student, teacher, batch, cfg).losses
    # Independent recomputation: two separate student passes, teacher on each view.
    s_x = student(batch.images).detach().numpy()
    s_xa = student(batch.aug_images).detach().numpy()
    t_x = teacher(batch.images).numpy()
    t_xa = teacher(batch.aug_images).numpy()
    ce = F.cross_entropy(torch.tensor(s_x), batch.labels).item()
    expected = 0.1 * ce + 0.9 * (np_kd(s_x, t_x, 4.0) + np_kd(s_xa, t_xa, 4.0))
    assert set(losses) == {"loss", "ce_loss", "kd_loss", "kd_aug_loss"}
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-4)


def test_plain_kd_has_no_second_view_term():
    student, teacher, batch = _models_and_batch(with_aug=False)
    losses = kd_step(student, teacher, batch, build_config()).losses
    assert "kd_aug_loss" not in losses
    expected = 0.1 * losses["ce_loss"] + 0.9 * losses["kd_loss"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_supervised_without_teacher_is_plain_ce():
    student, _, batch = _models_and_batch(with_aug=False)
    losses = kd_step(student, None, batch, build_config()).losses
    assert set(losses) == {"loss", "ce_loss"}
    assert losses["loss"] is losses["ce_loss"]


def test_teacher_gets_no_gradient_and_student_does():
    student, teacher, batch = _models_and_batch(with_aug=True)
    kd_step(student, teacher, batch, build_config()).losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_soft_labels_match_numpy_and_sum_to_one():
    from dalikd.losses import soft_labels

    labels = torch.tensor([0, 2, 1, 2])
    lam = torch.tensor([0.25, 1.0, 0.5, 0.0])
    perm = torch.tensor([1, 0, 3, 2])
    got = soft_labels(labels, labels[perm], lam, 3).numpy()
    expected = np.zeros((4, 3))
    for i in range(4):
        expected[i, labels[i]] += lam[i].item()
        expected[i, labels[perm[i]]] += 1 - lam[i].item()
    np.testing.assert_allclose(got, expected, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


def test_mixed_label_ce_adds_ce_on_x_prime_with_soft_labels():
    student, teacher, batch = _models_and_batch(with_aug=True)
    batch.lam = torch.tensor([0.2, 0.5, 0.9, 1.0, 0.3, 0.7])
    batch.perm = torch.tensor([1, 2, 3, 4, 5, 0])
    student.eval()  # deterministic logits for the independent recomputation
    base = build_config()
    cfg = build_config(overrides={"kd.mixed_label_ce": 0.5})
    plain = kd_step(student, teacher, batch, base).losses["loss"].item()
    losses = kd_step(student, teacher, batch, cfg).losses
    log_p = F.log_softmax(student(batch.aug_images), 1).detach().numpy()
    onehot = np.eye(5)[batch.labels.numpy()]
    lam = batch.lam.numpy()[:, None]
    target = lam * onehot + (1 - lam) * onehot[batch.perm.numpy()]
    mixed_ce = -(target * log_p).sum(1).mean()
    assert losses["mixed_ce_loss"].item() == pytest.approx(mixed_ce, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(plain + 0.5 * mixed_ce, rel=1e-5)


def test_supervised_training_on_x_prime_only_with_mixed_label_ce():
    student, _, batch = _models_and_batch(with_aug=True)
    cfg = build_config(overrides={"kd.aug": "flip", "kd.mixed_label_ce": 1.0})
    losses = kd_step(student, None, batch, cfg).losses
    assert set(losses) == {"loss", "ce_loss", "mixed_ce_loss"}
    expected = losses["ce_loss"] + losses["mixed_ce_loss"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

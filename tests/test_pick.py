"""CutMixPick's pick and the T. stddev metric, against hand computations."""

import copy
import math
import threading

import numpy as np
import pytest
import torch
from tiny_models import tiny_cnn

from dalikd import loaders
from dalikd.config import DataConfig, build_config
from dalikd.data import scan_dataset
from dalikd.device import prepare_batch
from dalikd.errors import DalikdError
from dalikd.loaders import Batch
from dalikd.losses import kd_divergence
from dalikd.metrics import TStddev, t_stddev
from dalikd.pick import logit_entropy, pick, pick_count, scores
from dalikd.plan import resolve_plan
from dalikd.step import Distiller


def kd_step(student, teacher, batch, cfg):
    """The losses of one training step (dalikd.step.Distiller), as training computes them."""
    return Distiller(student, teacher, cfg.kd)(batch)


def test_pick_keeps_exactly_the_highest_entropy_candidates():
    # Row r has a peak of height h_r: the flatter the row, the higher its entropy.
    heights = torch.tensor([5.0, 0.1, 3.0, 0.0, 9.0, 1.0])
    logits = torch.zeros(6, 4)
    logits[:, 0] = heights
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    np_entropy = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(logit_entropy(logits).numpy(), np_entropy, rtol=1e-4)  # float32
    kept = pick(scores("teacher_entropy", logits, None, 4.0), 3)
    assert kept.tolist() == [3, 1, 5]  # flattest first: h = 0, 0.1, 1
    assert set(kept.tolist()) == set(np.argsort(-np_entropy)[:3].tolist())


def test_kld_criterion_is_per_row_kl_at_the_temperature():
    t, s = torch.randn(5, 3), torch.randn(5, 3)
    got = scores("kld", t, s, 2.0)
    for r in range(5):  # batchmean of one row = that row's KL; undo the T^2
        row = kd_divergence(s[r : r + 1], t[r : r + 1], 2.0) / 4.0
        assert got[r].item() == pytest.approx(row.item(), rel=1e-5)


def test_pick_count_defaults_to_half_the_pool_and_is_checked():
    assert pick_count(128, 0, 0.5) == 64
    assert pick_count(128, 10, 0.5) == 10
    with pytest.raises(DalikdError, match="keeps 200 of a pool of 128"):
        pick_count(128, 200, 0.5)


class CountingTeacher(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


def pool_batch(b=4, k=2, classes=5):
    torch.manual_seed(0)
    return Batch(
        images=torch.randn(b, 3, 8, 8),
        labels=torch.arange(b) % classes,
        aug_images=torch.randn(k * b, 3, 8, 8),
        lam=torch.rand(k * b),
        perm=torch.cat([torch.roll(torch.arange(b), j + 1) for j in range(k)]),
        pool_size=k,
    )


@pytest.mark.parametrize("k", [2, 3])
def test_teacher_sees_b_plus_kb_images_and_kd_targets_reuse_pool_logits(k):
    torch.manual_seed(1)
    student = tiny_cnn(5).eval()
    teacher = CountingTeacher(copy.deepcopy(tiny_cnn(5))).eval().requires_grad_(False)
    batch = pool_batch(k=k)
    cfg = build_config()
    out = kd_step(student, teacher, batch, cfg)
    assert teacher.images == 4 + k * 4  # B + k·B, no second pass over the kept candidates
    with torch.no_grad():
        pool_logits = teacher.inner(batch.aug_images)
    kept = pick(scores("teacher_entropy", pool_logits, None, 4.0), pick_count(4 * k, 0, 0.5))
    # The KD target of x' is the pool's teacher output on exactly the kept candidates.
    expected = kd_divergence(student(batch.aug_images[kept]), pool_logits[kept], 4.0)
    assert out.losses["kd_aug_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # The T. stddev rows: B for x, then the kept candidates.
    assert out.teacher_logits.shape == (4 + len(kept), 5)
    torch.testing.assert_close(out.teacher_logits[4:], pool_logits[kept])


def test_mixed_labels_follow_the_kept_candidates():
    student = tiny_cnn(5).eval()
    teacher = tiny_cnn(5).eval().requires_grad_(False)
    batch = pool_batch(k=2)
    cfg = build_config(overrides={"kd.mixed_label_ce": 1.0, "kd.pick_count": 3})
    out = kd_step(student, teacher, batch, cfg)
    with torch.no_grad():
        kept = pick(scores("teacher_entropy", teacher(batch.aug_images), None, 4.0), 3)
    own = batch.labels.repeat(2)[kept]
    partner = batch.labels[batch.perm[kept]]
    lam = batch.lam[kept]
    log_p = torch.log_softmax(student(batch.aug_images[kept]), 1)
    rows = torch.arange(3)
    expected = -(lam * log_p[rows, own] + (1 - lam) * log_p[rows, partner]).mean()
    assert out.losses["mixed_ce_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_criteria_need_a_teacher():
    cfg = build_config(overrides={"kd.aug": "cutmixpick", "kd.mixed_label_ce": 1.0})
    with pytest.raises(DalikdError, match="needs a teacher"):
        kd_step(tiny_cnn(5), None, pool_batch(), cfg)
    cfg = build_config(overrides={"kd.aug": "cutmixpick", "kd.mixed_label_ce": 1.0,
                                  "kd.pick_criterion": "student_entropy"})  # fmt: skip
    assert math.isfinite(kd_step(tiny_cnn(5), None, pool_batch(), cfg).losses["loss"].item())


def test_cutmixpick_pool_through_the_real_pipeline(solid_dataset):
    ds = scan_dataset(solid_dataset)
    data = DataConfig(path=str(solid_dataset), image_size=16, batch_size=4, threads=1)
    loader = loaders.train_loader(
        ds.train, resolve_plan(data, "cutmixpick", device="cpu", pool_size=3)
    )
    batch = next(iter(loader))
    assert batch.pool_size == 3 and batch.aug_images.shape == (12, 16, 16, 3)
    assert batch.lam.shape == (12,) and batch.perm.shape == (12,)
    teacher = CountingTeacher(tiny_cnn(3)).eval().requires_grad_(False)
    batch = prepare_batch(batch, "cpu")
    out = kd_step(tiny_cnn(3), teacher, batch, build_config(overrides={"kd.pool_size": 3}))
    assert teacher.images == 4 + 12
    assert out.teacher_logits.shape[0] == 4 + 6  # half of the pool kept


# -- T. stddev ---------------------------------------------------------------------------------


def test_t_stddev_by_hand():
    # 2 classes, groups of 2 rows: group means (0.7, 0.3), (0.5, 0.5), (0.6, 0.4).
    # The 7th row is an incomplete group: ignored.
    rows = [[0.8, 0.2], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.3, 0.7], [0.1, 0.9]]
    probs = torch.tensor(rows, dtype=torch.float64)
    # std of (0.7, 0.5, 0.6) with N-1 = 0.1 for both classes
    assert t_stddev(probs, group_size=2) == pytest.approx(0.1, rel=1e-12)


def test_t_stddev_needs_two_groups():
    with pytest.raises(
        DalikdError, match="at least 2 complete groups of 640 rows .1280 rows.; got 1000"
    ):
        t_stddev(torch.full((1000, 3), 1 / 3))


@pytest.mark.parametrize("chunk", [1, 37, 640, 1000])
def test_accumulator_equals_the_function_on_the_same_rows(chunk):
    torch.manual_seed(chunk)
    probs = torch.softmax(torch.randn(4000, 11) * 2, dim=1)
    acc = TStddev(group_size=640)
    for rows in probs.split(chunk):
        acc.add(rows)
    assert acc.groups == 6 and acc.rows == 4000
    assert acc.value() == pytest.approx(t_stddev(probs, 640), rel=1e-9)
    ent = -(probs.double() * probs.double().log()).sum(1).mean().item()
    assert acc.mean_entropy() == pytest.approx(ent, rel=1e-9)
    restored = TStddev()
    restored.load_state_dict(acc.state_dict())
    restored.add(probs[:1280])
    acc.add(probs[:1280])
    assert restored.value() == acc.value()


def test_pooled_t_stddev_over_ranks_equals_the_number_of_all_their_groups():
    """Two ranks (threads here), each with its own rows: the pooled value is T. stddev of the
    group means of both, and the entropy the mean over both ranks' rows."""
    torch.manual_seed(5)
    shards = [torch.softmax(torch.randn(n, 7) * 2, dim=1) for n in (6 * 64, 9 * 64 + 10)]
    accs = [TStddev(group_size=64) for _ in shards]
    for acc, rows in zip(accs, shards, strict=True):
        acc.add(rows)
    barrier, parts, results = threading.Barrier(2), [None, None], [None, None]

    def all_sum(rank):
        def reduce(t):  # every rank contributes, then every rank reads the sum
            parts[rank] = t
            barrier.wait()
            total = parts[0] + parts[1]
            barrier.wait()
            return total

        return reduce

    threads = [threading.Thread(target=lambda r=r: results.__setitem__(
        r, accs[r].pooled(all_sum(r)))) for r in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    means = torch.cat([rows[: len(rows) // 64 * 64].double().reshape(-1, 64, 7).mean(1)
                       for rows in shards])  # fmt: skip
    expected = means.std(dim=0, unbiased=True).mean().item()
    rows = torch.cat(shards).double()
    entropy = -(rows * rows.log()).sum(1).mean().item()
    for value, ent in results:
        assert value == pytest.approx(expected, rel=1e-12)
        assert ent == pytest.approx(entropy, rel=1e-12)
    # One process: the same as value() and mean_entropy().
    assert accs[1].pooled(lambda t: t) == pytest.approx((accs[1].value(), accs[1].mean_entropy()))


def test_states_saved_by_more_ranks_combine_into_one_with_every_closed_group():
    """Resuming on fewer ranks: rank 0 takes the surplus ranks' groups (Chan's combination)."""
    torch.manual_seed(6)
    shards = [torch.softmax(torch.randn(n, 5), dim=1) for n in (3 * 32 + 7, 5 * 32, 2 * 32 + 31)]
    states = []
    for rows in shards:
        acc = TStddev(group_size=32)
        acc.add(rows)
        states.append(acc.state_dict())
    merged = TStddev(group_size=32)
    merged.load_state_dict(TStddev.combine(states))
    means = torch.cat([rows[: len(rows) // 32 * 32].double().reshape(-1, 32, 5).mean(1)
                       for rows in shards])  # fmt: skip
    assert merged.groups == 10
    assert merged.value() == pytest.approx(means.std(dim=0).mean().item(), rel=1e-12)
    assert merged.rows == 3 * 32 + 7 + 5 * 32 + 2 * 32  # rank 0's open group kept, others' not
    merged.add(shards[0][:25])  # rank 0's open group goes on: 7 + 25 rows close it
    assert merged.groups == 11

"""The teacher cache's storage formats: compact's codes against a NumPy reference and its KL on a
1000-class teacher model, the KL measured and stored with every chunk, cache-info's mean and
p99, and the one warning line of a lossy format above its bound."""

import numpy as np
import pytest
import torch

from dalikd import teacher_cache as tc
from dalikd.teacher_cache.formats import (
    KL_EDGES,
    compress_compact,
    expand_compact,
    kl_histogram,
    kl_quantile,
    measure_kl,
)


def teacher_model(n: int, classes: int = 1000, sigma: float = 2.5, seed: int = 0):
    """benchmarks/teacher_cache_kl.py's synthetic teacher: a Gaussian bulk of sigma per class,
    one predicted class U(8, 18) above it, 10 related ones U(2, 8) above it."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * sigma
    rows = torch.arange(n)
    z[rows, torch.randint(classes, (n,), generator=g)] += torch.rand(n, generator=g) * 10 + 8
    for _ in range(10):
        z[rows, torch.randint(classes, (n,), generator=g)] += torch.rand(n, generator=g) * 6 + 2
    return z


def test_compact_codes_are_the_numpy_reference():
    z = teacher_model(64, 50)
    parts = compress_compact(z)
    zn = z.numpy().astype(np.float32)
    below = zn.max(1, keepdims=True) - zn
    scale = (below.max(1) / np.float32(255)).astype(np.float16)  # one fp16 scale a row
    assert parts["codes"].dtype == torch.uint8 and parts["scale"].dtype == torch.float16
    np.testing.assert_array_equal(parts["scale"].numpy(), scale)
    step = scale.astype(np.float32)[:, None]
    want = np.clip(np.round(below / step), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(parts["codes"].numpy(), want)
    decoded = expand_compact(parts["codes"], parts["scale"]).numpy()
    np.testing.assert_array_equal(decoded, -want.astype(np.float32) * step)
    assert (parts["codes"].min(dim=1).values == 0).all()  # each row's maximum at code 0
    assert (parts["codes"].max(dim=1).values >= 254).all()  # each row's range uses every code


def test_compact_is_within_1e_4_nats_at_half_of_fp16():
    fmt = tc.Format("compact", 0, 4.0)
    z = teacher_model(512)
    kl = tc.soft_target_kl(z, fmt)
    assert kl.mean() <= 1e-4 and (kl >= -1e-12).all()
    parts = fmt.encode(z)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert stored == 512 * (1000 + 2)  # a byte a logit and an fp16 scale a row
    assert stored <= 0.501 * z.numel() * z.half().element_size()  # half of fp16, and 0.1%
    assert tc.step_bytes(fmt, 256, 256, 1000, picked=False) <= 0.51 * 512 * 1000 * 2
    # top-K 12 on the same teacher: two to three orders of magnitude further
    assert tc.soft_target_kl(z, tc.Format("topk", 12, 4.0)).mean() > 100 * kl.mean()


def test_the_kl_histogram_gives_the_quantile_to_a_bin():
    kl = torch.tensor([0.0] * 50 + [1e-6] * 49 + [0.5], dtype=torch.float64)
    hist = kl_histogram(kl)
    assert int(hist.sum()) == 100 and int(hist[0]) == 50 and len(hist) == len(KL_EDGES) + 1
    assert kl_quantile(hist, 0.5) == 0.0  # in the bin of KL <= 1e-12
    assert 1e-6 <= kl_quantile(hist, 0.99) <= 1e-6 * 10 ** (1 / 8) * 1.0001
    assert 0.5 <= kl_quantile(hist, 1.0) <= 0.5 * 10 ** (1 / 8) * 1.0001


def _key(fmt: str, topk: int = 0, classes: int = 10):
    return {"cache_format": tc.CACHE_FORMAT, "num_classes": classes, "format": fmt, "topk": topk,
            "temperature": 4.0 if fmt == "topk" else 0.0, "seed": 0}  # fmt: skip


def _fill(root, key, messages, steps=4, classes=10):
    cache = tc.TeacherCache(root, key, temperature=4.0, message=messages.append)
    made = []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        x, aug = torch.randn(4, classes, generator=g) * 4, torch.randn(4, classes, generator=g) * 4
        cache.record(0, s, x, aug, None)
        made.append(torch.cat([x, aug]))
    cache.flush()
    return cache, torch.cat(made)


@pytest.mark.parametrize("fmt", ["exact", "compact", "topk"])
def test_every_chunk_stores_the_kl_it_was_written_with(tmp_path, fmt):
    key = _key(fmt, topk=2 if fmt == "topk" else 0)
    cache, rows = _fill(tmp_path / "c", key, [])
    chunk = torch.load(next((tmp_path / "c").rglob("c*.pt")), weights_only=True)
    stored = tc.Format(fmt, key["topk"], 4.0)
    want = torch.cat([measure_kl(r, stored.decode(stored.encode(r), 10), 4.0)
                      for r in rows.split(8)])  # fmt: skip
    assert chunk["kl_rows"] == 32 and int(chunk["kl_hist"].sum()) == 32
    assert chunk["kl_sum"] == pytest.approx(float(want.sum()), rel=1e-9, abs=1e-15)
    info = tc.cache_info(tmp_path / "c")
    assert info["kl"][1]["rows"] == 32
    assert info["kl"][1]["mean"] == pytest.approx(float(want.mean()), rel=1e-9, abs=1e-15)
    if fmt == "exact":
        assert chunk["kl_sum"] == 0.0 and info["kl"][1]["p99"] == 0.0
    else:
        assert info["kl"][1]["p99"] >= float(torch.quantile(want, 0.99))
    # a reading cache replays what the writer decoded, and the sums keep T. stddev exact
    got = tc.TeacherCache(tmp_path / "c", key, temperature=4.0).lookup(0, 1)
    first = rows[8:16]
    assert torch.equal(torch.cat([got.teacher_x, got.teacher_aug]),
                       stored.decode(stored.encode(first), 10))  # fmt: skip
    if fmt != "exact":
        assert torch.equal(got.tstd_sums[0], first.softmax(dim=1).double().sum(dim=0))


def test_a_lossy_format_above_its_bound_says_so_once_with_the_number(tmp_path):
    messages = []
    cache, _ = _fill(tmp_path / "t", _key("topk", topk=1), messages)
    for s in range(4, 8):  # more chunks: still one line
        cache.record(0, s, torch.randn(4, 10) * 4, torch.randn(4, 10) * 4, None)
        cache.flush()
    said = [m for m in messages if "format moves the soft targets" in m]
    assert len(said) == 1 and "\n" not in said[0]
    mean = float(said[0].split("targets ")[1].split(" nats")[0])
    assert mean > tc.LOSSY_BOUND and "above 0.001" in said[0]
    reader_messages = []  # a run that only reads hears it too, from the stored numbers
    reader = tc.TeacherCache(tmp_path / "t", _key("topk", topk=1), temperature=4.0,
                             message=reader_messages.append)  # fmt: skip
    reader.lookup(0, 0)
    assert len([m for m in reader_messages if "format moves" in m]) == 1
    quiet = []
    _fill(tmp_path / "c", _key("compact"), quiet)  # compact stays far below the bound
    assert len(quiet) == 1 and quiet[0].startswith("teacher cache: compact format, soft targets "
                                                   "within ")  # fmt: skip
    mean = float(quiet[0].split("within ")[1].split(" nats")[0])
    assert 0 < mean <= 1e-4

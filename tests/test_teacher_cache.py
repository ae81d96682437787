"""The teacher-output cache (dalikd.teacher_cache): top-K, storage, validation, info, the teacher
source. The key's coverage: test_teacher_cache_key.py; the compact format: ..._formats.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dataset

from dalikd import native
from dalikd import teacher_cache as tc
from dalikd.batch import InputNorm
from dalikd.config import build_config
from dalikd.data import scan_dataset
from dalikd.errors import DalikdError
from dalikd.metrics import TStddev
from dalikd.plan import plan_of


def _key(**changes):
    key = {"cache_format": tc.CACHE_FORMAT, "num_classes": 10, "seed": 0, "format": "exact",
           "topk": 0, "temperature": 0.0, "teacher": "resnet34"}  # fmt: skip
    if changes.get("topk"):  # a top-K key, as dalikd writes one
        key["format"] = "topk"
    return {**key, **changes}


def _logits(n, c=10, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 4


# -- top-K -------------------------------------------------------------------------------------


def test_topk_keeps_the_top_probabilities_and_the_remainder_mass():
    z = _logits(6, 50)
    t, k = 4.0, 5
    c = tc.compress_topk(z, k, t)
    assert c["values"].dtype == torch.float16 and c["indices"].dtype == torch.int16
    cached = tc.expand_topk(c["values"], c["indices"], c["rest_lse"], 50, t)
    # NumPy reference: softmax at T of the full logits
    zn = z.double().numpy() / t
    p = np.exp(zn - zn.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = torch.softmax(cached.double() / t, dim=1).numpy()
    top = np.argsort(-zn, axis=1)[:, :k]
    np.testing.assert_array_equal(np.sort(top, 1), np.sort(c["indices"].long().numpy(), 1))
    rows = np.arange(6)[:, None]
    np.testing.assert_allclose(q[rows, top], p[rows, top], rtol=5e-3)  # fp16 logits
    rest = np.ones_like(p, dtype=bool)
    rest[rows, top] = False
    np.testing.assert_allclose(q[rest].reshape(6, -1).sum(1), p[rest].reshape(6, -1).sum(1),
                               rtol=5e-3)  # fmt: skip
    # the remainder is spread uniformly over the other classes
    spread = q[rest].reshape(6, -1)
    np.testing.assert_allclose(spread, spread[:, :1].repeat(45, 1), rtol=1e-6)
    kl = tc.soft_target_kl(z, tc.Format("topk", k, t))
    assert (kl >= -1e-9).all() and (kl > 0).any()
    assert tc.soft_target_kl(z, tc.Format("topk", 50, t)).abs().max() < 1e-5  # K = C: fp16


def test_add_sums_is_bit_identical_to_adding_the_rows():
    rows_per_step, steps = 6, 17
    live, summed = TStddev(group_size=5 * rows_per_step), TStddev(group_size=5 * rows_per_step)
    for s in range(steps):
        probs = _logits(rows_per_step, seed=s).float().softmax(dim=1)
        live.add(probs)
        p = probs.detach().double()
        summed.add_sums(p.sum(dim=0), -(p * p.clamp_min(1e-30).log()).sum(), rows_per_step)
    a, b = live.state_dict(), summed.state_dict()
    assert a["rows"] == b["rows"] and a["groups"] == b["groups"] == 3
    for name in ("partial", "mean", "m2"):
        assert torch.equal(a[name], b[name])
    assert float(a["entropy"]) == float(b["entropy"]) and live.value() == summed.value()
    with pytest.raises(ValueError):
        summed.add_sums(p.sum(dim=0), p.sum(), 5 * rows_per_step)  # crosses a group


# -- storage -----------------------------------------------------------------------------------


def _record_steps(cache, epoch, steps, batch=4, kept=4, c=10, pool=8):
    made = {}
    for s in steps:
        x, aug = _logits(batch, c, seed=100 * epoch + s), _logits(kept, c, seed=1000 + s)
        keep = torch.randperm(pool, generator=torch.Generator().manual_seed(s))[:kept]
        cache.record(epoch, s, x, aug, keep)
        made[s] = (x, aug, keep)
    return made


def test_exact_round_trip_chunks_and_counts(tmp_path):
    cache = tc.TeacherCache(tmp_path / "c", _key())
    made = _record_steps(cache, 0, range(0, 3))
    cache.flush()  # a checkpoint: steps 0-2 are one chunk
    made |= _record_steps(cache, 0, range(3, 5))
    cache.flush()
    files = sorted(p.name for p in (tmp_path / "c/train/e0000/r0").iterdir())
    assert files == ["c0000000-0000003.pt", "c0000003-0000005.pt"]
    assert not list((tmp_path / "c").rglob("*.tmp"))
    reader = tc.TeacherCache(tmp_path / "c", _key())
    got = [reader.lookup(0, s) for s in range(5)] + [reader.lookup(0, 5), reader.lookup(1, 0)]
    for s in range(5):
        x, aug, keep = made[s]
        assert torch.equal(got[s].teacher_x, x) and torch.equal(got[s].teacher_aug, aug)
        assert torch.equal(got[s].keep, keep) and got[s].keep.dtype == torch.int64
        assert got[s].tstd_sums is None
    assert got[5] is None and got[6] is None  # 5 hits, 2 misses


def test_topk_round_trip_and_exact_tstddev_sums(tmp_path):
    key = _key(topk=3, temperature=4.0)
    cache = tc.TeacherCache(tmp_path / "c", key)
    made = _record_steps(cache, 2, range(4))
    cache.flush()
    reader = tc.TeacherCache(tmp_path / "c", key)
    for s in range(4):
        got = reader.lookup(2, s)
        x, aug, keep = made[s]
        rows = torch.cat([x, aug])
        c = tc.compress_topk(rows, 3, 4.0)
        want = tc.expand_topk(c["values"], c["indices"], c["rest_lse"], 10, 4.0)
        assert torch.equal(torch.cat([got.teacher_x, got.teacher_aug]), want)
        assert torch.equal(got.keep, keep)
        probs = rows.float().softmax(dim=1).double()
        assert torch.equal(got.tstd_sums[0], probs.sum(dim=0)) and got.tstd_sums[2] == 8


def test_record_of_a_gap_starts_a_new_chunk(tmp_path):
    cache = tc.TeacherCache(tmp_path / "c", _key())
    _record_steps(cache, 0, [0, 1, 5])  # steps 2-4 were hits: not recorded
    cache.flush()
    names = sorted(p.name for p in (tmp_path / "c/train/e0000/r0").iterdir())
    assert names == ["c0000000-0000002.pt", "c0000005-0000006.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "renamed"])
def test_a_damaged_chunk_is_a_clean_miss_then_rewritten(tmp_path, damage):
    root = tmp_path / "c"
    cache = tc.TeacherCache(root, _key())
    made = _record_steps(cache, 0, range(3))
    cache.flush()
    path = root / "train/e0000/r0/c0000000-0000003.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_text("not a cache")
    elif damage == "foreign":  # a chunk of another key copied in
        other = tc.TeacherCache(tmp_path / "other", _key(seed=1))
        _record_steps(other, 0, range(3))
        other.flush()
        path.write_bytes((tmp_path / "other/train/e0000/r0" / path.name).read_bytes())
    else:  # a chunk of steps 0-2 named as 0-3 (its step count is wrong)
        cache.record(0, 0, *made[0])
        cache.flush()
        (root / "train/e0000/r0/c0000000-0000001.pt").rename(path)
    messages = []
    reader = tc.TeacherCache(root, _key(), message=messages.append)
    assert reader.lookup(0, 1) is None and reader.lookup(0, 2) is None
    assert len(messages) == 1 and "recomputing its steps" in messages[0]
    for s in range(3):  # the run recomputes and rewrites: later reads hit
        reader.record(0, s, *made[s])
    reader.flush()
    got = tc.TeacherCache(root, _key()).lookup(0, 2)
    assert torch.equal(got.teacher_x, made[2][0])


def test_another_key_is_one_line_naming_the_settings(tmp_path):
    tc.TeacherCache(tmp_path / "c", _key())
    with pytest.raises(DalikdError) as e:
        tc.TeacherCache(tmp_path / "c", _key(seed=3, teacher="resnet50"))
    message = str(e.value)
    assert "\n" not in message
    assert "seed 0 -> 3" in message and "teacher resnet34 -> resnet50" in message
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("mine")
    with pytest.raises(DalikdError, match="non-empty folder without key.json"):
        tc.TeacherCache(tmp_path / "d", _key())
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "key.json").write_text("{")
    with pytest.raises(DalikdError, match="key.json is unreadable"):
        tc.TeacherCache(tmp_path / "e", _key())


def test_a_key_another_rank_writes_between_the_checks_is_compared_not_refused(
    tmp_path, monkeypatch
):
    # rank B finds no key.json, then rank A's os.replace lands it before B lists the folder
    root = tmp_path / "c"
    root.mkdir()
    real_iterdir = Path.iterdir

    def iterdir_after_rank_a(self, key):
        if self == root and not (root / "key.json").exists():
            (root / "key.json").write_text(json.dumps(key))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", lambda self: iterdir_after_rank_a(self, _key()))
    tc.TeacherCache(root, _key())  # the same key: accepted
    assert json.loads((root / "key.json").read_text()) == _key()
    (root / "key.json").unlink()
    monkeypatch.setattr(Path, "iterdir", lambda self: iterdir_after_rank_a(self, _key(seed=3)))
    with pytest.raises(DalikdError, match="seed 3 -> 0"):  # a different key: still one line
        tc.TeacherCache(root, _key())


def test_topk_keep_past_32767_pool_rows_is_exact(tmp_path):
    key = _key(topk=3, temperature=4.0)
    cache = tc.TeacherCache(tmp_path / "c", key)
    small = torch.tensor([3, 0, 2, 1])
    big = torch.tensor([40000, 32768, 70000, 5])  # pool rows past int16's range
    x, aug = _logits(4, seed=1), _logits(4, seed=2)
    cache.record(0, 0, x, aug, small)
    cache.flush()
    cache.record(0, 1, x, aug, big)
    cache.flush()
    reader = tc.TeacherCache(tmp_path / "c", key)
    assert torch.equal(reader.lookup(0, 0).keep, small)
    assert torch.equal(reader.lookup(0, 1).keep, big)
    dtypes = [torch.load(p)["keep"].dtype for p in sorted((tmp_path / "c").rglob("c*.pt"))]
    assert dtypes == [torch.int16, torch.int32]  # the smallest dtype that fits, per chunk


def test_the_key_follows_data_teacher_weights_and_settings(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", n_train=3, n_val=2)
    weights = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    cfg = build_config(overrides={"data.path": str(root), "model.teacher": "resnet34",
                                  "model.teacher_weights": str(weights),
                                  "kd.aug": "cutmixpick"})  # fmt: skip

    def key(cfg=cfg, **kw):
        plan = plan_of(cfg, kw.pop("device", "cpu"), norm=InputNorm((1, 2, 3), (4, 5, 6)))
        args = {"precision": "fp32", "world_size": 1, "graph_format": 2,
                "fmt": tc.Format("exact"), "teacher": cfg.model.teacher,
                "teacher_weights": cfg.model.teacher_weights, "kd": cfg.kd,
                "channels_last": True, **kw}  # fmt: skip
        return tc.cache_key(plan, scan_dataset(root, check=False), **args)

    base = key()
    json.dumps(base)  # JSON-ready
    assert base["pool_size"] == 2 and base["pick_criterion"] == "teacher_entropy"
    assert base["teacher_weights"].startswith("sha256:")
    assert key() == base
    torch.save({"w": torch.ones(2)}, weights)
    assert tc.key_difference(base, key()).startswith("teacher_weights sha256:")
    torch.save({"w": torch.zeros(2)}, weights)
    (root / "train/ant/img999.png").write_bytes((root / "train/ant/img000.png").read_bytes())
    assert tc.key_difference(base, key()).startswith("data_listing ")
    (root / "train/ant/img999.png").unlink()
    assert key() == base
    assert "world_size 1 -> 2" in tc.key_difference(base, key(world_size=2))
    other = build_config(overrides={"kd.pick_fraction": 0.25}, base=cfg)
    assert tc.key_difference(base, key(cfg=other)) == "pick_fraction 0.5 -> 0.25"
    other = build_config(overrides={"data.crop_scale": [0.35, 1.0]}, base=cfg)
    assert tc.key_difference(base, key(cfg=other)).startswith("crop_scale")
    native_resize = key(cfg=build_config(overrides={"data.resize": "native"}, base=cfg))
    dali_resize = key(cfg=build_config(overrides={"data.resize": "dali"}, base=cfg))
    assert tc.key_difference(native_resize, dali_resize) == "resize native -> dali"
    # another dalikd version's data code (here the native operators' sources): another key
    monkeypatch.setattr(native, "source_hash", lambda: "0123456789abcdef")
    assert tc.key_difference(base, key()).startswith("data_source ")


def test_val_teacher_records_then_replays(tmp_path):
    cache = tc.TeacherCache(tmp_path / "c", _key())
    assert cache.val_logits() is None
    teacher = torch.nn.Linear(3, 10)
    batches = [torch.randn(4, 3), torch.randn(2, 3)]
    rec = tc.ValTeacher(teacher, None)
    outs = [rec(b) for b in batches]
    cache.save_val(rec.done())
    replay = tc.ValTeacher(None, tc.TeacherCache(tmp_path / "c", _key()).val_logits())
    for b, out in zip(batches, outs, strict=True):
        assert torch.equal(replay(b), out)
    (tmp_path / "c/val/r0.pt").write_text("broken")
    messages = []
    assert tc.TeacherCache(tmp_path / "c", _key(), message=messages.append).val_logits() is None
    assert messages and "recomputing" in messages[0]


# -- size --------------------------------------------------------------------------------------


def test_default_topk_fits_imagenet_in_20_gb():
    fits = [k for k in range(1, 40) if tc.imagenet_projection(k)["total_bytes"] <= tc.SIZE_TARGET]
    assert max(fits) == 14 and tc.DEFAULT_TOPK in fits
    p = tc.imagenet_projection(tc.DEFAULT_TOPK)
    assert p["steps"] == 5004 * 100
    # 512 rows x (12 x (2 + 2) + 4) + 256 x 2 keep + 1000 x 8 + 8 sums = 35,144 bytes a step
    assert p["train_bytes"] == 500_400 * 35_144
    assert tc.imagenet_projection(0)["total_bytes"] > 1e12  # full logits: ~1 TB


def test_cache_info_counts_steps_bytes_and_projects(tmp_path):
    key = _key(topk=12, temperature=4.0, num_classes=1000)
    cache = tc.TeacherCache(tmp_path / "c", key)
    for epoch in (0, 1):
        _record_steps(cache, epoch, range(6), batch=64, kept=64, c=1000, pool=128)
        cache.flush()
    info = tc.cache_info(tmp_path / "c")
    assert info["key"] == key and info["epochs"] == {1: {0: 6}, 2: {0: 6}}
    assert info["rows"] == 2 * 6 * 128
    payload = tc.step_bytes(12, 64, 64, 1000) / 128
    assert payload <= info["bytes_per_row"] <= 1.1 * payload  # file overhead under 10%
    assert info["size_bytes"] >= info["train_bytes"] > 0
    assert info["imagenet"]["total_bytes"] == tc.imagenet_projection(12)["total_bytes"]
    with pytest.raises(DalikdError, match="not a dalikd teacher cache"):
        tc.cache_info(tmp_path)
    assert math.isnan(tc.cache_info(tc.TeacherCache(tmp_path / "e", key).root)["bytes_per_row"])


def test_cache_info_command(tmp_path, capsys):
    from tests_helpers import run_cli

    key = _key(topk=12, temperature=4.0, num_classes=1000)
    cache = tc.TeacherCache(tmp_path / "c", key)
    _record_steps(cache, 0, range(3), batch=8, kept=8, c=1000, pool=16)
    cache.flush()
    code, out, _ = run_cli(["cache-info", tmp_path / "c"], capsys)
    assert code == 0
    assert "epoch 1: rank 0: 3 steps" in out and "bytes per teacher row" in out
    assert "500,400 steps" in out and "17.79 GB" in out
    # the 20 GB is explained: what it is, and what changes the size
    assert "within 20.00 GB: the size the default --teacher-cache-topk 12 was chosen to fit" in out
    assert "nothing enforces it; a smaller --teacher-cache-topk makes a smaller cache" in out
    code, _, err = run_cli(["cache-info", tmp_path], capsys)
    assert code == 1 and "not a dalikd teacher cache" in err


@pytest.mark.parametrize(
    "aug, extra, recipe, kept, picked",
    [
        ("cutmix", {"pool_size": 1}, "KD + cutmix,", 256, False),
        ("none", {"pool_size": 1}, "plain KD, no x',", 0, False),
        ("cutmixpick", {"pool_size": 2, "pick_fraction": 0.5}, "keeping 256 of 512", 256, True),
        # 24 of a pool of 3 x 16 at batch 16: half the pool, 384 of 768 at batch 256
        ("cutmixpick", {"pool_size": 3, "pick_count": 24, "batch_size": 16},
         "KD + cutmixpick keeping 384 of 768,", 384, True),
    ],
)  # fmt: skip
def test_cache_info_projects_the_caches_own_recipe(tmp_path, capsys, aug, extra, recipe, kept,
                                                    picked):  # fmt: skip
    from tests_helpers import run_cli

    key = _key(topk=12, temperature=4.0, num_classes=1000, aug=aug, **extra)
    tc.TeacherCache(tmp_path / "c", key)
    info = tc.cache_info(tmp_path / "c")
    assert info["imagenet"] == tc.imagenet_projection(12, kept, picked)
    steps = 500_400
    train = steps * tc.step_bytes(12, 256, kept, 1000, picked=picked)
    assert info["imagenet"]["train_bytes"] == train
    if not picked:  # no pick index stored: kept x 2 bytes fewer a step
        assert train == steps * (tc.step_bytes(12, 256, kept, 1000) - 2 * kept)
    code, out, _ = run_cli(["cache-info", tmp_path / "c"], capsys)
    assert code == 0 and recipe in out
    assert "CutMixPick keeping" not in out  # the key's recipe, not the default's


def test_cached_teacher_hits_misses_and_builds_the_teacher_only_on_a_miss(tmp_path):
    """The source of --teacher-cache: a step's outputs by its position; the teacher is built
    on the first miss only; a resumed run (another start position) reads and fills on."""
    from dalikd.batch import Batch
    from dalikd.checkpoint import Position
    from dalikd.config import KDConfig
    from dalikd.teacher import LiveTeacher

    calls = {"live": 0, "load": 0}

    class Teacher(torch.nn.Module):
        def forward(self, images):
            calls["live"] += 1
            return images.flatten(1)[:, :10]

    def build():
        calls["load"] += 1
        return Teacher()

    def run(cache_root, epochs=2, steps=3, start=(0, 0)):
        cache = tc.TeacherCache(cache_root, _key())
        source = tc.CachedTeacher(cache, LiveTeacher(build), KDConfig())
        outs = []
        for e in range(start[0], epochs):
            for s in range(start[1] if e == start[0] else 0, steps):
                images = torch.full((2, 12, 1, 1), float(100 * e + s))
                batch = Batch(images=images, labels=torch.zeros(2, dtype=torch.int64))
                outs.append(source.outputs(batch, Position(e, s)).logits_x)
            source.checkpoint()
        return source, outs

    source, first = run(tmp_path / "c")
    assert source.counts() == (0, 6) and calls == {"live": 6, "load": 1}
    source, again = run(tmp_path / "c")
    assert source.counts() == (6, 0) and calls["live"] == 6
    assert calls["load"] == 1  # all cached: never built
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    source, _ = run(tmp_path / "c", epochs=3, start=(1, 2))  # resumed, one more epoch
    assert source.counts() == (1, 3) and calls["load"] == 2

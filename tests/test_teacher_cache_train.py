"""`dalikd train --teacher-cache`: exact replay, mid-epoch resume, top-K T. stddev, refusals."""

import json

import pytest
import torch
from tests_helpers import run_cli
from tiny_models import tiny_cnn

from dalikd import native
from dalikd.cli import report
from dalikd.teacher_cache import cache_info

TINY = "tiny_models:tiny_cnn"
SMALL = ["--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu"]
LOADED = "a step is not cached; teacher loaded"


@pytest.fixture
def teacher(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    torch.save(tiny_cnn(3).state_dict(), path)
    return path


def _args(data, teacher, out, *extra, student=TINY, aug="cutmixpick"):
    return ["train", "--data", data, "--student", student, "--teacher", TINY,
            "--teacher-weights", teacher, "--aug", aug, "--epochs", 2, "--lr", 0.05,
            "--out", out, *SMALL, *extra]  # fmt: skip


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


TEACHER_METRICS = ("train_loss", "val_loss", "t_stddev", "teacher_entropy", "val_agree_top1",
                   "val_kl_ts")  # fmt: skip


@pytest.mark.parametrize(
    ("aug", "flags"),
    [("cutmixpick", []), ("flip", []), ("cutmixpick", ["--teacher-cache-topk", 0])],
)  # the default settings (exact), and K = 0 as runs before the formats spelled exact
def test_default_cache_trains_bit_identical_to_the_live_teacher(
    aug, flags, solid_dataset, tmp_path, tiny_env, teacher, capsys
):
    cache = tmp_path / "cache"
    runs = {name: tmp_path / name for name in ("live", "fill", "read")}
    code, _, err = run_cli(_args(solid_dataset, teacher, runs["live"], aug=aug), capsys)
    assert code == 0, err
    outs = {}
    for name in ("fill", "read"):
        extra = ["--teacher-cache", cache, *flags]
        code, outs[name], err = run_cli(_args(solid_dataset, teacher, runs[name], *extra,
                                              aug=aug), capsys)  # fmt: skip
        assert code == 0, err
    assert LOADED in outs["fill"] and LOADED not in outs["read"]  # read: teacher never built
    assert "teacher cache 12 hit / 0 miss" in outs["read"]
    fill, read, live = (_records(runs[n]) for n in ("fill", "read", "live"))
    assert [(r["cache_hits"], r["cache_misses"]) for r in fill] == [(0, 6), (0, 12)]
    assert [(r["cache_hits"], r["cache_misses"]) for r in read] == [(6, 0), (12, 0)]
    for name in ("fill", "read"):
        assert _same_weights(runs["live"], runs[name])
    for key in TEACHER_METRICS:
        assert [r[key] for r in live] == [r[key] for r in fill] == [r[key] for r in read], key
    info = cache_info(cache)
    assert info["epochs"] == {1: {0: 6}, 2: {0: 6}} and info["key"]["topk"] == 0
    assert info["format"] == "exact" and all(kl["mean"] == 0.0 for kl in info["kl"].values())


def test_mid_epoch_resume_reads_and_fills_the_cache(
    solid_dataset, tmp_path, tiny_env, teacher, capsys, monkeypatch
):
    student = "tiny_models:stopping_cnn"
    full, ref = tmp_path / "full", tmp_path / "ref"
    ckpt = ["--ckpt-every", 2]  # the default cache: exact
    code, _, err = run_cli(_args(solid_dataset, teacher, ref, "--teacher-cache", full, *ckpt,
                                 student=student), capsys)  # fmt: skip
    assert code == 0, err
    # Stop in epoch 2 at step 4 (2 training forwards a step), once reading the full cache and
    # once filling an empty one; each resumed run must end with the reference's weights.
    for cache, hits in ((full, True), (tmp_path / "empty", False)):
        run = tmp_path / f"run_{cache.name}"
        monkeypatch.setenv("TINY_STOP_AT", str(2 * (6 + 4)))
        code, out, err = run_cli(_args(solid_dataset, teacher, run, "--teacher-cache", cache,
                                       *ckpt, student=student), capsys)  # fmt: skip
        assert code != 0 and "stopped by SIGUSR1 at epoch 2, step 4" in err
        last = torch.load(run / "last.pt", weights_only=True)
        assert (last["epoch"], last["step_in_epoch"]) == (1, 4)
        monkeypatch.delenv("TINY_STOP_AT")
        code, out, err = run_cli(["train", "--resume", run], capsys)
        assert code == 0, err
        assert (LOADED in out) is not hits
        assert _same_weights(ref, run)
        assert [r["t_stddev"] for r in _records(run)] == [r["t_stddev"] for r in _records(ref)]
        assert cache_info(cache)["epochs"] == {1: {0: 6}, 2: {0: 6}}
        chunks = sorted(p.name for p in (cache / "train/e0001/r0").iterdir())
        if not hits:  # written at each checkpoint, the stop's included: 0-2, 2-4, 4-6
            assert chunks == ["c0000000-0000002.pt", "c0000002-0000004.pt", "c0000004-0000006.pt"]


def test_topk_cache_keeps_t_stddev_exact(
    solid_dataset, tmp_path, tiny_env, teacher, capsys, monkeypatch
):
    cache = tmp_path / "cache"
    runs = {name: tmp_path / name for name in ("live", "fill", "read")}
    code, _, err = run_cli(_args(solid_dataset, teacher, runs["live"]), capsys)
    assert code == 0, err
    bars = []  # what the step progress bar shows after each logged step
    real_step = report.RichReporter.step

    def step(self, *args, **kw):
        real_step(self, *args, **kw)
        bars.append(self._progress.tasks[-1].fields["cache"])

    monkeypatch.setattr(report.RichReporter, "step", step)
    for name in ("fill", "read"):  # 3 classes, K = 2: the soft targets are approximate
        extra = ["--teacher-cache", cache, "--teacher-cache-format", "topk",
                 "--teacher-cache-topk", 2]  # fmt: skip
        code, _, err = run_cli(_args(solid_dataset, teacher, runs[name], *extra), capsys)
        assert code == 0, err
    # logged at each epoch's last step (6 steps, log_every 10): the counts so far this run
    counts = [(0, 6), (0, 12), (6, 0), (12, 0)]  # filling, then reading
    assert bars == [f"  cache {h} hit / {m} miss" for h, m in counts]
    live, fill, read = (_records(runs[n]) for n in ("live", "fill", "read"))
    assert read[-1]["cache_hits"] == 12 and read[-1]["cache_misses"] == 0
    for key in ("t_stddev", "teacher_entropy", "group_rows"):
        assert [r[key] for r in live] == [r[key] for r in fill] == [r[key] for r in read], key
    assert _same_weights(runs["live"], runs["fill"])  # a miss trains on the live outputs
    assert not _same_weights(runs["fill"], runs["read"])  # a hit, on the top-K targets
    assert cache_info(cache)["key"]["temperature"] == 4.0


def test_cache_refusals_are_one_line(solid_dataset, tmp_path, tiny_env, teacher, capsys):
    cache = tmp_path / "cache"
    code, _, err = run_cli(_args(solid_dataset, teacher, tmp_path / "a", "--teacher-cache", cache,
                                 "--pick-criterion", "kld"), capsys)  # fmt: skip
    assert code == 1 and "cannot replay --pick-criterion kld" in err
    code, _, err = run_cli(_args(solid_dataset, teacher, tmp_path / "b", "--teacher-cache", cache,
                                 "--epochs", 1), capsys)  # fmt: skip
    assert code == 0, err
    other = tmp_path / "other.pt"
    torch.save(tiny_cnn(3).state_dict(), other)  # another teacher
    code, _, err = run_cli(_args(solid_dataset, other, tmp_path / "c", "--teacher-cache", cache,
                                 "--seed", 5), capsys)  # fmt: skip
    assert code == 1 and "holds another run's teacher outputs (seed 0 -> 5, teacher_weights" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # the other resize path makes other pixels: a key mismatch, not wrong targets
    saved = json.loads((cache / "key.json").read_text())["resize"]
    other = "dali" if saved == "native" else "native"
    if other == "native" and not native.load().cpu:
        return
    code, _, err = run_cli(_args(solid_dataset, teacher, tmp_path / "d", "--teacher-cache", cache,
                                 "--resize", other), capsys)  # fmt: skip
    assert code == 1 and f"teacher outputs (resize {saved} -> {other})" in err
    assert len(err.strip().splitlines()) == 1


def test_a_file_failing_in_training_does_not_stop_the_cache(tmp_path, tiny_env, capsys):
    """A file that fails mid-run changes the views from there on, the same way in every run on
    that data (recovery is deterministic): the cache keys those steps by the failures too and
    goes on covering them, so a second run reads every step and ends identical (issue 24)."""
    from conftest import make_dataset
    from test_robustness import CLASSES, corrupt_sof

    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=5, n_val=2)
    (root / "train/ant/bad_sof.jpg").write_bytes(corrupt_sof())
    weights = tmp_path / "t4.pt"
    torch.save(tiny_cnn(4).state_dict(), weights)
    cache = tmp_path / "cache"
    outs = {}
    for name in ("first", "second"):
        args = _args(root, weights, tmp_path / name, "--teacher-cache", cache,
                     "--teacher-cache-topk", 0)  # fmt: skip
        code, outs[name], err = run_cli(args, capsys)
        assert code == 0, err
        assert "left out 1 file(s) that failed to decode" in outs[name]
        assert "not used" not in outs[name]
    assert _same_weights(tmp_path / "first", tmp_path / "second")
    first, second = _records(tmp_path / "first"), _records(tmp_path / "second")
    assert first[-1]["cache_hits"] == 0
    assert (second[-1]["cache_hits"], second[-1]["cache_misses"]) == (2 * 5, 0)  # every step
    assert set(cache_info(cache)["epochs"]) == {1, 2}  # written after the failure too
    code, out, err = run_cli(["train", "--resume", tmp_path / "second", "--epochs", 3], capsys)
    assert code == 0, err
    assert "not used" not in out and set(cache_info(cache)["epochs"]) == {1, 2, 3}


def test_resumed_t_stddev_of_another_group_size_restarts_with_a_topk_cache(
    solid_dataset, tmp_path, tiny_env, teacher, capsys
):
    cache, run = tmp_path / "cache", tmp_path / "run"
    topk = ["--teacher-cache", cache, "--teacher-cache-format", "topk", "--teacher-cache-topk", 2]
    code, _, err = run_cli(_args(solid_dataset, teacher, tmp_path / "fill", *topk), capsys)
    assert code == 0, err
    code, _, err = run_cli(_args(solid_dataset, teacher, run, *topk, "--epochs", 1), capsys)
    assert code == 0, err
    # as saved before group steps: groups of another size (8 rows a step do not split 12)
    last = torch.load(run / "last.pt", weights_only=True)
    for state in last["tstddev"]:
        state["group_size"] = 12
    torch.save(last, run / "last.pt")
    code, out, err = run_cli(["train", "--resume", run, "--epochs", 2], capsys)
    assert code == 0, err
    assert "T. stddev restarts: the checkpoint's groups are 12 rows, this run's 40" in out
    record = _records(run)[-1]
    assert record["group_rows"] == 40 and record["cache_hits"] == 6


def test_compact_cache_keeps_t_stddev_exact_and_the_targets_within_its_bound(
    solid_dataset, tmp_path, tiny_env, teacher, capsys
):
    cache = tmp_path / "cache"
    runs = {name: tmp_path / name for name in ("live", "fill", "read")}
    code, _, err = run_cli(_args(solid_dataset, teacher, runs["live"]), capsys)
    assert code == 0, err
    for name in ("fill", "read"):
        extra = ["--teacher-cache", cache, "--teacher-cache-format", "compact"]
        code, out, err = run_cli(_args(solid_dataset, teacher, runs[name], *extra), capsys)
        assert code == 0, err
        assert "format moves the soft targets" not in out  # far below the warning bound
        assert "teacher cache: compact format, soft targets within " in out  # said once
    live, fill, read = (_records(runs[n]) for n in ("live", "fill", "read"))
    assert [(r["cache_hits"], r["cache_misses"]) for r in read] == [(6, 0), (12, 0)]
    for key in ("t_stddev", "teacher_entropy", "group_rows"):  # the stored sums are exact
        assert [r[key] for r in live] == [r[key] for r in fill] == [r[key] for r in read], key
    assert _same_weights(runs["live"], runs["fill"])  # a miss trains on the live outputs
    info = cache_info(cache)
    assert info["format"] == "compact" and info["key"]["format"] == "compact"
    assert all(0 < kl["mean"] <= 1e-4 and kl["rows"] == 6 * 8 for kl in info["kl"].values())
    code, out, _ = run_cli(["cache-info", cache], capsys)
    assert code == 0 and "epoch 1: rank 0: 6 steps; KL(full || stored) mean" in out
    assert "compact" in out and "exact bf16" in out

"""--tensorboard: RUN_DIR/tb/ holds the same scalars as metrics.jsonl, read back from the events."""

import json
import sys

import pytest
import torch
from tests_helpers import run_cli
from tiny_models import tiny_cnn

TINY = "tiny_models:tiny_cnn"
SMALL = ["--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu"]


def test_tensorboard_scalars_equal_metrics_jsonl(solid_dataset, tmp_path, tiny_env, capsys):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    teacher = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", solid_dataset, "--student", TINY, "--teacher", TINY,
                            "--teacher-weights", teacher, "--epochs", 2, "--out", run,
                            "--tensorboard", *SMALL], capsys)  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = event_accumulator.EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    numbers = {k for r in records for k, v in r.items() if k != "epoch" and v is not None}
    assert tags == numbers
    assert {"val_top1", "val_agree_top1", "val_kl_ts", "lr", "train_loss"} <= tags
    for tag in tags:
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(r["epoch"], r[tag]) for r in records if r.get(tag) is not None]
        assert [s for s, _ in points] == [s for s, _ in expected], tag
        assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6), tag


def test_null_values_are_left_out_as_gaps(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    from dalikd.tensorboard import ScalarWriter

    writer = ScalarWriter(tmp_path / "tb")
    writer.add({"epoch": 1, "val_top1": 50.0, "t_stddev": None})
    writer.add({"epoch": 2, "val_top1": 75.0, "t_stddev": 0.25})
    writer.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_top1")] == [(1, 50.0), (2, 75.0)]
    assert [(e.step, e.value) for e in events.Scalars("t_stddev")] == [(2, 0.25)]


def test_without_tensorboard_the_error_is_one_line(
    solid_dataset, tmp_path, tiny_env, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # -> ImportError
    code, _, err = run_cli(["train", "--data", solid_dataset, "--student", TINY, "--epochs", 1,
                            "--out", tmp_path / "r", "--tensorboard", *SMALL], capsys)  # fmt: skip
    assert code == 1
    assert err.strip() == (
        "error: --tensorboard needs tensorboard: pip install 'dalikd[tensorboard]'"
    )
    assert not (tmp_path / "r").exists()  # refused before the run started

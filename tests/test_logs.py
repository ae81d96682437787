"""A log written to a pipe or a file: one plain line per epoch, no progress bar, no wrapping."""

import json
import os
import subprocess
import sys

import torch
from tiny_models import tiny_cnn

from dalikd.cli.report import epoch_line

TINY = "tiny_models:tiny_cnn"


def test_piped_training_log_has_one_whole_line_per_epoch(solid_dataset, tmp_path, tiny_env):
    teacher = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    run = tmp_path / "a-long-run-directory-name-so-the-lines-run-well-past-eighty-columns"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    proc = subprocess.run(
        [sys.executable, "-m", "dalikd", "train", "--data", str(solid_dataset), "--student", TINY,
         "--teacher", TINY, "--teacher-weights", str(teacher), "--epochs", "3", "--out", str(run),
         "--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # every epoch line whole, exactly as formatted from its metrics.jsonl record
    assert epoch_lines == [epoch_line(r) for r in records]
    assert all(len(line) > 80 for line in epoch_lines)  # long enough to have been wrapped
    assert all("agree " in line and "KL(t||s) " in line for line in epoch_lines)
    assert not any(line.startswith("img/s") for line in lines)  # the old wrapped tail
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout  # no bar, no escape codes
    assert f"run directory: {run}" in lines  # the summary: whole lines, not a wrapped table
    for r in records:
        assert 0 <= r["val_agree_top1"] <= 100 and r["val_kl_ts"] >= 0

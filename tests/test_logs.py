"""A log written to a pipe or a file: one plain line per epoch, no progress bar, no wrapping."""

import json
import os
import re
import subprocess
import sys

import torch
from tiny_models import tiny_cnn

from dalikd.cli import report
from dalikd.cli.report import RichReporter, epoch_line, fmt_loss, print_summary

TINY = "tiny_models:tiny_cnn"


def test_piped_training_log_has_one_whole_line_per_epoch(solid_dataset, tmp_path, tiny_env):
    teacher = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    run = tmp_path / "a-long-run-directory-name-so-the-lines-run-well-past-eighty-columns"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    proc = subprocess.run(
        [sys.executable, "-m", "dalikd", "train", "--data", str(solid_dataset), "--student", TINY,
         "--teacher", TINY, "--teacher-weights", str(teacher), "--epochs", "3", "--out", str(run),
         "--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu",
         "--log-seconds", "0"],  # a progress line at every update (each 10 steps and the last)
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    epoch_lines = [line for line in lines if re.match(r"epoch \d+: ", line)]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # every epoch line whole, exactly as formatted from its metrics.jsonl record
    assert epoch_lines == [epoch_line(r) for r in records]
    assert all(len(line) > 80 for line in epoch_lines)  # long enough to have been wrapped
    assert all("agree " in line and "KL(t||s) " in line for line in epoch_lines)
    assert not any(line.startswith("img/s") for line in lines)  # the old wrapped tail
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout  # no bar, no escape codes
    assert f"run directory: {run}" in lines  # the summary: whole lines, not a wrapped table
    assert "files: config.json  metrics.jsonl  last.pt  best.pt" in lines  # nothing left out
    # inside each epoch, plain progress lines: train steps (6 a epoch: logged at the last), then
    # the validation batches (15 images / 4 = 4)
    for epoch in (1, 2, 3):
        progress = [line for line in lines if line.startswith(f"epoch {epoch}/3 ")]
        assert len(progress) == 5, progress
        assert re.fullmatch(
            r"epoch \d/3 step 6/6 \(100%\)  loss \d+\.\d{4}  [\d,]+ img/s  lr [\d.e-]+  eta -",
            progress[0],
        ), progress[0]
        for done, line in enumerate(progress[1:], 1):
            assert re.fullmatch(rf"epoch \d/3 validation {done}/4 \({25 * done}%\)  eta \S+", line)
        # before its epoch's summary line
        assert lines.index(progress[-1]) < lines.index(epoch_lines[epoch - 1])
    for r in records:
        assert 0 <= r["val_agree_top1"] <= 100 and r["val_kl_ts"] >= 0


def test_pipe_progress_lines_come_at_most_every_log_seconds(capsys):
    now = [0.0]
    with RichReporter(log_seconds=60, clock=lambda: now[0]) as reporter:
        reporter.epoch_start(0, 90, 1000)
        for t, step in ((5, 10), (50, 100), (65, 110), (80, 120), (125, 200), (126, 210)):
            now[0] = t
            reporter.step(step, 3.21044, 1234.4, 0.1, cache=(3, 4))
        now[0] = 130
        reporter.val_step(1, 50)  # the phase starts: its own clock
        now[0] = 189
        reporter.val_step(2, 50)
        now[0] = 191
        reporter.val_step(11, 50)  # 60 s after validation started: a line
    assert capsys.readouterr().out.splitlines() == [
        # 60 s for 100 steps from step 10 (the first update): 0.6 s a step, 890 steps to go
        "epoch 1/90 step 110/1000 (11%)  loss 3.2104  1,234 img/s  lr 0.1  "
        "cache 3 hit / 4 miss  eta 0:08:54",
        # (125 - 5) s / 190 steps x 800 steps to go = 505 s
        "epoch 1/90 step 200/1000 (20%)  loss 3.2104  1,234 img/s  lr 0.1  "
        "cache 3 hit / 4 miss  eta 0:08:25",
        # 61 s / 10 batches x 39 to go = 238 s
        "epoch 1/90 validation 11/50 (22%)  eta 0:03:58",
    ]


def test_the_terminal_draws_a_validation_bar_and_no_progress_lines(monkeypatch):
    from io import StringIO

    from rich.console import Console

    terminal = Console(file=StringIO(), force_terminal=True, width=100, highlight=False)
    monkeypatch.setattr(report, "console", terminal)
    with RichReporter(log_seconds=0) as reporter:
        reporter.epoch_start(0, 3, 6)
        reporter.step(6, 1.0, 10.0, 0.1)
        reporter.val_step(1, 4)
        task = reporter._progress.tasks[-1]
        assert (task.description, task.completed, task.total) == ("epoch 1/3 validation", 1, 4)
        reporter.epoch_end(_record(1.0))
        assert reporter._progress.tasks == []
    assert "validation 1/4 (25%)" not in terminal.file.getvalue()
    assert "epoch 1: train loss" in terminal.file.getvalue()


def _record(loss):
    return {"epoch": 1, "train_loss": loss, "val_loss": loss, "val_top1": 50.0, "val_top5": 90.0,
            "img_per_s": 1000.0, "seconds": 2.0}  # fmt: skip


def test_losses_print_4_decimals_or_scientific():
    assert fmt_loss(3.21044) == "3.2104" and fmt_loss(0.0) == "0.0000"
    assert fmt_loss(267292748633429.3438) == "2.673e+14"
    assert fmt_loss(0.00001234) == "1.234e-05" and fmt_loss(-2e6) == "-2.000e+06"
    assert fmt_loss(99999.0) == "99999.0000" and fmt_loss(0.001) == "0.0010"
    assert fmt_loss(float("inf")) == "inf" and fmt_loss(float("nan")) == "nan"
    line = epoch_line(_record(267292748633429.3438))
    assert "train loss 2.673e+14  val loss 2.673e+14  top-1" in line


def test_the_summary_prints_large_losses_and_lists_the_data_report(tmp_path, capsys):
    summary = {"run_dir": str(tmp_path), "device": "cpu", "epochs": 1, "best_top1": 50.0,
               "final": _record(267292748633429.3438)}  # fmt: skip
    print_summary(summary)
    out = capsys.readouterr().out.splitlines()
    assert "final val loss: 2.673e+14" in out
    assert "files: config.json  metrics.jsonl  last.pt  best.pt" in out  # no report written
    (tmp_path / "data_report.tsv").write_text("path\treason\n")  # the header alone: nothing
    print_summary(summary)
    assert (
        "files: config.json  metrics.jsonl  last.pt  best.pt"
        in capsys.readouterr().out.splitlines()
    )
    (tmp_path / "data_report.tsv").write_text("path\treason\nd/a.jpg\tempty file\n")
    print_summary(summary)
    assert "files: config.json  metrics.jsonl  last.pt  best.pt  data_report.tsv" in (
        capsys.readouterr().out.splitlines()
    )


def test_one_file_left_out_is_singular(tmp_path, capsys, tiny_env):
    from conftest import make_dataset
    from tests_helpers import run_cli

    root = make_dataset(tmp_path / "d", n_train=4, n_val=2)
    (root / "train" / "ant" / "empty.png").write_bytes(b"")
    code, out, _ = run_cli(["check-data", root], capsys)
    assert code == 0 and out.rstrip().endswith(", 1 file left out"), out
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["train", "--data", root, "--student", TINY, "--epochs", "1", "--out", run,
         "--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "3 classes, 1 file left out (see data_report.tsv)" in out
    assert "files: config.json  metrics.jsonl  last.pt  best.pt  data_report.tsv" in out
    (root / "train" / "bee" / "empty.png").write_bytes(b"")
    code, out, _ = run_cli(["check-data", root], capsys)
    assert code == 0 and out.rstrip().endswith(", 2 files left out"), out

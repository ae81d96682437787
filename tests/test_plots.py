"""dalikd plot: the curves of runs' metrics.jsonl, checked on the figure's own line data."""

import json
import math

import numpy as np
from PIL import Image
from tests_helpers import run_cli

from dalikd.plots import PANELS, curves_figure, read_metrics, run_names


def write_run(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def record(epoch, **extra):
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.5 / epoch,
            "val_top1": 10.0 * epoch, "val_top5": 50.0, "lr": 0.1 / epoch, **extra}  # fmt: skip


KD = [record(1, t_stddev=None), record(2, t_stddev=0.03), record(3, t_stddev=0.02)]
ALONE = [record(1), record(2)]


def line_data(ax):
    return [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]


def test_each_panel_holds_each_runs_values_per_epoch():
    fig = curves_figure({"kd": KD, "student": ALONE})
    loss, top1, lr, tstd = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [title for title, _, _, _ in PANELS]
    assert loss.get_yscale() == "log" and top1.get_yscale() == "linear"
    # loss: train (labelled) and val (unlabelled, dashed) per run, in run order
    (kd_train, kd_val, alone_train, alone_val) = loss.lines
    assert kd_train.get_label() == "kd" and alone_train.get_label() == "student"
    assert list(kd_train.get_ydata()) == [r["train_loss"] for r in KD]
    assert list(kd_val.get_ydata()) == [r["val_loss"] for r in KD]
    assert kd_val.get_linestyle() == "--" and kd_train.get_color() == kd_val.get_color()
    assert list(alone_val.get_xdata()) == [1, 2]
    assert line_data(top1) == [("kd", [1, 2, 3], [10.0, 20.0, 30.0]),
                               ("student", [1, 2], [10.0, 20.0])]  # fmt: skip
    assert line_data(lr)[1] == ("student", [1, 2], [0.1, 0.05])
    # T. stddev: only the KD run; its null first epoch is a gap (NaN), not a zero
    [(name, epochs, values)] = line_data(tstd)
    assert name == "kd" and epochs == [1, 2, 3]
    assert math.isnan(values[0]) and values[1:] == [0.03, 0.02]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["kd", "student"]


def test_plot_command_writes_a_png_of_the_runs(tmp_path, capsys):
    kd = write_run(tmp_path / "a" / "kd", KD)
    alone = write_run(tmp_path / "a" / "student", ALONE)
    out = tmp_path / "curves.png"
    code, stdout, err = run_cli(["plot", kd, alone, "--out", out], capsys)
    assert code == 0, err
    assert str(out) in stdout
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (1210, 825)  # 11 x 7.5 in at 110 dpi
        assert np.asarray(png.convert("L")).std() > 5  # something was drawn
    assert not list(tmp_path.glob("*.tmp"))


def test_names_are_paths_where_directory_names_repeat(tmp_path):
    assert run_names([tmp_path / "x" / "kd", tmp_path / "y" / "kd"]) == [
        str(tmp_path / "x" / "kd"), str(tmp_path / "y" / "kd")]  # fmt: skip
    assert run_names(["runs/kd", "runs/student"]) == ["kd", "student"]


def test_mistakes_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(["plot", tmp_path, "--out", tmp_path / "c.png"], capsys)
    assert (
        code == 1
        and err.strip() == f"error: {tmp_path} is not a run directory: no metrics.jsonl there"
    )
    empty = write_run(tmp_path / "empty", [])
    code, _, err = run_cli(["plot", empty, "--out", tmp_path / "c.png"], capsys)
    assert code == 1 and "has no finished epoch yet" in err and len(err.strip().splitlines()) == 1
    run = write_run(tmp_path / "kd", KD)
    code, _, err = run_cli(["plot", run, "--out", tmp_path / "c.jpg"], capsys)  # not PNG bytes
    assert code == 1 and "--out" in err and "*.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.jpg").exists()
    code, _, err = run_cli(["plot", run, "--out", tmp_path / "new" / "c.png"], capsys)
    assert code == 0 and (tmp_path / "new" / "c.png").is_file(), err  # missing folders made
    assert read_metrics(run) == json.loads(json.dumps(KD))

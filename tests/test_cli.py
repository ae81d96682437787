"""The `dalikd` command end to end on small generated data, and its one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from tests_helpers import run_cli
from tiny_models import tiny_cnn

TINY = "tiny_models:tiny_cnn"
SMALL = ["--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu"]


def test_train_two_epochs_then_resume_to_three(solid_dataset, tmp_path, tiny_env, capsys):
    teacher = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    run = tmp_path / "run"
    args = ["train", "--data", solid_dataset, "--student", TINY, "--teacher", TINY,
            "--teacher-weights", teacher, "--aug", "flip", "--epochs", 2, "--lr", 0.05,
            "--out", run, "--eval-teacher", *SMALL]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "teacher tiny_models:tiny_cnn: val top-1" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {
            "epoch",
            "train_loss",
            "val_loss",
            "val_top1",
            "val_top5",
            "lr",
            "img_per_s",
            "seconds",
        } <= set(r)
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100
        assert r["teacher_entropy"] > 0
        assert r["group_rows"] == 5 * (4 + 4)  # 5 steps of x and x' at batch 4
    # 48 teacher rows per epoch: 1 group of 40 after epoch 1, 2 after epoch 2
    assert records[0]["t_stddev"] is None and records[1]["t_stddev"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["kd"]["aug"] == "flip" and config["optim"]["epochs"] == 2
    last = torch.load(run / "last.pt", weights_only=True)
    assert set(last) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "config"}
    assert last["epoch"] == 2 and last["step_in_epoch"] == 0  # epochs completed
    assert last["scheduler"]["step"] == 2 * 6
    assert (run / "best.pt").is_file() and not list(run.glob("*.tmp"))

    code, out, err = run_cli(["train", "--resume", run, "--epochs", 3], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["scheduler"]["step"] == 3 * 6
    assert json.loads((run / "config.json").read_text())["optim"]["epochs"] == 3

    assert len(last["tstddev"]) == 1 and last["tstddev"][0]["rows"] == 3 * 48  # one per rank

    code, out, _ = run_cli(["eval", "--data", solid_dataset, "--model", TINY,
                            "--weights", run / "best.pt", "--image-size", 16], capsys)  # fmt: skip
    assert code == 0 and "top-1" in out

    # A checkpoint of an older format (before the uint8 hand-off) is refused in one line.
    torch.save({k: v for k, v in last.items() if k != "format"}, run / "last.pt")
    code, _, err = run_cli(["train", "--resume", run, "--epochs", 4], capsys)
    assert code != 0 and "checkpoint format 1; this dalikd resumes format 3" in err
    assert "Traceback" not in err
    # ... and one of format 2 (before dalikd ordered the epochs itself)
    torch.save({**last, "format": 2}, run / "last.pt")
    code, _, err = run_cli(["train", "--resume", run, "--epochs", 4], capsys)
    assert code != 0 and "checkpoint format 2; this dalikd resumes format 3" in err


def test_supervised_run_with_config_file(solid_dataset, tmp_path, tiny_env, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nstudent = "{TINY}"\n[optim]\nepochs = 1\nschedule = "cosine"\n')
    code, _, err = run_cli(["train", "--config", cfg, "--data", solid_dataset,
                            "--out", tmp_path / "r", *SMALL], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["optim"]["schedule"] == "cosine"


def test_pipelines_lists_the_built_in_recipes(capsys):
    code, out, _ = run_cli(["pipelines"], capsys)
    assert code == 0
    for name in ("none", "identity", "flip", "cutmix", "x[perm]"):
        assert name in out


@pytest.fixture
def teacher_1000(tmp_path, tiny_env):
    path = tmp_path / "t1000.pt"
    torch.save(tiny_cnn(1000).state_dict(), path)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("no data", "no dataset given: pass --data"),
        ("no train", "has no train/ folder"),
        ("unknown model", "unknown model 'resnet81'"),
        ("class mismatch", "predict 1000 classes but the dataset has 3"),
        ("missing weights", "weights file not found"),
        ("unknown aug", "unknown augmentation 'fancy'; known: "),
        ("unknown key", "unknown config key 'optim.lr_max'"),
        ("bad choice", "Invalid value for '--device'"),
        ("nothing to resume", "nothing to resume in"),
        ("float recipe", "are float32 (4, 16, 16, 3); a recipe must return uint8 HWC RGB"),
    ],
)
def test_user_mistakes_are_one_line(
    case, message, solid_dataset, tmp_path, teacher_1000, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # "no data" and "no train" have no --out: runs/ would be here
    base = ["train", "--data", solid_dataset, "--student", TINY, "--out", tmp_path / "r", *SMALL]
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[optim]\nlr_max = 1\n")
    float_recipe = tmp_path / "float_recipe.py"  # x' as float: DALI cannot hand that over
    float_recipe.write_text("from nvidia.dali import fn, types\nfrom dalikd.recipes import View"
                            "\n\n\ndef aug(images, ctx):\n"
                            "    return View(fn.cast(images, dtype=types.FLOAT))\n")  # fmt: skip
    teacher_3 = tmp_path / "t3.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher_3)
    args = {
        "no data": ["train", "--student", TINY],
        "no train": ["train", "--data", tmp_path, "--student", TINY],
        "unknown model": [*base, "--student", "resnet81"],
        "class mismatch": [*base, "--teacher", TINY, "--teacher-weights", teacher_1000],
        "missing weights": [*base, "--teacher", TINY, "--teacher-weights", tmp_path / "no.pt"],
        "unknown aug": [
            *base,
            "--teacher",
            TINY,
            "--teacher-weights",
            teacher_1000,
            "--aug",
            "fancy",
        ],
        "unknown key": [*base, "--config", bad_cfg],
        "bad choice": [*base, "--device", "tpu"],
        "nothing to resume": ["train", "--resume", tmp_path],
        "float recipe": [
            *base,
            "--teacher",
            TINY,
            "--teacher-weights",
            teacher_3,
            "--aug",
            f"{float_recipe}:aug",
        ],  # fmt: skip
    }[case]
    code, _, err = run_cli(args, capsys)
    assert code != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_no_traceback_from_the_installed_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dalikd", "train", "--data", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # no --out: runs/ is here
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: dataset folder not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "runs").exists()  # the run folder it made is gone


def test_kd_with_a_composed_mixing_recipe_and_mixed_label_ce(
    solid_dataset, tmp_path, tiny_env, capsys
):
    teacher = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    args = ["train", "--data", solid_dataset, "--student", TINY, "--teacher", TINY,
            "--teacher-weights", teacher, "--aug", "crop_flip+cutmix", "--aug-granularity", "batch",
            "--mixed-label-ce", 0.5, "--epochs", 1, "--out", tmp_path / "run", *SMALL]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())["kd"]
    assert (config["aug"], config["granularity"], config["mixed_label_ce"]) == (
        "crop_flip+cutmix",
        "batch",
        0.5,
    )


def test_bad_compositions_say_why(solid_dataset, tmp_path, tiny_env, capsys):
    teacher = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    base = ["train", "--data", solid_dataset, "--student", TINY, "--teacher", TINY,
            "--teacher-weights", teacher, "--out", tmp_path / "run", *SMALL]  # fmt: skip
    for aug, message in (("cutmix+flip", "must come last"), ("mixup+cutmix", "two mixing recipes"),
                         ("flip+none", "cannot be composed"), ("flip+", "empty part")):  # fmt: skip
        code, _, err = run_cli([*base, "--aug", aug], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err

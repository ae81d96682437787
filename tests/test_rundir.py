"""The run folder's lifecycle: a new run never overwrites another, a failed one leaves no folder,
a resume finds its data where it moved and says in one line why it cannot go on."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import colour_of, make_dataset
from test_robustness import _one_line
from tests_helpers import run_cli

TRAIN = ["train", "--student", "tiny_models:tiny_cnn", "--image-size", "16", "--batch-size", "4",
         "--threads", "1", "--device", "cpu"]  # fmt: skip


def _train(args) -> None:
    from dalikd.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), classes=("a", "b"), n_train=4, n_val=2)


@pytest.fixture(scope="module")
def done_run(data, tmp_path_factory) -> Path:
    """A finished 2-epoch run (2 steps an epoch); tests resume copies of it."""
    run = tmp_path_factory.mktemp("done") / "run"
    _train([*TRAIN, "--data", data, "--epochs", "2", "--out", run])
    return run


@pytest.fixture
def run(done_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(done_run, copy)
    return copy


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- 1: a new run never overwrites a folder ---------------------------------------------------


def test_a_new_run_refuses_a_folder_that_holds_a_run_or_anything(run, data, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _one_line(*run_cli([*TRAIN, "--data", data, "--epochs", "1", "--out", run], capsys),
              f"{run} already holds a run", f"--resume {run}")  # fmt: skip
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # untouched, kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _one_line(*run_cli([*TRAIN, "--data", data, "--out", other], capsys), "is not empty")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# -- 2: the data may move -----------------------------------------------------------------------


def test_data_is_saved_absolute_and_a_resume_from_elsewhere_finds_it(
    data, tmp_path, monkeypatch, capsys
):
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "ds").symlink_to(data)
    monkeypatch.chdir(tmp_path / "cwd")
    code, _, err = run_cli([*TRAIN, "--data", "ds", "--epochs", "1", "--out", "r"], capsys)
    assert code == 0, err
    run = tmp_path / "cwd" / "r"
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(data.resolve())
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "--resume", "cwd/r", "--epochs", "2"], capsys)
    assert code == 0, err
    # the same folder, spelt otherwise (trailing slash, relative, a link) is no change
    code, _, err = run_cli(["train", "--resume", run, "--data", "cwd/ds/", "--epochs", "3"], capsys)
    assert code == 0, err
    assert _epochs(run) == [1, 2, 3]


def test_a_run_resumes_on_a_copy_of_its_data_in_another_folder(tmp_path, capsys, tiny_env):
    from test_robustness import stopped_inside_a_remainder
    from tiny_models import Recording

    # files that fail only in training (in data_report.tsv by path) must stay out of the copy
    root, run = stopped_inside_a_remainder(tmp_path, capsys)
    assert "failed in training" in (run / "data_report.tsv").read_text()
    scratch = tmp_path / "scratch" / "d"  # e.g. copied to a node's local disk
    shutil.copytree(root, scratch)
    shutil.rmtree(root)
    _one_line(*run_cli(["train", "--resume", run], capsys), f"{root} is not there", "--data")
    code, out, err = run_cli(["train", "--resume", run, "--data", scratch], capsys)
    assert code == 0, err
    good = Counter(colour_of(label, i) for label in range(4) for i in range(5))
    assert Counter(Recording.seen) == good  # the epoch across both runs: each image once
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(scratch)
    assert str(scratch / "train/ant/bad_sof.jpg") in (run / "data_report.tsv").read_text()


def test_a_resume_on_another_dataset_says_what_differs(run, data, tmp_path, capsys):
    more_files = shutil.copytree(data, tmp_path / "more_files")
    shutil.copy(more_files / "train/a/img000.png", more_files / "train/a/extra.png")
    _one_line(*run_cli(["train", "--resume", run, "--data", more_files, "--epochs", "3"], capsys),
              f"{more_files} is not the dataset {run} was trained on",
              "8 train files in the run, 9 there")  # fmt: skip
    more_classes = shutil.copytree(data, tmp_path / "more_classes")
    shutil.copytree(more_classes / "train/b", more_classes / "train/c")
    _one_line(*run_cli(["train", "--resume", run, "--data", more_classes, "--epochs", "3"], capsys),
              "2 classes in the run, 3 there", "8 train files in the run, 12 there")  # fmt: skip
    renamed = shutil.copytree(data, tmp_path / "renamed")
    (renamed / "train/b/img003.png").rename(renamed / "train/b/img9.png")
    _one_line(*run_cli(["train", "--resume", run, "--data", renamed, "--epochs", "3"], capsys),
              "other class or file names (or order)")  # fmt: skip


def test_a_run_without_a_listing_takes_only_its_own_folder(run, data, tmp_path, capsys):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["train_listing"]  # as saved before the listing was recorded
    torch.save(ckpt, run / "last.pt")
    copy = shutil.copytree(data, tmp_path / "copy")
    _one_line(*run_cli(["train", "--resume", run, "--data", copy, "--epochs", "3"], capsys),
              f"cannot move to --data {copy}", f"only its folder {data}")  # fmt: skip
    args = ["train", "--resume", run, "--data", f"{data}/", "--epochs", "3"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err


# -- 3: a resume that would not train, --out beside --resume ------------------------------------


def test_a_resume_with_no_epochs_left_is_refused(run, capsys):
    config = (run / "config.json").read_text()
    _one_line(*run_cli(["train", "--resume", run], capsys),
              f"{run} is complete (2 of 2 epochs); give --epochs N > 2 to train on")  # fmt: skip
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "1"], capsys),
              f"{run} has done 2 epochs; --epochs 1 is fewer")  # fmt: skip
    assert (run / "config.json").read_text() == config
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "3", "--out", run.parent / "x"],
                       capsys), "drop --out")  # fmt: skip
    assert not (run.parent / "x").exists()
    code, _, err = run_cli(["train", "--resume", run, "--epochs", "3", "--out", run], capsys)
    assert code == 0, err
    assert _epochs(run) == [1, 2, 3]


# -- 4: a failed run leaves no folder; default folders are unique -------------------------------


def test_a_failed_new_run_leaves_no_folder(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _one_line(*run_cli([*TRAIN, "--data", tmp_path / "nope"], capsys), "not found")
    _one_line(*run_cli([*TRAIN, "--data", data, "--aug", "cutmx"], capsys), "cutmx")
    assert not (tmp_path / "runs").exists()
    # after the data scan: config.json, metrics.jsonl and data_report.tsv were written
    too_big = ["--data", data, "--batch-size", "64", "--epochs", "1"]
    _one_line(*run_cli([*TRAIN, *too_big, "--out", tmp_path / "a/b/run"], capsys), "no full batch")
    assert not (tmp_path / "a").exists()  # and the parents it made
    mine = tmp_path / "mine"  # a folder the user made stays, as it was: empty
    mine.mkdir()
    _one_line(*run_cli([*TRAIN, *too_big, "--out", mine], capsys), "no full batch")
    assert mine.is_dir() and not list(mine.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_folder_with_a_checkpoint_is_kept(tmp_path):
    from dalikd.rundir import claimed

    run = tmp_path / "runs" / "r"
    with pytest.raises(RuntimeError), claimed(run, run, print) as folder:
        (folder / "last.pt").write_bytes(b"x")
        raise RuntimeError("after the first checkpoint")
    assert [p.name for p in run.iterdir()] == ["last.pt"]


def test_runs_started_in_one_second_get_their_own_folders(data, tmp_path, monkeypatch, capsys):
    import dalikd.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dalikd.train, "default_run_dir", lambda: "runs/20260101-000000")
    (tmp_path / "runs" / "20260101-000000").mkdir(parents=True)  # the other run's, just made
    code, out, err = run_cli([*TRAIN, "--data", data, "--epochs", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "20260101-000000-2" / "last.pt").is_file()
    assert not list((tmp_path / "runs" / "20260101-000000").iterdir())


# -- 5: what --resume is given -----------------------------------------------------------------


def test_resume_takes_the_path_of_last_pt(run, capsys):
    code, _, err = run_cli(["train", "--resume", run / "last.pt", "--epochs", "3"], capsys)
    assert code == 0, err
    assert _epochs(run) == [1, 2, 3]


def test_a_damaged_or_foreign_last_pt_is_one_line(run, capsys):
    whole = (run / "last.pt").read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:100], b""):
        (run / "last.pt").write_bytes(damaged)
        _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys),
                  f"{run / 'last.pt'} is damaged (truncated or not a checkpoint): ")  # fmt: skip
    torch.save(torch.load(run / "best.pt", weights_only=True)["model"], run / "last.pt")
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys),
              "is not a dalikd checkpoint (a weights file?",
              f"--student-weights {run / 'last.pt'}")  # fmt: skip


def test_a_resume_of_a_run_in_progress_says_so(run, capsys):
    from dalikd.rundir import locked

    with locked(run, print):
        _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys),
                  f"{run} is in use by another process")  # fmt: skip


# -- a review's findings where the parts meet ---------------------------------------------------


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_its_folder(data, tmp_path,
                                                                             capsys):  # fmt: skip
    # SIGKILL (OOM killer, a lost node) before last.pt: no cleanup ran; the same command (a
    # requeued job) starts the run again there instead of being refused both ways
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    (run / "data_report.tsv").write_text("path\treason\n")
    (run / "run.lock").write_text("999999999 " + __import__("socket").gethostname() + "\n")
    code, out, err = run_cli([*TRAIN, "--data", data, "--epochs", "1", "--out", run], capsys)
    assert code == 0, err
    assert "cleared what a run stopped before its first checkpoint left" in out + err
    assert _epochs(run) == [1]
    (run / "notes.txt").write_text("mine")  # anything else there: still refused
    _one_line(*run_cli([*TRAIN, "--data", data, "--out", run], capsys), "already holds a run")


def test_skips_stay_out_after_a_resume_on_moved_data_died_before_its_checkpoint(
    tmp_path, capsys, tiny_env, monkeypatch
):
    from test_robustness import stopped_inside_a_remainder

    from dalikd import train

    root, run = stopped_inside_a_remainder(tmp_path, capsys)
    scratch = tmp_path / "scratch" / "d"
    shutil.copytree(root, scratch)
    seen: dict[str, tuple] = {}

    def dies(run_, dali_state):  # before the next checkpoint: config.json and the
        seen["files"] = run_.dataset.train.files  # report already name the scratch copy
        seen["failed"] = set(run_.failures.failed)  # what the run leaves out
        raise RuntimeError("the node is lost")

    def left_out() -> bool:
        """The run's listing keeps the bad files (their identities), named where the data is
        now, and every one of them is left out."""
        bad = {f for f in seen["files"] if "bad_" in f}
        return len(bad) == 2 and bad <= seen["failed"]

    monkeypatch.setattr(train, "_open_loaders", dies)
    with pytest.raises(RuntimeError):
        run_cli(["train", "--resume", run, "--data", scratch], capsys)
    assert left_out() and all(f.startswith(str(scratch)) for f in seen["files"])
    with pytest.raises(RuntimeError):  # back on the original folder
        run_cli(["train", "--resume", run, "--data", root], capsys)
    assert left_out() and all(f.startswith(str(root) + "/") for f in seen["files"])


def test_runs_that_cannot_be_made_and_a_ctrl_c_without_out_are_one_line(data, tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    from dalikd import train
    from dalikd.config import build_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs folder would be")
    _one_line(*run_cli([*TRAIN, "--data", data], capsys), "cannot create runs", "give --out")
    (tmp_path / "runs").unlink()
    calls = []
    real = train._train

    def ctrl_c_after_an_epoch(cfg, *args):  # last.pt written, then a second Ctrl-C
        real(build_config(overrides={"optim.epochs": 1}, base=cfg), *args)
        calls.append(cfg.out)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train", ctrl_c_after_an_epoch)
    code, _, err = run_cli([*TRAIN, "--data", data, "--epochs", "2"], capsys)  # no --out
    assert code == 130 and calls[0].startswith("runs/")
    assert err.strip() == f"interrupted; the run continues with: dalikd train --resume {calls[0]}"

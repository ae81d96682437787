"""A black-box QA pass's findings: user mistakes give one line, options are never silently
ignored, output files are checked before the long work, messages name what the user typed."""

import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import TESTS, make_dataset
from test_robustness import TRAIN, _one_line
from tests_helpers import run_cli
from tiny_models import tiny_cnn

TINY = "tiny_models:tiny_cnn"
EVAL = ["eval", "--model", TINY, "--image-size", "16", "--batch-size", "2", "--threads", "1",
        "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("small"), classes=("a", "b"), n_train=4, n_val=2)


def checkpoint(path, classes=None):
    """A dalikd checkpoint's weights (with the classes it was trained on) or a state_dict."""
    torch.manual_seed(0)
    state = tiny_cnn(len(classes or "ab")).state_dict()
    torch.save({"model": state, "classes": list(classes)} if classes else state, path)
    return path


# -- 1. tracebacks -------------------------------------------------------------------------------


def test_empty_or_garbage_weights_files_are_one_line(small, tmp_path, capsys, tiny_env):
    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps({"a": object}))  # not tensors: weights_only refuses it
    teacher = [*TRAIN, "--data", small, "--out", tmp_path / "r", "--teacher", TINY]
    for weights in (zero, garbage):
        needle = "is empty (0 bytes)" if weights == zero else "not a weights file torch can load"
        for args in (
            [*EVAL, "--data", small, "--weights", weights],
            [*teacher, "--teacher-weights", weights],
        ):
            with warnings.catch_warnings(record=True) as caught:  # printed to the user too
                warnings.simplefilter("always")
                code, out, err = run_cli(args, capsys)
            _one_line(code, out, err, str(weights), needle)
            assert not [w for w in caught if "pickle" in str(w.message)]
            assert "weights_only" not in err


def test_profile_outputs_are_checked_first_and_their_folders_made(small, tmp_path, capsys):
    fast = ["profile", "--data", small, "--aug", "none", "--baseline", "none", "--image-size",
            16, "--batch-size", 2, "--threads", 1, "--device", "cpu", "--windows", 1,
            "--window-seconds", 0, "--warmup", 1]  # fmt: skip
    (tmp_path / "file").write_text("")
    _one_line(*run_cli([*fast, "--json", tmp_path / "file" / "p.json"], capsys), "--json")
    _one_line(*run_cli([*fast, "--plot", tmp_path / "p.jpg"], capsys), "--plot", "*.png")
    out_json, out_png = tmp_path / "new" / "p.json", tmp_path / "new" / "plots" / "p.png"
    code, _, err = run_cli([*fast, "--json", out_json, "--plot", out_png], capsys)
    assert code == 0, err
    assert out_json.read_text().startswith("{") and out_png.read_bytes()[:4] == b"\x89PNG"


# -- 2. options never silently ignored -----------------------------------------------------------


def test_teacher_options_without_a_teacher_and_empty_weights_are_refused(small, tmp_path, capsys):
    weights = checkpoint(tmp_path / "w.pt")
    base = [*TRAIN, "--data", small, "--out", tmp_path / "r"]
    _one_line(*run_cli([*base, "--teacher-weights", weights], capsys), "needs --teacher")
    _one_line(*run_cli([*base, "--eval-teacher"], capsys), "--eval-teacher", "give --teacher")
    _one_line(*run_cli([*EVAL, "--data", small, "--weights", ""], capsys), "--weights is empty")
    assert not (tmp_path / "r").exists()


# -- 3. eval on val/ only; classes of a checkpoint -----------------------------------------------


def test_eval_takes_val_only_and_refuses_other_class_names(small, tmp_path, capsys, tiny_env):
    val_only = tmp_path / "val_only"
    shutil.copytree(small / "val", val_only / "val")
    for weights in (checkpoint(tmp_path / "ckpt.pt", ("a", "b")), checkpoint(tmp_path / "sd.pt")):
        code, out, err = run_cli([*EVAL, "--data", val_only, "--weights", weights], capsys)
        assert code == 0 and "top-1" in out, err
    shutil.rmtree(val_only / "val" / "b")  # a val/ of fewer classes: the checkpoint's index
    from dalikd.evaluate import evaluate_model

    result = evaluate_model(str(val_only), TINY, str(tmp_path / "ckpt.pt"), image_size=16,
                            threads=1, device="cpu")  # fmt: skip
    assert result["count"] == 2

    other = make_dataset(tmp_path / "other", classes=("a", "c"), n_train=4, n_val=2)
    weights = checkpoint(tmp_path / "ckpt.pt", ("a", "b"))
    needle = "only in the checkpoint 1 (e.g. b), only in the dataset 1 (e.g. c)"
    _one_line(*run_cli([*EVAL, "--data", other, "--weights", weights], capsys), needle)
    shutil.copytree(other / "val", tmp_path / "other_val" / "val")  # c: not a checkpoint class
    args = [*EVAL, "--data", tmp_path / "other_val", "--weights", weights]
    _one_line(*run_cli(args, capsys), needle)
    train = [*TRAIN, "--data", other, "--out", tmp_path / "r", "--teacher", TINY]
    _one_line(*run_cli([*train, "--teacher-weights", weights], capsys), "teacher weights", needle)


# -- 4. Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_names_resume_only_where_a_last_pt_was_written(small, tmp_path, capsys,
                                                              monkeypatch, tiny_env):  # fmt: skip
    from dalikd import evaluate, train

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(evaluate, "evaluate_model", interrupt)
        code, _, err = run_cli([*EVAL, "--data", small, "--weights", "x.pt"], capsys)
        assert code == 130 and err.strip() == "interrupted"
        m.setattr(train, "_open_loaders", interrupt)  # start-up of a fresh run: no last.pt
        run = tmp_path / "r"
        code, _, err = run_cli([*TRAIN, "--data", small, "--out", run, "--epochs", 1], capsys)
        assert code == 130 and err.strip() == "interrupted"
    assert not run.exists()  # a fresh run stopped before its first checkpoint leaves nothing
    code, _, err = run_cli([*TRAIN, "--data", small, "--out", run, "--epochs", 1], capsys)
    assert code == 0, err
    monkeypatch.setattr(train, "_open_loaders", interrupt)
    code, _, err = run_cli(["train", "--resume", run, "--epochs", 2], capsys)
    assert code == 130
    assert err.strip() == f"interrupted; the run continues with: dalikd train --resume {run}"


# -- 5. no AutoGraph warning ---------------------------------------------------------------------

AUTOAUGMENT_GRAPH = """
import numpy as np
from tests_helpers import run_graph
from dalikd import autoaugment
images = np.zeros((2, 32, 32, 3), np.uint8)
run_graph(lambda images: autoaugment.autoaugment(images, "imagenet", 32), {"images": images},
          conditionals=True)
"""


def test_autoaugment_builds_without_an_autograph_warning(tmp_path):
    # a fresh process: AutoGraph warns once per process, whatever ran before in this one; a
    # file, as AutoGraph reads the source of the graph function
    script = tmp_path / "graph.py"
    script.write_text(AUTOAUGMENT_GRAPH)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "AutoGraph" not in done.stderr + done.stdout, done.stderr


# -- 6. messages ---------------------------------------------------------------------------------


def test_messages_name_what_the_user_typed(small, tmp_path, capsys, tiny_env):
    base = [*TRAIN, "--data", small, "--out", tmp_path / "r"]
    unknown = "unknown augmentation 'cutmx'; known: "
    _one_line(*run_cli([*base, "--aug", "cutmx"], capsys), unknown, "cutmix")
    _one_line(*run_cli([*base, "--pool-size", 0], capsys), "--pool-size must be positive, got 0")
    _one_line(*run_cli([*base, "--crop-scale", "0.5"], capsys), "--crop-scale must have 2 values")
    config = tmp_path / "c.toml"
    config.write_text("[kd]\npool_size = 0\n")  # from a file: the key as the file writes it
    _one_line(*run_cli([*base, "--config", config], capsys), "kd.pool_size must be positive")

    state = tiny_cnn(2).state_dict()
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    code, out, err = run_cli([*EVAL, "--data", small, "--weights", tmp_path / "extra.pt"], capsys)
    _one_line(code, out, err, "do not fit tiny_models:tiny_cnn: 1 unexpected key (e.g. extra)")
    assert "missing" not in err

    _one_line(*run_cli(["check-data", small / "val" / "a" / "img000.png"], capsys),
              "is a file, not a dataset folder")  # fmt: skip
    one_bad = make_dataset(tmp_path / "one_bad", classes=("a",), n_train=2, n_val=1)
    (one_bad / "train" / "a" / "notes.txt").write_text("not an image")
    code, out, err = run_cli(["check-data", one_bad], capsys)
    assert code == 0 and "1 file left out" in out, err


# -- 7. help -------------------------------------------------------------------------------------


def _help(*command, capsys):
    code, out, err = run_cli([*command, "--help"], capsys)
    assert code == 0, err
    return " ".join(out.split())  # click wraps lines; compare the words


def test_help_is_complete_and_says_one_thing_one_way(capsys):
    from dalikd.cli.options import SEED_HELP, THREADS_HELP

    eval_help = _help("eval", capsys=capsys)
    assert "--batch-size INTEGER images per step [default: 100]" in eval_help
    assert "--image-size INTEGER val image side in px" in eval_help
    for command in ("eval", "tstddev", "train"):
        assert THREADS_HELP in _help(command, capsys=capsys)
    for command in ("eval", "tstddev", "profile"):
        assert "at most 8) [default: 0]" in _help(command, capsys=capsys), command
    for command in ("train", "tstddev", "preview"):
        assert f"--seed INTEGER {SEED_HELP}" in _help(command, capsys=capsys), command
    tstddev = _help("tstddev", capsys=capsys)
    assert (
        "teacher model: torchvision name, timm:NAME, cifar:NAME (dalikd models) or module:function"
        in tstddev
    )
    for command in ("train", "tstddev"):
        assert (
            "weights: a file (state_dict or dalikd checkpoint) or a torchvision weights name"
            in (_help(command, capsys=capsys))
        )


def test_bare_dalikd_prints_the_help_and_exits_0(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("Usage: dalikd") and "train" in out and "eval" in out

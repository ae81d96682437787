"""Never a dead run, never a traceback (issue 13): files that pass the scan and still fail in
DALI are left out mid-run, with every good image of the epoch still trained on."""

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_of, make_dataset
from PIL import Image
from tests_helpers import run_cli

from dalikd import recovery

CLASSES = ("ant", "bee", "cat", "dog")  # 4 x 5 good PNGs = 20 = 5 batches of 4


def _jpeg(size=(40, 48), noise=False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (
        rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        if noise
        else np.full((*size, 3), 128, np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def corrupt_sof() -> bytes:
    """A JPEG whose start-of-frame header says 0 x 0 pixels: head and tail look fine."""
    data = bytearray(_jpeg())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = bytes(4)
    return bytes(data)


def truncated_with_thumbnail() -> bytes:
    """A JPEG with an embedded thumbnail (APP1), cut off shortly after its scan starts: the
    last 4 KiB hold the thumbnail's end-of-image marker, but not its last 32 bytes (the scan
    leaves it out)."""
    main = _jpeg((64, 64), noise=True)
    thumb = _jpeg((8, 8))
    app1 = b"Exif\x00\x00" + thumb
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    whole = main[:2] + segment + main[2:]
    sos = whole.find(b"\xff\xda")
    cut = whole[: sos + 400]
    assert b"\xff\xd9" in cut[-4096:] and not cut.endswith(b"\xff\xd9")
    return cut


def cut_before_its_scan() -> bytes:
    """A JPEG cut off before its scan, with an end-of-image marker appended (a copy tool that
    "repairs" the end): the scan leaves it out (its header ends before any start-of-scan). DALI
    2.4's decoder fails on it ("Unexpected end of stream") and, in a batch of ~50 or more, can
    crash the process instead (tests/test_scan_faults.py)."""
    main = _jpeg((64, 64), noise=True)
    return main[: main.find(b"\xff\xda")] + b"\xff\xd9"


def bad_scan_header() -> bytes:
    """A JPEG whose start-of-scan header names a component the frame does not have: head and
    tail look fine, so the scan passes it, and DALI's decoder raises on it (at any batch
    size, without crashing)."""
    data = bytearray(_jpeg((64, 64), noise=True))
    sos = data.find(b"\xff\xda")
    data[sos + 5] = 0xF9  # the first component selector: no frame component has this id
    return bytes(data)


def recording_args(root: Path, run: Path, epochs: int, batch_size: int = 4) -> list:
    """``dalikd train`` of tiny_models.recording_cnn (it records every image it trains on) on
    CPU, 16 px, into ``run``."""
    return ["train", "--data", root, "--student", "tiny_models:recording_cnn", "--epochs",
            epochs, "--image-size", "16", "--batch-size", batch_size, "--threads", "1",
            "--device", "cpu", "--out", run]  # fmt: skip


def test_bad_files_are_left_out_mid_run_and_every_good_image_is_seen(tmp_path, capsys, tiny_env):
    from tiny_models import Recording

    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=5, n_val=2)
    (root / "train/ant/bad_sof.jpg").write_bytes(corrupt_sof())
    (root / "train/bee/bad_cut.jpg").write_bytes(bad_scan_header())
    replaced = root / "train/cat/bad_replaced.jpg"
    replaced.write_bytes(_jpeg())
    (root / "train/dog").joinpath(os.fsdecode(b"bad_\xff\xfe.jpg")).write_bytes(_jpeg())

    # a cached scan passes every file; then one is replaced by garbage of the same size and
    # mtime (the cache keys on those), as a disk error or a copy gone wrong would leave it
    code, out, err = run_cli(["check-data", root], capsys)
    assert code == 0, err
    st = replaced.stat()
    replaced.write_bytes(np.random.default_rng(1).bytes(st.st_size))
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns))

    Recording.seen = []
    run = tmp_path / "run"
    code, out, err = run_cli(recording_args(root, run, epochs=2), capsys)
    assert code == 0, err
    assert "Traceback" not in out + err
    good = Counter(colour_of(label, i) for label in range(4) for i in range(5))
    epochs = [Counter(Recording.seen[:20]), Counter(Recording.seen[20:])]
    assert len(Recording.seen) == 40
    assert epochs[0] == good  # the failing epoch: every good image exactly once
    assert epochs[1] == good  # the next one, rebuilt without the bad files
    report = (run / "data_report.tsv").read_text(errors="replace")
    rows = dict(line.split("\t", 1) for line in report.splitlines()[1:])
    for name in ("ant/bad_sof.jpg", "bee/bad_cut.jpg", "cat/bad_replaced.jpg"):
        path = str(root / "train" / name)
        assert rows[path].startswith("failed in training (epoch 1, step"), rows
    assert any("not valid UTF-8" in r for r in rows.values())
    assert "left out" in out + err


def test_a_bad_file_in_the_first_batch_of_a_short_epoch_is_left_out(tmp_path, capsys, tiny_env):
    # One batch per epoch holds every file: the failure comes before anything is seen, and
    # leaving the file out makes the epoch one image short (padded with a good one). The first
    # batches must also fail where recovery watches, not while the loader is being built.
    from tiny_models import Recording

    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=4, n_val=1)
    (root / "train/a/img003.png").unlink()
    (root / "train/a/bad.jpg").write_bytes(bad_scan_header())
    Recording.seen = []
    run = tmp_path / "run"
    code, out, err = run_cli(recording_args(root, run, epochs=1, batch_size=8), capsys)
    assert code == 0, err
    good = {colour_of(label, i) for label in range(2) for i in range(4)} - {colour_of(0, 3)}
    assert len(Recording.seen) == 8 and set(Recording.seen) == good  # 7 good, one twice
    assert "bad.jpg\tfailed in training (epoch 1, step 1)" in (run / "data_report.tsv").read_text()


def stopped_inside_a_remainder(tmp_path: Path, capsys) -> tuple[Path, Path]:
    """A 1-epoch run over 4 x 5 good images and 2 that fail in training, stopped by SIGTERM
    during step 4 of 5 (inside the remainder loader); ``(data root, run dir)``. The images
    trained on so far are in ``tiny_models.Recording.seen``."""
    from tiny_models import Recording

    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=5, n_val=2)
    (root / "train/ant/bad_sof.jpg").write_bytes(corrupt_sof())
    (root / "train/bee/bad_cut.jpg").write_bytes(bad_scan_header())
    Recording.seen, Recording.stop_at = [], 16  # SIGTERM during step 4 of 5
    run = tmp_path / "run"
    args = recording_args(root, run, epochs=1)
    try:
        code, out, err = run_cli(args, capsys)
    finally:
        Recording.stop_at = None
    assert code == 128 + 15, err
    return root, run


def test_a_run_stopped_inside_a_remainder_resumes_it(tmp_path, capsys, tiny_env):
    import torch
    from tiny_models import Recording

    root, run = stopped_inside_a_remainder(tmp_path, capsys)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step_in_epoch"] == 4
    state = json.loads(ckpt["dali"][0].removeprefix(recovery.STATE))
    assert state["failures"] and state["dali"]  # stopped inside one, after both failures
    code, out, err = run_cli(["train", "--resume", run], capsys)
    assert code == 0, err
    good = Counter(colour_of(label, i) for label in range(4) for i in range(5))
    assert Counter(Recording.seen) == good  # the epoch across both runs: each image once


def test_batch_larger_than_the_training_set_is_one_line(solid_dataset, tmp_path, capsys):
    code, out, err = run_cli(
        ["train", "--data", solid_dataset, "--student", "resnet18", "--batch-size", "64",
         "--epochs", "1", "--device", "cpu", "--out", tmp_path / "run"],
        capsys,
    )  # fmt: skip
    assert code == 1
    assert "lower --batch-size" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_second_run_on_one_out_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from dalikd.rundir import LOCK, locked

    run = tmp_path / "run"
    run.mkdir()
    notes = []
    with locked(run, notes.append):
        code, out, err = run_cli(
            ["train", "--data", tmp_path, "--student", "resnet18", "--out", run], capsys
        )
        assert code == 1 and "in use by another run" in err
        assert len(err.strip().splitlines()) == 1
    assert not (run / LOCK).exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (run / LOCK).write_text(f"{dead} {socket.gethostname()}\n")
    with locked(run, notes.append):
        assert (run / LOCK).read_text().split()[0] == str(os.getpid())
    assert notes and f"left by process {dead}" in notes[0]


def test_out_that_is_a_file_is_one_line(solid_dataset, tmp_path, capsys):
    out_file = tmp_path / "taken"
    out_file.write_text("x")
    code, out, err = run_cli(
        ["train", "--data", solid_dataset, "--student", "resnet18", "--out", out_file], capsys
    )
    assert code == 1 and "is a file" in err and "Traceback" not in err


def test_a_failed_write_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    import torch

    from dalikd.checkpoint import save_atomic
    from dalikd.errors import DalikdError

    target = tmp_path / "last.pt"
    save_atomic({"a": 1}, target)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DalikdError, match=f"cannot write {target}: disk full$"):
        save_atomic({"a": 2}, target)
    assert not (tmp_path / "last.pt.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file
    assert torch.load(target, weights_only=True) == {"a": 1}  # the last good one is kept


# -- item 6: caches are data, private, and validated --------------------------------------------


def test_the_scan_cache_is_json_validated_and_private(tmp_path):
    import json
    import stat

    from dalikd.datacheck import _cache_path, check_files

    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=2, n_val=1)
    files = sorted(str(p) for p in (root / "train").rglob("*.png"))
    (root / "train/a/empty.png").write_bytes(b"")
    files.append(str(root / "train/a/empty.png"))
    cache = tmp_path / "cache" / "deep"
    assert check_files(files, root=root, cache_root=cache) == {files[-1]: "empty file"}
    cache_file = _cache_path(cache, root, False)
    data = json.loads(cache_file.read_text())  # plain data, not a pickle
    assert data["verdicts"][files[-1]][2] == "empty file"
    for folder in (cache, cache / "scans"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600

    # a cache that lies about a file's verdict in a wrong type, or is not even JSON, is rebuilt
    for damaged in (
        json.dumps({**data, "verdicts": {files[-1]: [0, "x", None]}}),
        json.dumps({**data, "verdicts": {files[-1]: [*data["verdicts"][files[-1]][:2], 7]}}),
        json.dumps([1, 2]),
        "\x80\x04\x95 not json",
    ):
        cache_file.write_text(damaged)
        assert check_files(files, root=root, cache_root=cache) == {files[-1]: "empty file"}
        assert json.loads(cache_file.read_text())["verdicts"] == data["verdicts"]


def test_the_native_operator_loads_only_from_a_folder_of_the_user(tmp_path, monkeypatch):
    from dalikd import native
    from dalikd.errors import DalikdError
    from dalikd.native import builder

    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_compile(work, key):  # stands in for the ~30 s compile
        calls.append(key)
        (work / "libdalikd_mix_cpu.so").write_bytes(b"")
        return native.BuildInfo(key, "fake", "libdalikd_mix_cpu.so", "", None, "n/a", "", "")

    monkeypatch.setattr(builder, "_compile", fake_compile)
    monkeypatch.setattr(builder, "_current_toolchain", lambda: "fake")
    _, folder = native.build()
    assert len(calls) == 1 and oct(folder.parent.stat().st_mode & 0o777) == "0o700"
    native.build()
    assert len(calls) == 1  # ours: reused
    folder.chmod(0o777)  # anyone could have swapped the library in it: rebuilt
    native.build()
    assert len(calls) == 2 and folder.stat().st_mode & 0o022 == 0
    if os.getuid() == 0:  # a cache folder someone else owns is refused in one line
        os.chown(folder.parent, 65534, 65534)
        with pytest.raises(DalikdError, match="is not owned by you"):
            native.build()


# -- items 4, 5, 7, 8: ordinary mistakes are one line ------------------------------------------

TRAIN = ["train", "--student", "tiny_models:tiny_cnn", "--image-size", "16", "--batch-size", "4",
         "--threads", "1", "--device", "cpu"]  # fmt: skip


def _one_line(code, out, err, *needles):
    assert code not in (0, None) and "Traceback" not in out + err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("small"), classes=("a", "b"), n_train=4, n_val=2)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--momentum", "-1"], "--momentum must be in [0, 1), got -1.0"),
        (["--nesterov", "--momentum", "0"], "--nesterov needs a momentum above 0"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
        (["--student", "os:getcwd"], "model 'os:getcwd' cannot be built"),
        (["--student", "types:SimpleNamespace"], "not return a torch.nn.Module (got Simple"),
    ],
)
def test_bad_train_settings_are_one_line(flags, needle, small, tmp_path, capsys, tiny_env):
    args = [*TRAIN, "--data", small, "--epochs", "1", "--out", tmp_path / "r", *flags]
    _one_line(*run_cli(args, capsys), needle)


def test_a_toml_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_bytes(b"[optim]\nlr = 0.1 # caf\xe9\n")
    _one_line(*run_cli(["train", "--config", config], capsys), "not UTF-8 text")


@pytest.mark.parametrize("flag", ["--batch-size", "--image-size"])
def test_eval_checks_its_settings(flag, small, capsys):
    args = ["eval", "--data", small, "--model", "resnet18", "--weights", "x.pt", flag, "0"]
    _one_line(*run_cli(args, capsys), "must be")


def test_weights_of_the_wrong_shapes_name_the_first_key(small, tmp_path, capsys, tiny_env):
    import torch
    from tiny_models import tiny_cnn

    weights = tmp_path / "wide.pt"
    state = tiny_cnn(2).state_dict()
    state["0.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, weights)
    needle = "0.weight has shape (16, 3, 3, 3) in the file, (8, 3, 3, 3) in the model"
    for args in (
        [*TRAIN, "--data", small, "--student-weights", weights, "--out", tmp_path / "r"],
        ["eval", "--data", small, "--model", "tiny_models:tiny_cnn", "--weights", weights,
         "--device", "cpu"],
    ):  # fmt: skip
        _one_line(*run_cli(args, capsys), needle)
    from dalikd.errors import DalikdError
    from dalikd.models import build_model

    with pytest.raises(DalikdError, match=r"teacher weights .* 0\.weight has shape"):
        build_model("tiny_models:tiny_cnn", 2, str(weights), role="teacher")  # tstddev's path


def test_resume_refuses_fixed_settings_and_applies_the_others(small, tmp_path, capsys, tiny_env):
    import json

    import torch

    run = tmp_path / "r"
    base = [*TRAIN, "--data", small, "--out", run, "--lr", "0.05"]
    code, out, err = run_cli([*base, "--epochs", "1"], capsys)
    assert code == 0, err
    _one_line(
        *run_cli(
            [
                "train",
                "--resume",
                run,
                "--batch-size",
                "2",
                "--aug-granularity",
                "batch",
                "--seed",
                "3",
            ],
            capsys,
        ),  # fmt: skip
        "cannot change on resume: data.batch_size 4 -> 2",
        "kd.granularity sample -> batch",
        "seed 0 -> 3",
    )
    code, out, err = run_cli(
        ["train", "--resume", run, "--epochs", "2", "--lr", "0.01", "--weight-decay", "0.5",
         "--momentum", "0.5", "--resize", "auto", "--mixing", "auto"],  # auto: keep the saved
        capsys,
    )  # fmt: skip
    assert code == 0, err
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["lr"] == 0.05 and history[1]["lr"] == 0.01
    groups = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert {g["momentum"] for g in groups} == {0.5}
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.01

    for damaged in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"optim": {"lr": "fast"}}'):
        (run / "config.json").write_bytes(damaged)
        _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys), "config.json")


def test_empty_classes_broken_links_and_loops_are_reported(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=2, n_val=1)
    (root / "train/a/gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "train/b/loop.png").symlink_to(root / "train/b/loop.png")
    (root / "train/b/dirloop").symlink_to(root / "train/b")
    (root / "train/zloop").symlink_to(root / "train/zloop")  # a loop where a class would be
    code, out, err = run_cli(["check-data", root], capsys)
    assert code == 0, err
    assert "gone.png  (broken symbolic link" in out and "loop.png  (broken symbolic link" in out
    (root / "train/c[x]").mkdir()  # a class with no image is refused, its [brackets] kept
    _one_line(*run_cli(["check-data", root], capsys), "train/c[x]", "hold no image file")


def test_check_data_on_an_all_bad_split_lists_the_files_and_says_so(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=("a",), n_train=1, n_val=1)
    for f in (root / "val/a").iterdir():
        f.write_bytes(b"")
    code, out, err = run_cli(["check-data", root], capsys)
    _one_line(code, out, err, "val holds no usable images; 1 left out (listed above)")
    assert "check-data" not in err and "empty file" in out


def test_last_pt_is_named_only_when_there_is_one(tmp_path):
    from dalikd.train import _kept

    assert _kept(tmp_path) == ""
    (tmp_path / "last.pt").write_bytes(b"x")
    assert "last.pt keeps the last good checkpoint" in _kept(tmp_path)


RECIPES = """
from nvidia.dali import fn
from dalikd.recipes import View

def not_a_view(images, ctx):
    return images

def numpy_images(images, ctx):
    return View(images=[1, 2])

def smaller(images, ctx):
    return View(images=fn.resize(images, size=[8, 8]))

def lam_only(images, ctx):
    return View(images=images, lam=fn.random.uniform(range=[0.0, 1.0]))
"""


@pytest.mark.parametrize(
    ("fn_name", "needle"),
    [
        ("not_a_view", "recipe not_a_view returned DataNode, not a View"),
        ("numpy_images", "recipe numpy_images: View.images is list, not a DALI DataNode"),
        ("lam_only", "recipe lam_only returns lam without perm"),
        ("smaller", "uint8 (4, 8, 8, 3); a recipe must return uint8 HWC RGB images of the size"),
    ],
)
def test_a_broken_recipe_is_one_line_naming_it(fn_name, needle, small, tmp_path, capsys, tiny_env):
    recipes = tmp_path / "my_recipes.py"
    recipes.write_text(RECIPES)
    args = [*TRAIN, "--data", small, "--epochs", "1", "--out", tmp_path / "r",
            "--aug", f"{recipes}:{fn_name}", "--mixed-label-ce", "1"]  # fmt: skip
    _one_line(*run_cli(args, capsys), needle)


def test_resuming_a_data_state_of_another_graph_is_one_line(small, tmp_path, capsys, tiny_env,
                                                            monkeypatch):  # fmt: skip
    from nvidia.dali import types

    from dalikd import loaders

    # stopped mid-epoch (an epoch's start has no DALI state to restore: dalikd orders it)
    run = tmp_path / "r"
    monkeypatch.setenv("TINY_STOP_AT", "1")
    code, out, err = run_cli([*TRAIN, "--data", small, "--out", run, "--epochs", "1",
                              "--student", "tiny_models:stopping_cnn"], capsys)  # fmt: skip
    assert code == 128 + 10, err  # SIGUSR1
    crop = loaders.random_resized_crop

    def another_version(*args, **kw):  # one operator more: the saved state names no longer fit
        return crop(*args, **kw) + types.Constant(0, dtype=types.UINT8)

    monkeypatch.setattr(loaders, "random_resized_crop", another_version)
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "2"], capsys),
              "belongs to another DALI graph", f"--student-weights {run / 'last.pt'}")  # fmt: skip

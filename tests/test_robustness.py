"""Never a dead run, never a traceback (issue 13): files that pass the scan and still fail in
DALI are left out mid-run, with every good image of the epoch still trained on."""

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_of, make_dataset
from PIL import Image
from tests_helpers import run_cli

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
    last 4 KiB hold the thumbnail's end-of-image marker, so the tail check passes."""
    main = _jpeg((64, 64), noise=True)
    thumb = _jpeg((8, 8))
    app1 = b"Exif\x00\x00" + thumb
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    whole = main[:2] + segment + main[2:]
    sos = whole.find(b"\xff\xda")
    cut = whole[: sos + 400]
    assert b"\xff\xd9" in cut[-4096:] and not cut.endswith(b"\xff\xd9")
    return cut


def test_bad_files_are_left_out_mid_run_and_every_good_image_is_seen(tmp_path, capsys, tiny_env):
    from tiny_models import Recording

    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=5, n_val=2)
    (root / "train/ant/bad_sof.jpg").write_bytes(corrupt_sof())
    (root / "train/bee/bad_thumb.jpg").write_bytes(truncated_with_thumbnail())
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
    code, out, err = run_cli(
        ["train", "--data", root, "--student", "tiny_models:recording_cnn", "--epochs", "2",
         "--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu",
         "--out", run],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "Traceback" not in out + err
    good = Counter(colour_of(label, i) for label in range(4) for i in range(5))
    epochs = [Counter(Recording.seen[:20]), Counter(Recording.seen[20:])]
    assert len(Recording.seen) == 40
    assert epochs[0] == good  # the failing epoch: every good image exactly once
    assert epochs[1] == good  # the next one, rebuilt without the bad files
    report = (run / "data_report.tsv").read_text(errors="replace")
    rows = dict(line.split("\t", 1) for line in report.splitlines()[1:])
    for name in ("ant/bad_sof.jpg", "bee/bad_thumb.jpg", "cat/bad_replaced.jpg"):
        path = str(root / "train" / name)
        assert rows[path].startswith("failed in training (epoch 1, step"), rows
    assert any("not valid UTF-8" in r for r in rows.values())
    assert "left out" in out + err


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
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DalikdError, match="No space left on device"):
        save_atomic({"a": 2}, target)
    assert not (tmp_path / "last.pt.tmp").exists()
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

    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_compile(work, key):  # stands in for the ~30 s compile
        calls.append(key)
        (work / "libdalikd_mix_cpu.so").write_bytes(b"")
        return native.BuildInfo(key, "fake", "libdalikd_mix_cpu.so", "", None, "n/a", "", "")

    monkeypatch.setattr(native, "_compile", fake_compile)
    monkeypatch.setattr(native, "_current_toolchain", lambda: "fake")
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

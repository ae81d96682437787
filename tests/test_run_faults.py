"""Run folders, locks, paths and permissions under faults (issue 24 items 9-11), and the settings
that must be one line instead of an overflow, a NaN run or a misleading message."""

import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path

import pytest
import torch
from conftest import make_dataset
from test_robustness import TRAIN, _one_line
from tests_helpers import run_cli

from dalikd import rundir
from dalikd.cache import cache_dir
from dalikd.rundir import LOCK, locked


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), classes=("a", "b"), n_train=4, n_val=2)


@pytest.fixture(scope="module")
def done_run(data, tmp_path_factory) -> Path:
    """A finished 2-epoch run; tests resume copies of it."""
    from dalikd.cli.main import main

    run = tmp_path_factory.mktemp("done") / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in [*TRAIN, "--data", data, "--epochs", "2", "--out", run]])
    assert exit_info.value.code == 0
    return run


@pytest.fixture
def run(done_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(done_run, copy)
    return copy


# -- item 9: a lock records host and boot; a lost node's or a dead process's is taken over -------


def _plant(run_dir: Path, text: str, age_s: float = 0.0) -> None:
    (run_dir / LOCK).write_text(text)
    then = time.time() - age_s
    os.utime(run_dir / LOCK, (then, then))


def test_the_lock_records_host_boot_and_start_and_its_holder_renews_it(tmp_path):
    with locked(tmp_path, print, heartbeat_s=0.05):
        fields = rundir._parse_lock((tmp_path / LOCK).read_text())
        assert fields["pid"] == str(os.getpid()) and fields["host"] == socket.gethostname()
        assert fields["boot"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert fields["start"] == Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
        assert fields["heartbeat"] == "0.05"
        _plant(tmp_path, (tmp_path / LOCK).read_text(), age_s=1000)  # as if not renewed
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5  # renewed meanwhile
    assert not (tmp_path / LOCK).exists()


def _me(**fields) -> str:
    mine = rundir._parse_lock(rundir._lock_text(60))
    mine.update(fields)
    pid, host = mine.pop("pid"), mine.pop("host")
    return f"{pid} {host} " + " ".join(f"{k}={v}" for k, v in mine.items()) + "\n"


@pytest.mark.parametrize(
    ("fields", "age_s", "note"),
    [
        ({"host": "node-7"}, 400, "left by process {pid} on node-7, which has not renewed it "
                                  "for 400 s (it renews every 60 s)"),
        ({"start": "1"}, 0, "left by process {pid}, which is gone (its pid now names another "
                            "process)"),
        ({"boot": "another-boot"}, 90, "left by process {pid} before this machine restarted"),
    ],
)  # fmt: skip
def test_a_lock_of_a_lost_node_or_a_reused_pid_is_taken_over_with_a_note(tmp_path, fields, age_s,
                                                                        note):  # fmt: skip
    _plant(tmp_path, _me(**fields), age_s)
    notes = []
    with locked(tmp_path, notes.append):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
    assert notes == [f"took over the lock of {tmp_path} " + note.format(pid=os.getpid())]


@pytest.mark.parametrize("renewed", [False, True], ids=["replaced", "renewed"])
def test_a_lock_taken_or_renewed_after_it_was_judged_stale_is_kept(tmp_path, monkeypatch,
                                                                   renewed):  # fmt: skip
    """Two runs take over the same stale lock: the other one removed it and made its own (or
    its lost node came back and renewed it) between this run's look at the lock and its
    takeover. The lock there now is kept and this run is refused."""
    from dalikd.errors import DalikdError

    stale = _me(host="node-7")  # not renewed for 400 s: a lost node's
    live = stale if renewed else _me()  # renewed: the same text, a fresh mtime
    _plant(tmp_path, live, 0)
    real = rundir._read_lock

    def as_first_seen(path):  # the lock as it was when first read: stale
        if path == tmp_path / LOCK:
            return stale, rundir._parse_lock(stale), 400.0
        return real(path)

    monkeypatch.setattr(rundir, "_read_lock", as_first_seen)
    assert rundir._take(tmp_path / LOCK, tmp_path, print)  # look again
    monkeypatch.setattr(rundir, "_read_lock", real)
    assert (tmp_path / LOCK).read_text() == live
    assert [p.name for p in tmp_path.iterdir()] == [LOCK]  # nothing left aside
    with pytest.raises(DalikdError, match="is in use by another run"), locked(tmp_path, print):
        pass


@pytest.mark.parametrize(
    ("fields", "age_s", "needle"),
    [
        ({"host": "node-7"}, 10, "(process {pid} on node-7, renewed 10 s ago)"),
        (None, 10**6, "(process 123 on node-7)"),  # an older dalikd's lock: no heartbeat
        ({}, 10**6, "(process {pid} on " + socket.gethostname()),  # this live process
        # another boot, renewed within its period: a machine of the same name, not a restart
        ({"boot": "another-boot"}, 10, "(process {pid} on " + socket.gethostname()),
    ],
)
def test_a_live_lock_is_refused(tmp_path, fields, age_s, needle):
    from dalikd.errors import DalikdError

    text = "123 node-7\n" if fields is None else _me(**fields)
    _plant(tmp_path, text, age_s)
    with (
        pytest.raises(DalikdError, match="is in use by another run") as error,
        locked(tmp_path, print),
    ):
        pass
    assert needle.format(pid=os.getpid()) in str(error.value)
    assert (tmp_path / LOCK).read_text() == text


def test_a_requeued_resume_takes_over_a_lost_nodes_lock(run, capsys, tiny_env):
    _plant(run, _me(host="lost-node", pid="4242"), age_s=3600)
    code, out, err = run_cli(["train", "--resume", run, "--epochs", "3"], capsys)
    assert code == 0, err
    assert f"took over the lock of {run} left by process 4242 on lost-node" in out + err


# -- item 10: paths that survive a move ----------------------------------------------------------


def test_weights_are_saved_absolute_and_compared_as_files_on_resume(
    data, tmp_path, capsys, monkeypatch, tiny_env
):
    from tiny_models import tiny_cnn

    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    torch.save(tiny_cnn(2).state_dict(), first / "teacher.pt")
    torch.save(tiny_cnn(2).state_dict(), first / "another.pt")
    monkeypatch.chdir(first)
    teacher = ["--teacher", "tiny_models:tiny_cnn", "--teacher-weights"]
    code, _, err = run_cli([*TRAIN, "--data", data, "--epochs", "1", "--out", "r", *teacher,
                            "teacher.pt"], capsys)  # fmt: skip
    assert code == 0, err
    saved = json.loads((first / "r/config.json").read_text())["model"]["teacher_weights"]
    assert saved == str(first / "teacher.pt")
    monkeypatch.chdir(other)  # a requeued job starts elsewhere
    code, _, err = run_cli(["train", "--resume", first / "r", "--epochs", "2"], capsys)
    assert code == 0, err
    # the same file, however spelled: not a change
    for epochs, spelling in ((3, "../first/teacher.pt"), (4, first / "teacher.pt")):
        code, _, err = run_cli(["train", "--resume", first / "r", "--epochs", epochs,
                                "--teacher-weights", spelling], capsys)  # fmt: skip
        assert code == 0, err
    _one_line(*run_cli(["train", "--resume", first / "r", "--epochs", "5", "--teacher-weights",
                        "../first/another.pt"], capsys),
              "cannot change on resume: model.teacher_weights")  # fmt: skip


def test_a_relative_cache_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DALIKD_CACHE", "rel/cache")
    assert cache_dir() == tmp_path / "rel" / "cache"
    monkeypatch.setenv("DALIKD_CACHE", "~/x")
    assert cache_dir() == Path.home() / "x"


def _fake_builds(monkeypatch, tmp_path, results):
    """native.build with _compile replaced: each call takes the next (cpu_error) of
    ``results`` ("" = success); returns the list of compile calls."""
    from dalikd import native
    from dalikd.native import builder

    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_compile(work, key):
        error = results[len(calls)]
        calls.append(key)
        if not error:
            (work / "libdalikd_mix_cpu.so").write_bytes(b"")
        library = None if error else "libdalikd_mix_cpu.so"
        return native.BuildInfo(key, "fake", library, error, None, "n/a", "", "")

    monkeypatch.setattr(builder, "_compile", fake_compile)
    monkeypatch.setattr(builder, "_current_toolchain", lambda: "fake")
    return calls


def test_a_native_build_that_failed_for_a_passing_cause_is_retried(tmp_path, monkeypatch):
    from dalikd import doctor, native
    from dalikd.native import builder

    full = "g++ exited 1: mix_cpu.o: No space left on device"
    calls = _fake_builds(monkeypatch, tmp_path, [full, full, ""])
    info, _ = native.build()
    assert info.cpu_error == full and info.attempts == 1
    assert "retried at the next use (attempt 2 of 3)" in builder.retry_reason(info)
    report = doctor.build_native()  # the reason is in `dalikd doctor`
    assert len(calls) == 2 and report["attempts"] == 2 and "attempt 3 of 3" in report["retry"]
    info, _ = native.build()
    assert len(calls) == 3 and info.cpu_library and builder.retry_reason(info) == ""
    native.build()
    assert len(calls) == 3  # a good build is kept


def test_a_build_failing_for_a_passing_cause_stops_being_retried(tmp_path, monkeypatch):
    from dalikd import native
    from dalikd.native import builder

    calls = _fake_builds(monkeypatch, tmp_path, ["cc1plus: Killed"] * 4 + ["syntax error"] * 2)
    for _ in range(5):
        info, _ = native.build()
    assert len(calls) == 3 and info.attempts == 3  # then kept until the toolchain changes
    assert "failed 3 times" in builder.retry_reason(info)
    monkeypatch.setattr(builder, "_current_toolchain", lambda: "another")
    native.build()
    assert len(calls) == 4


# -- item 11: caches are trusted only when they are the user's own -------------------------------


def test_a_scan_cache_others_can_write_is_not_trusted(tmp_path):
    from dalikd.datacheck import _cache_path, check_files

    root = tmp_path / "d"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    files, cache = [str(root / "a.jpg")], tmp_path / "cache"
    assert check_files(files, root=root, cache_root=cache) == {files[0]: "empty file"}
    cache_file = _cache_path(cache, root, False)
    lie = json.loads(cache_file.read_text())
    lie["verdicts"][files[0]][2] = "\x1b[2Jplanted"
    cache_file.write_text(json.dumps(lie))
    calls: list[int] = []
    for loosen in (lambda: os.chmod(cache / "scans", 0o777), lambda: os.chmod(cache_file, 0o666)):
        cache_file.write_text(json.dumps(lie))
        os.chmod(cache / "scans", 0o700), os.chmod(cache_file, 0o600)
        loosen()
        calls.clear()
        with pytest.warns(RuntimeWarning, match="scan cache not trusted.*writable by others"):
            found = check_files(files, root=root, cache_root=cache,
                                progress=lambda done, total: calls.append(done))  # fmt: skip
        assert found == {files[0]: "empty file"} and calls == [1]  # recomputed
    if os.getuid() == 0:  # a cache file of another user
        os.chmod(cache / "scans", 0o700)
        cache_file.write_text(json.dumps(lie))
        os.chown(cache_file, 65534, 65534)
        with pytest.warns(RuntimeWarning, match="owned by another user"):
            assert check_files(files, root=root, cache_root=cache) == {files[0]: "empty file"}


def test_a_native_library_others_can_write_is_rebuilt(tmp_path, monkeypatch):
    from dalikd import native
    from dalikd.cache import untrusted

    calls = _fake_builds(monkeypatch, tmp_path, ["", "", ""])
    _, folder = native.build()
    native.build()
    assert len(calls) == 1
    os.chmod(folder / "libdalikd_mix_cpu.so", 0o666)  # the folder is private, the file is not
    with pytest.warns(RuntimeWarning, match="native build not trusted.*libdalikd_mix_cpu.so is wr"):
        native.build()
    assert len(calls) == 2 and not untrusted(folder / "libdalikd_mix_cpu.so", folder.parent)
    assert native.is_cached()


def test_caches_and_run_folders_get_explicit_modes_under_umask_000(tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    from dalikd import native
    from dalikd.datacheck import _cache_path, check_files

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(0)
    try:
        root = tmp_path / "d"
        root.mkdir()
        (root / "a.jpg").write_bytes(b"")
        check_files([str(root / "a.jpg")], root=root, cache_root=tmp_path / "c" / "deep")
        cache_file = _cache_path(tmp_path / "c" / "deep", root, False)
        assert [mode(p) for p in (tmp_path / "c", cache_file.parent)] == [0o700, 0o700]
        assert mode(cache_file) == 0o600
        made = rundir.prepare(tmp_path / "runs" / "r1")
        assert [mode(p) for p in made] == [0o755, 0o755]
        with locked(made[0], print):
            assert mode(made[0] / LOCK) == 0o644
        assert mode(rundir.unique(tmp_path / "more" / "r")) == 0o755
        assert mode(tmp_path / "more") == 0o755
        calls = _fake_builds(monkeypatch, tmp_path, ["", ""])
        _, folder = native.build()  # the fake compile writes its library 0666 here
        assert mode(folder) == 0o755 and mode(folder / "libdalikd_mix_cpu.so") == 0o755
        assert mode(folder / "build.json") == 0o644 and mode(folder / "src") == 0o755
        native.build()
        assert len(calls) == 1  # trusted: reused
    finally:
        os.umask(old)


# -- one line instead of an overflow, a NaN run or a misleading message --------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--seed", str(2**64)], f"--seed must be at most {2**32 - 1} (32 bits), got {2**64}"),
        (["--image-size", "100000"], "--image-size must be at most 8192 px, got 100000"),
        (["--threads", str(2**40)], f"--threads must be in [0, 1024], got {2**40}"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--kd-weight", "inf"], "--kd-weight must be a finite number, got inf"),
        (["--gamma", "nan"], "--gamma must be a finite number, got nan"),
        (["--mixed-label-ce", "nan"], "--mixed-label-ce must be a finite number, got nan"),
        (["--crop-scale", "nan,1"], "--crop-scale must be a finite number, got (nan, 1.0)"),
        (["--milestones", "-1,30"], "--milestones must be epochs >= 0, got (-1, 30)"),
        (["--pick-count", "9"], "--pick-count must be at most the pool, --pool-size x "
                                "--batch-size = 2 x 4 = 8, got 9"),
        (["--max-pixels", "-1"], "--max-pixels must be >= 0, got -1"),
    ],
)  # fmt: skip
def test_settings_beyond_their_range_are_one_line(flags, needle, data, tmp_path, capsys,
                                                  tiny_env):  # fmt: skip
    args = [*TRAIN, "--data", data, "--epochs", "1", "--out", tmp_path / "r", *flags]
    _one_line(*run_cli(args, capsys), needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("seed = 9223372036854775807", "seed must be at most 4294967295"),  # TOML's largest
        ("[data]\nimage_size = 100000", "data.image_size must be at most 8192 px"),
        ("[data]\nthreads = 4294967296", "data.threads must be in [0, 1024]"),
        ("[optim]\nlr = nan", "optim.lr must be a finite number, got nan"),
        ("[optim]\ngamma = inf", "optim.gamma must be a finite number, got inf"),
        ("[kd]\nkd_weight = -inf", "kd.kd_weight must be a finite number, got -inf"),
    ],
)
def test_toml_settings_beyond_their_range_are_one_line(toml, needle, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    _one_line(*run_cli(["train", "--config", config], capsys), needle)


def test_plot_of_a_binary_metrics_file_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    _one_line(*run_cli(["plot", tmp_path, "--out", tmp_path / "c.png"], capsys),
              "is not a metrics file (not UTF-8 text)")  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("[1, 2]\n")
    _one_line(*run_cli(["plot", tmp_path, "--out", tmp_path / "c.png"], capsys),
              "is not a metrics file: a line is no JSON object of metrics")  # fmt: skip


def test_a_resume_names_the_file_that_is_missing(run, capsys):
    (run / "config.json").unlink()
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys),
              f"nothing to resume in {run}: no config.json there")  # fmt: skip
    (run / "last.pt").unlink()
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys),
              "no last.pt and no config.json there")  # fmt: skip


def test_a_damaged_checkpoint_gets_no_advice_to_resave_it_for_mmap(run, capsys):
    whole = (run / "last.pt").read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:100], b"\x00" * 64, b"PK\x03\x04junk"):
        (run / "last.pt").write_bytes(damaged)
        code, out, err = run_cli(["train", "--resume", run, "--epochs", "3"], capsys)
        _one_line(code, out, err, "is damaged (truncated or not a checkpoint)")
        assert "mmap" not in err and "torch.save" not in err


def test_a_config_json_edited_to_name_code_is_refused_and_imports_nothing(run, tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    marker = tmp_path / "imported"
    recipe = tmp_path / "evil.py"
    recipe.write_text(f"open({str(marker)!r}, 'w').close()\ndef f(images, labels):\n"
                      "    return images, labels\n")  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    config["kd"]["aug"] = f"{recipe}:f"
    (run / "config.json").write_text(json.dumps(config))
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys),
              "names other code than", f"kd.aug 'none' -> '{recipe}:f'",
              "a resume imports nothing the run was not started with")  # fmt: skip
    assert not marker.exists()
    config["kd"]["aug"] = "none"
    config["model"]["student"] = "evil:f"
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.syspath_prepend(str(tmp_path))
    _one_line(*run_cli(["train", "--resume", run, "--epochs", "3"], capsys),
              "model.student 'tiny_models:tiny_cnn' -> 'evil:f'")  # fmt: skip
    assert not marker.exists()


RECIPES = """
from nvidia.dali import fn
from dalikd.recipes import View


def varying(images, ctx):
    size = fn.random.uniform(range=[8.0, 16.0], shape=[2])
    return View(images=fn.resize(images, size=size))


def raises(images, ctx):
    scale = {"a": 1}["b"]
    return View(images=images)


def _helper(x):
    return x / 0


def raises_deeper(images, ctx):
    return View(images=images * _helper(1))
"""


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("varying", "recipe varying returns images whose size varies from sample to sample"),
        ("raises", "recipe raises raised KeyError: 'b' ({file}, line 12, in raises)"),
        ("raises_deeper", "recipe raises_deeper raised ZeroDivisionError: division by zero "
                          "({file}, line 17, in _helper)"),
    ],
)  # fmt: skip
def test_a_recipe_that_raises_or_varies_in_size_is_its_own_line(name, needle, data, tmp_path,
                                                                capsys, tiny_env):  # fmt: skip
    recipes = tmp_path / "my_recipes.py"
    recipes.write_text(RECIPES)
    args = [*TRAIN, "--data", data, "--epochs", "1", "--out", tmp_path / "r",
            "--aug", f"{recipes}:{name}", "--mixed-label-ce", "1"]  # fmt: skip
    _one_line(*run_cli(args, capsys), needle.format(file=recipes))


def test_a_resume_removes_the_temporary_files_a_killed_checkpoint_left(run, capsys, tiny_env):
    # a SIGKILL while last.pt is written leaves .last.pt.PID.RANDOM.tmp (a partial checkpoint,
    # as large as one); every later resume kept it (issue 24 re-test)
    left = [run / ".last.pt.4242.0123abcd.tmp", run / ".metrics.jsonl.77.deadbeef.tmp"]
    for path in left:
        path.write_bytes(b"\0" * 1000)
    other = run / ".notes.txt.4242.0123abcd.tmp"  # not a run's file: not ours to remove
    other.write_bytes(b"")
    code, out, err = run_cli(["train", "--resume", run, "--epochs", 3], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in left) and other.exists()
    assert f"{run}: removed 2 temporary file(s) a stopped run left" in out + err


def test_a_stop_during_the_last_validation_ends_a_complete_run(data, tmp_path, capsys,
                                                               tiny_env):  # fmt: skip
    # SIGTERM while the last epoch validates: the run finishes its epoch and is complete; it
    # said "stopped ... continue with --resume" and exited 143, and that resume was refused
    # ("is complete"): a requeueing scheduler got a failed job (issue 24 re-test)
    run = tmp_path / "run"
    args = [*TRAIN, "--data", data, "--epochs", 2, "--out", run]
    args[args.index("tiny_models:tiny_cnn")] = "tiny_models:stopping_in_val_cnn"
    code, out, err = run_cli(args, capsys)
    assert code == 128 + 10, err  # SIGUSR1 in epoch 1's validation: a stop
    assert "stopped by SIGUSR1 at epoch 2, step 0" in err
    code, out, err = run_cli(["train", "--resume", run], capsys)  # stopped again, at epoch 2
    assert code == 0 and "stopped by" not in err, err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_a_run_whose_lock_was_taken_over_writes_nothing_more(data, tmp_path, capsys, tiny_env,
                                                             monkeypatch):  # fmt: skip
    # a node cut off for 5 heartbeats is taken for lost and its run requeued elsewhere; when it
    # comes back it must not go on writing checkpoints into the folder the new run now owns
    from dalikd import recovery

    run, share, calls = tmp_path / "run", recovery.RunFailures.share, []

    def taken_over(self, *args):  # the first checkpoint: meanwhile another host takes the lock
        calls.append(1)
        if len(calls) == 1:
            (run / LOCK).write_text("4242 othernode boot=x start=1 heartbeat=60\n")
        return share(self, *args)

    monkeypatch.setattr(recovery.RunFailures, "share", taken_over)
    code, out, err = run_cli([*TRAIN, "--data", data, "--epochs", 1, "--ckpt-every", 1,
                              "--out", run], capsys)  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{run} was taken over by process 4242 on othernode" in err
    assert torch.load(run / "last.pt", weights_only=True)["scheduler"]["step"] == 1
    assert (run / LOCK).read_text().startswith("4242 othernode")  # the new owner's, kept

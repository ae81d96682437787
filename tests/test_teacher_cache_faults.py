"""The teacher cache under faults (issue 24, items 6 and 7): damaged chunks are misses, never
hits; FIFOs never hang; files others could write are not read; a read-only cache is read, a
full disk stops the writing and not the run; key.json holding something else is one line."""

import errno
import os
import signal
import struct
import warnings
from pathlib import Path

import pytest
import torch
from test_teacher_cache import _key, _record_steps
from test_teacher_cache_train import SMALL, TINY, _records
from tests_helpers import run_cli
from tiny_models import tiny_cnn

from dalikd import teacher_cache as tc
from dalikd.teacher_cache import files

CHUNK = "train/e0000/r0/c0000000-0000003.pt"


def _filled(root: Path) -> dict:
    cache = tc.TeacherCache(root, _key())
    made = _record_steps(cache, 0, range(3))
    cache.flush()
    return made


def _patch_float(path: Path, value: float, new: bytes) -> None:
    """Overwrite the stored float32 ``value`` in the file's bytes with ``new`` (4 bytes)."""
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<f", value))
    assert at > 0
    data[at : at + 4] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["exponent bit", "nan"])
def test_a_flipped_bit_or_a_nan_in_a_chunk_is_a_miss_never_a_hit(tmp_path, damage):
    root = tmp_path / "c"
    made = _filled(root)
    value = float(made[1][0][0, 0])
    raw = bytearray(struct.pack("<f", value))
    if damage == "exponent bit":
        raw[3] ^= 0x40  # the exponent's top bit: 1.3 becomes ~4e38 (issue 24: 9e36)
    else:
        raw = bytearray(struct.pack("<f", float("nan")))
    _patch_float(root / CHUNK, value, bytes(raw))
    messages = []
    reader = tc.TeacherCache(root, _key(), message=messages.append)
    assert [reader.lookup(0, s) for s in range(3)] == [None] * 3
    assert messages == [f"teacher cache: {root / CHUNK} is damaged (its checksum does not "
                        "match); recomputing its steps"]  # fmt: skip


def test_a_chunk_that_checks_out_but_holds_a_nan_is_a_miss(tmp_path):
    # a NaN written by the teacher itself (its checksum is right): still never a hit
    root = tmp_path / "c"
    made = _filled(root)
    chunk, _ = files.read_file(root / CHUNK, root)
    chunk["logits"][1, 0, 0] = float("nan")
    (root / CHUNK).unlink()
    files.write_file(root, root / CHUNK, {k: v for k, v in chunk.items() if k != "checksum"})
    messages = []
    reader = tc.TeacherCache(root, _key(), message=messages.append)
    assert reader.lookup(0, 1) is None and "holds non-finite teacher outputs" in messages[0]
    reader.record(0, 1, *made[1])  # the run recomputes: rewritten, read again
    reader.flush()
    assert tc.TeacherCache(root, _key()).lookup(0, 1) is not None


def test_a_fifo_where_a_chunk_should_be_is_a_miss_not_a_hang(tmp_path):
    root = tmp_path / "c"
    _filled(root)
    (root / CHUNK).unlink()
    os.mkfifo(root / CHUNK)
    messages = []

    def hung(*_):
        raise TimeoutError("reading the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, hung)  # a hang fails the test, not the suite
    signal.alarm(20)
    try:
        reader = tc.TeacherCache(root, _key(), message=messages.append)
        assert reader.lookup(0, 0) is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert messages == [f"teacher cache: {root / CHUNK} is not a regular file; recomputing its "
                        "steps"]  # fmt: skip


@pytest.mark.parametrize("how", ["writable by others", "a link"])
def test_a_chunk_others_could_have_written_is_not_read(tmp_path, how):
    root = tmp_path / "c"
    _filled(root)
    if how == "writable by others":
        os.chmod(root / CHUNK, 0o666)
    else:
        (root / CHUNK).rename(tmp_path / "elsewhere.pt")
        (root / CHUNK).symlink_to(tmp_path / "elsewhere.pt")
    messages = []
    assert tc.TeacherCache(root, _key(), message=messages.append).lookup(0, 0) is None
    assert len(messages) == 1 and "is not trusted" in messages[0]


def test_cache_files_and_folders_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        root = tmp_path / "c"
        _filled(root)
    finally:
        os.umask(old)
    modes = {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in root.rglob("*")}
    assert modes == {"key.json": 0o600, "train": 0o700, "train/e0000": 0o700,
                     "train/e0000/r0": 0o700, CHUNK: 0o600}  # fmt: skip


def test_a_full_disk_stops_the_writing_with_one_line_and_leaves_no_temporary_file(
    tmp_path, monkeypatch
):
    root = tmp_path / "c"
    tc.TeacherCache(root, _key())  # key.json written
    real = files.write_atomic

    def full(path, write, mode):  # the chunk's bytes start to go out, then the disk is full
        def partial(f):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")

        real(path, partial, mode)

    monkeypatch.setattr(files, "write_atomic", full)
    messages = []
    cache = tc.TeacherCache(root, _key(), message=messages.append)
    _record_steps(cache, 0, range(3))
    cache.flush()  # no exception: the run goes on
    _record_steps(cache, 0, range(3, 6))
    cache.flush()
    assert messages == [f"teacher cache {root}: cannot write {root / CHUNK}: disk full; the run "
                        "goes on without caching"]  # fmt: skip
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["key.json"]  # no .tmp


def _read_only(monkeypatch, root: Path) -> None:
    """Every write under ``root`` fails as on a read-only file system (root ignores modes)."""
    real_open, real_mkdir = os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def refuse(path):
        if str(path).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def open_(path, flags, *args, **kw):
        if flags & writing:
            refuse(path)
        return real_open(path, flags, *args, **kw)

    def mkdir(path, *args, **kw):
        refuse(path)
        return real_mkdir(path, *args, **kw)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


def _train_args(data, teacher, out, cache, *extra):
    return ["train", "--data", data, "--student", TINY, "--teacher", TINY, "--teacher-weights",
            teacher, "--aug", "flip", "--epochs", 1, "--out", out, "--teacher-cache", cache,
            *SMALL, *extra]  # fmt: skip


@pytest.fixture
def teacher3(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), path)
    return path


def test_a_read_only_cache_is_read_and_not_written(solid_dataset, tmp_path, teacher3, capsys,
                                                   monkeypatch, tiny_env):  # fmt: skip
    cache = tmp_path / "cache"
    code, _, err = run_cli(_train_args(solid_dataset, teacher3, tmp_path / "a", cache), capsys)
    assert code == 0, err
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    _read_only(monkeypatch, cache)
    # epoch 1 is cached, epoch 2 is not: its steps are computed, its checkpoints saved
    code, out, err = run_cli(_train_args(solid_dataset, teacher3, tmp_path / "b", cache,
                                         "--epochs", 2, "--ckpt-every", 2), capsys)  # fmt: skip
    assert code == 0 and "Traceback" not in out + err, err
    assert (
        out.count(
            f"teacher cache {cache} cannot be written (read-only file system): the "
            "steps it holds are read, the others computed and not saved"
        )
        == 1
    )
    record = _records(tmp_path / "b")[-1]
    assert (record["cache_hits"], record["cache_misses"]) == (6, 6)
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before
    # a new cache on a read-only path: one line, the run goes on without one
    fresh = tmp_path / "ro" / "cache"
    _read_only(monkeypatch, tmp_path / "ro")
    code, out, err = run_cli(_train_args(solid_dataset, teacher3, tmp_path / "c", fresh), capsys)
    assert code == 0, err
    assert f"teacher cache {fresh}: cannot be made (read-only file system); not used" in out


def test_a_full_disk_mid_run_keeps_the_run_going(solid_dataset, tmp_path, teacher3, capsys,
                                                 monkeypatch, tiny_env):  # fmt: skip
    cache = tmp_path / "cache"
    real = files.write_atomic

    def full(path, write, mode):  # the disk fills after key.json: every chunk write fails
        def partial(f):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")

        chunk = "train" in Path(path).relative_to(cache).parts
        real(path, partial if chunk else write, mode)

    monkeypatch.setattr(files, "write_atomic", full)
    code, out, err = run_cli(_train_args(solid_dataset, teacher3, tmp_path / "a", cache,
                                         "--epochs", 2, "--ckpt-every", 2), capsys)  # fmt: skip
    assert code == 0 and "Traceback" not in out + err, err
    assert out.count("disk full; the run goes on without caching") == 1
    assert [r["epoch"] for r in _records(tmp_path / "a")] == [1, 2]
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["key.json"]  # no .tmp


@pytest.mark.parametrize("text", ["[]", "null", '"key"', "\xff"])
def test_a_key_json_that_is_not_a_key_is_one_line(solid_dataset, tmp_path, teacher3, capsys,
                                                  tiny_env, text):  # fmt: skip
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "key.json").write_bytes(text.encode("latin-1"))
    for args in (_train_args(solid_dataset, teacher3, tmp_path / "a", cache),
                 ["cache-info", cache]):  # fmt: skip
        code, out, err = run_cli(args, capsys)
        assert code == 1 and "Traceback" not in out + err, err
        assert len(err.strip().splitlines()) == 1 and "key.json" in err, err


def test_remove_the_reported_file_and_resume_keeps_the_cache(tmp_path, capsys, tiny_env):
    # "remove the file and --resume" (issue 24 item 1) with --teacher-cache: the run's listing
    # keeps the removed files (train/ and val/), and so does the cache's key (their sizes from
    # the checkpoint)
    from conftest import make_dataset
    from test_robustness import corrupt_sof

    root = make_dataset(tmp_path / "d", classes=("a", "b", "c"), n_train=5, n_val=2)
    bad, val_bad = root / "train/b/bad.jpg", root / "val/a/bad.jpg"
    bad.write_bytes(corrupt_sof())
    val_bad.write_bytes(corrupt_sof())
    teacher = tmp_path / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    run, cache = tmp_path / "run", tmp_path / "cache"
    code, _, err = run_cli(_train_args(root, teacher, run, cache), capsys)
    assert code == 0, err
    report = (run / "data_report.tsv").read_text()
    assert f"{bad}\tfailed in training" in report and f"{val_bad}\tfailed in validation" in report
    key = (cache / "key.json").read_text()
    bad.unlink()
    val_bad.unlink()
    code, out, err = run_cli(["train", "--resume", run, "--epochs", 2], capsys)
    assert code == 0, err  # was: "holds another run's teacher outputs (data_listing ...)"
    assert _records(run)[-1]["cache_misses"] > 0
    assert (cache / "key.json").read_text() == key
    assert (cache / "train" / "e0001").is_dir()  # epoch 2 was written to the same cache


def test_under_torchrun_counts_are_every_ranks_and_rank_1_names_its_damage(tmp_path, teacher3):
    # a chunk damaged on rank 1 was a miss there, but the epoch's line and metrics.jsonl said
    # rank 0's counts only ("5 hit / 0 miss") and no note: the counts are summed over the ranks,
    # and rank 1 says the note on its own chunk
    from conftest import make_dataset
    from test_recovery_faults import _torchrun

    root = make_dataset(tmp_path / "d", classes=("a", "b", "c"), n_train=8, n_val=2)  # 3 steps
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = _torchrun(_train_args(root, teacher3, run, cache))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (_records(run)[-1]["cache_hits"], _records(run)[-1]["cache_misses"]) == (0, 2 * 3)
    # rank 1's chunk damaged: a miss there, said by rank 1 itself (rank 0 prints the rest)
    chunk = next((cache / "train/e0000/r1").iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    proc = _torchrun(_train_args(root, teacher3, tmp_path / "run2", cache))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"warning: dalikd: rank 1: teacher cache: {chunk} is" in proc.stderr, proc.stderr
    record = _records(tmp_path / "run2")[-1]
    assert (record["cache_hits"], record["cache_misses"]) == (3, 3)


def test_temporary_files_of_killed_writers_are_removed_once_stale(tmp_path):
    # a SIGKILL while a chunk is written leaves .NAME.PID.RANDOM.tmp (as large as the chunk):
    # nothing removed them, run after run; a fresh one may be another run's write in progress
    root = tmp_path / "c"
    _filled(root)
    folder = (root / CHUNK).parent
    old = [folder / ".c0000003-0000005.pt.4242.0123abcd.tmp", root / ".key.json.77.deadbeef.tmp"]
    fresh = folder / ".c0000005-0000007.pt.4243.0123abcd.tmp"
    for path in [*old, fresh]:
        path.write_bytes(b"\0" * 100)
    for path in old:
        os.utime(path, (1e9, 1e9))
    messages = []
    tc.TeacherCache(root, _key(), message=messages.append)
    assert not any(p.exists() for p in old) and fresh.exists()
    assert messages == [f"teacher cache {root}: removed 2 temporary file(s) that stopped runs "
                        "left"]  # fmt: skip


def test_rank_notes_tell_a_ranks_own_files_by_their_path_inside_the_cache(tmp_path):
    # a cache under a folder named r1: rank 1 repeated rank 0's notes on the whole cache
    from dalikd.teacher_cache.source import rank_notes

    root = tmp_path / "r1" / "cache"
    whole = f"teacher cache {root} cannot be written (read-only file system): the steps ..."
    own = f"teacher cache: {root / 'train/e0000/r1/c0000000-0000003.pt'} is damaged"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        rank_notes(1, root)(whole)
        rank_notes(1, root)(own)
        rank_notes(1, root)(f"teacher cache: {root / 'val/r1.pt'} is damaged; recomputing it")
        rank_notes(2, root)(own)
    assert [str(w.message) for w in said] == [
        f"dalikd: rank 1: {own}",
        f"dalikd: rank 1: teacher cache: {root / 'val/r1.pt'} is damaged; recomputing it",
    ]

"""dalikd.atomic: the one atomic-write helper. Temporary files are created exclusively under
names nobody planted (no link is ever followed), with an explicit mode; a failure leaves the
previous file and no temporary one, and says "disk full" / "read-only file system"."""

import errno
import json
import os
import stat

import pytest
import torch
from tests_helpers import run_cli

from dalikd import atomic
from dalikd.checkpoint import save_atomic
from dalikd.errors import DalikdError

PLANTED = ("last.pt.tmp", "config.json.tmp", "metrics.jsonl.tmp")


def _plant(folder, victim_dir):
    """A symlink at each plausible temporary name, pointing at a file outside ``folder``."""
    victims = {}
    for name in PLANTED:
        victim = victim_dir / f"victim-{name}"
        victim.write_text("keep me")
        (folder / name).symlink_to(victim)
        victims[name] = victim
    return victims


def test_planted_links_at_temp_names_are_never_followed(tmp_path):
    folder, outside = tmp_path / "run", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    victims = _plant(folder, outside)
    save_atomic({"w": torch.ones(3)}, folder / "last.pt")
    atomic.write_text_atomic("{}\n", folder / "config.json")
    atomic.write_jsonl_atomic([{"epoch": 1}], folder / "metrics.jsonl")
    for name, victim in victims.items():
        assert victim.read_text() == "keep me", name
        assert (folder / name).is_symlink()  # left as it was, not replaced or removed
    assert torch.equal(torch.load(folder / "last.pt", weights_only=True)["w"], torch.ones(3))
    assert json.loads((folder / "metrics.jsonl").read_text()) == {"epoch": 1}
    assert not (folder / "last.pt").is_symlink()


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "config.json").symlink_to(victim)
    atomic.write_text_atomic("new\n", tmp_path / "config.json")
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "config.json").is_symlink()
    assert (tmp_path / "config.json").read_text() == "new\n"


def test_the_temp_name_is_created_exclusively(tmp_path, monkeypatch):
    """Every name the helper tries is opened with O_EXCL | O_NOFOLLOW, and one already taken
    (here: a link planted at exactly the first name it draws) makes it draw another."""
    draws = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(draws))
    first = tmp_path / f".out.bin.{os.getpid()}.aaaaaaaa.tmp"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    first.symlink_to(victim)
    opened = []
    real_open = os.open

    def spy(path, flags, mode=0o777, **kw):
        opened.append((str(path), flags))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(atomic.os, "open", spy)
    atomic.write_bytes_atomic(b"data", tmp_path / "out.bin")
    temps = [(p, f) for p, f in opened if p.endswith(".tmp")]
    assert [p for p, _ in temps] == [str(first), str(first).replace("aaaaaaaa", "bbbbbbbb")]
    assert all(f & os.O_EXCL and f & os.O_NOFOLLOW and f & os.O_CREAT for _, f in temps)
    assert victim.read_text() == "keep me" and (tmp_path / "out.bin").read_bytes() == b"data"


def test_the_mode_is_0644_whatever_a_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        atomic.write_text_atomic("x", tmp_path / "loose")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "loose").stat().st_mode) == 0o644
    old = os.umask(0o077)  # a stricter umask narrows it
    try:
        atomic.write_text_atomic("x", tmp_path / "strict")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "strict").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("code", "said"),
    [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system"),
     (errno.EDQUOT, "disk quota exceeded")],
)  # fmt: skip
def test_a_failed_write_names_the_disk_and_leaves_nothing(tmp_path, code, said):
    target = tmp_path / "last.pt"
    save_atomic({"a": 1}, target)

    def write(f):  # some bytes get through, then the disk fails
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(DalikdError) as e:
        atomic.write_atomic(target, write)
    assert str(e.value) == f"cannot write {target}: {said}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(target, weights_only=True) == {"a": 1}


def test_torch_save_on_a_full_disk_says_disk_full_not_unexpected_pos(tmp_path, monkeypatch):
    """torch.save turns the OSError of its file object into a RuntimeError ("unexpected pos");
    the helper reports the OSError it recorded."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(DalikdError, match="disk full$"):
        save_atomic({"w": torch.zeros(1000)}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_run_in_a_folder_of_planted_links_leaves_their_targets_alone(
    solid_dataset, tmp_path, tiny_env, capsys
):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    victims = _plant(run, outside)  # a folder of *.tmp only: a killed run's leftovers
    code, _, err = run_cli(
        ["train", "--data", solid_dataset, "--student", "tiny_models:tiny_cnn", "--epochs", 1,
         "--image-size", 16, "--batch-size", 4, "--threads", 1, "--device", "cpu",
         "--out", run], capsys)  # fmt: skip
    assert code == 0, err
    assert all(v.read_text() == "keep me" for v in victims.values())
    assert (run / "last.pt").is_file() and not (run / "last.pt").is_symlink()

"""`dalikd data shard` and check-data for shard sets (no DALI): exact contents, the manifest,
atomic and resumable writing, one-line errors."""

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import run_cli

from dalikd import shards, shardwrite
from dalikd.errors import DalikdError
from dalikd.manifest import Manifest, SplitInfo, read_manifest, write_manifest
from dalikd.shardcheck import check_shard_set
from dalikd.shards import parse_size, shard_split
from dalikd.shardwrite import shard_dataset

CLASSES = ("ant", "bee", "cat")


def make_source(root: Path, n_train=(5, 4, 6), n_val=(2, 2, 1)) -> Path:
    """Distinct noise images (JPEG, some PNG) of varying size, and one empty file."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", n_train), ("val", n_val)):
        for name, n in zip(CLASSES, counts, strict=True):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((12 + i, 16, 3)) * 255).astype(np.uint8)
                ext, fmt = (".png", "PNG") if i % 3 == 2 else (".JPEG", "JPEG")
                Image.fromarray(pixels).save(root / split / name / f"{name}{i}{ext}", format=fmt)
    (root / "train" / "bee" / "empty.JPEG").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src"))


def source_samples(root: Path, split: str) -> Counter:
    """(image bytes, label) of every usable file of the split."""
    found = Counter()
    for label, name in enumerate(CLASSES):
        for path in (root / split / name).iterdir():
            if path.stat().st_size:
                found[(path.read_bytes(), label)] += 1
    return found


def read_split(out: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of every sample of the split's shards, in shard order."""
    samples = []
    manifest = read_manifest(out)
    for shard in manifest.splits[split].shards:
        with tarfile.open(out / shard.name) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def test_shards_hold_every_image_and_label_once(source, tmp_path):
    out = tmp_path / "out"
    result = shard_dataset(source, out, shard_size=8 << 10, seed=3)
    assert result.skipped == ((str(source / "train" / "bee" / "empty.JPEG"), "empty file"),)
    manifest = read_manifest(out)
    assert manifest.layout == "shards" and manifest.codec == "encoded"
    assert manifest.classes == CLASSES and manifest.name == source.name
    for split, per_class in (("train", (5, 4, 6)), ("val", (2, 2, 1))):
        samples = read_split(out, split)
        got = Counter()
        for number, (key, members) in enumerate(samples):
            assert key == f"{number:09d}"
            image_ext = (set(members) - {"cls", "dalikd"}).pop()
            assert set(members) == {image_ext, "cls", "dalikd"}
            label = int(members["cls"])
            assert np.frombuffer(members["dalikd"], "<i4").tolist() == [label, number]
            assert image_ext == ("png" if members[image_ext][:4] == b"\x89PNG" else "jpg")
            got[(members[image_ext], label)] += 1
        assert got == source_samples(source, split)  # each image once, with its label
        info = manifest.splits[split]
        assert info.samples == sum(per_class) and info.per_class == per_class
        assert len(info.shards) > 1 and sum(s.samples for s in info.shards) == info.samples
        for shard in info.shards:
            data = (out / shard.name).read_bytes()
            assert shard.bytes == len(data) <= 8 << 10 or shard.samples == 1
            assert shard.sha256 == hashlib.sha256(data).hexdigest()
            assert (out / shards.index_name(shard.name)).is_file()
    assert manifest.source["seed"] == 3 and manifest.source["left_out"] == 1
    assert manifest.source["train_listing"]["train_files"] == 15
    assert sorted(os.listdir(out)) == sorted(
        ["dataset.json"] + [n for s in manifest.splits.values() for sh in s.shards
                            for n in (sh.name, shards.index_name(sh.name))]
    )  # fmt: skip


def test_the_one_shuffle_follows_the_seed(source, tmp_path):
    def order(out, seed):
        shard_dataset(source, out, shard_size=1 << 20, seed=seed, splits=("train",))
        return [m[(set(m) - {"cls", "dalikd"}).pop()] for _, m in read_split(out, "train")]

    a, b, c = order(tmp_path / "a", 1), order(tmp_path / "b", 1), order(tmp_path / "c", 2)
    assert a == b and a != c and sorted(a) == sorted(c)
    assert (tmp_path / "a" / "train-00000.tar").read_bytes() == (
        tmp_path / "b" / "train-00000.tar"
    ).read_bytes()  # the same input, the same bytes: a rerun can verify by checksum
    assert "val" not in read_manifest(tmp_path / "a").splits


def test_index_files_are_what_the_shard_gives(source, tmp_path):
    """Offsets in the index are those of the members in the tar (DALI's wds2idx writes the same
    file: tests/test_shards_dali.py)."""
    shard_dataset(source, tmp_path / "out", shard_size=8 << 10)
    for idx in sorted((tmp_path / "out").glob("*.idx")):
        lines = idx.read_text().splitlines()
        data = idx.with_suffix(".tar").read_bytes()
        assert lines[0] == f"v1.2 {len(lines) - 1}"
        for line in lines[1:]:
            fields = line.split()
            for ext, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
                header = data[int(offset) - 512 : int(offset)]
                assert header[:100].rstrip(b"\0").decode() == name and name.endswith("." + ext)
                assert int(header[124:136].rstrip(b"\0 "), 8) == int(size)


class Killed(BaseException):
    pass


def kill_after(monkeypatch, shards_done: int):
    """Make the writer die inside shard number ``shards_done`` (0-based), mid-shard."""
    real = shardwrite._write_shard
    calls = []

    def write(out, name, items, first, on_sample):
        calls.append(name)
        if len(calls) > shards_done:

            def die():
                raise Killed

            return real(out, name, items, first, lambda k: die())
        return real(out, name, items, first, on_sample)

    monkeypatch.setattr(shardwrite, "_write_shard", write)


def test_a_killed_run_leaves_no_manifest_and_a_rerun_keeps_finished_shards(
    source, tmp_path, monkeypatch
):
    clean = tmp_path / "clean"
    shard_dataset(source, clean, shard_size=8 << 10)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(Killed):
            shard_dataset(source, out, shard_size=8 << 10)
    left = sorted(os.listdir(out))
    assert "dataset.json" not in left and not [n for n in left if n.endswith(".tmp")]
    assert left == [".dalikd-shard.json", "train-00000.idx", "train-00000.tar",
                    "train-00001.idx", "train-00001.tar"]  # fmt: skip
    (out / ".train-00002.tar.tmp").write_bytes(b"a kill -9 leaves this")
    events: list = []
    result = shard_dataset(source, out, shard_size=8 << 10, note=events.append,
                           progress=lambda *call: events.append(call))  # fmt: skip
    assert result.reused == ("train-00000.tar", "train-00001.tar") and not result.restarted
    said = "continuing a killed run: checking the 2 shard(s) it finished, writing the rest"
    assert events.index(said) < events.index(("writing shards", 0, 20))  # said before, not after
    assert "train-00000.tar" not in result.written and "train-00002.tar" in result.written
    assert read_manifest(out) == read_manifest(clean)  # same shards, same checksums
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))


def test_a_kill_9_leaves_temporary_files_a_rerun_recognises(source, tmp_path, monkeypatch):
    # every file is written through dalikd.atomic (.NAME.PID.RANDOM.tmp): what a kill -9 leaves
    # mid-write (a shard, its index, the journal, the manifest) is a killed run's, not foreign
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        kill_after(m, 1)
        with pytest.raises(Killed):
            shard_dataset(source, out, shard_size=8 << 10)
    for name in (
        ".train-00001.tar.4242.0123abcd.tmp",
        ".train-00001.idx.4242.0123abcd.tmp",
        "..dalikd-shard.json.4242.0123abcd.tmp",
        ".dataset.json.4242.0123abcd.tmp",
    ):
        (out / name).write_bytes(b"a kill -9 leaves this")
    result = shard_dataset(source, out, shard_size=8 << 10)
    assert result.reused == ("train-00000.tar",) and not result.restarted
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_link_planted_where_a_shard_is_written_is_never_followed(source, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.write_bytes(b"precious")
    real = shardwrite._write_shard

    def plant_then_write(out_, name, items, first, on_sample):
        (out_ / f".{name}.tmp").symlink_to(victim)  # the name the old writer used
        return real(out_, name, items, first, on_sample)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(shardwrite, "_write_shard", plant_then_write)
        shard_dataset(source, out, shard_size=1 << 20)
    assert victim.read_bytes() == b"precious"
    assert not check_shard_set(out).problems


def test_a_rerun_rewrites_a_finished_shard_whose_checksum_fails(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(Killed):
            shard_dataset(source, out, shard_size=8 << 10)
    data = bytearray((out / "train-00001.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "train-00001.tar").write_bytes(bytes(data))
    result = shard_dataset(source, out, shard_size=8 << 10)
    assert result.reused == ("train-00000.tar",) and "train-00001.tar" in result.written
    assert not check_shard_set(out).problems


def test_other_settings_restart_a_killed_run(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        kill_after(m, 1)
        with pytest.raises(Killed):
            shard_dataset(source, out, shard_size=8 << 10, seed=1)
    events: list = []
    result = shard_dataset(source, out, shard_size=8 << 10, seed=2, note=events.append,
                           progress=lambda *call: events.append(call))  # fmt: skip
    assert result.restarted and not result.reused
    said = "a killed run of other files or settings was found and discarded: writing every shard"
    assert events.index(said + " again") < events.index(("writing shards", 0, 20))
    assert not check_shard_set(out).problems


def test_the_output_folder_must_be_new_empty_or_a_killed_run(source, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DalikdError, match="is not empty and is no killed"):
        shard_dataset(source, foreign)
    assert os.listdir(foreign) == ["notes.txt"]
    other = tmp_path / "other"  # a WebDataset folder of another tool: never overwritten
    other.mkdir()
    (other / "train-00000.tar").write_bytes(b"theirs")
    with pytest.raises(DalikdError, match="is not empty"):
        shard_dataset(source, other)
    done = tmp_path / "done"
    shard_dataset(source, done)
    with pytest.raises(DalikdError, match="already holds a dataset"):
        shard_dataset(source, done)
    with pytest.raises(DalikdError, match="inside the dataset's train/ folder"):
        shard_dataset(source, source / "train" / "shards")
    with pytest.raises(DalikdError, match="is a shard set already"):
        shard_dataset(done, tmp_path / "again")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert shard_dataset(source, empty).written


def test_a_full_disk_is_one_line_and_leaves_no_partial_shard(source, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shardwrite.os, "fsync", full)
    out = tmp_path / "out"
    with pytest.raises(DalikdError, match="cannot write .*(disk full|No space left on device)"):
        shard_dataset(source, out)
    assert not [n for n in os.listdir(out) if n.endswith((".tar", ".tmp", ".json")) and
                not n.startswith(".dalikd")]  # fmt: skip


def test_an_imported_folder_keeps_its_class_names_and_data_defaults(tmp_path):
    root = make_source(tmp_path / "src", (1, 1, 1), (1, 1, 1))
    named = Manifest("tiny", "folder", "encoded", ("an ant", "a bee", "a cat"),
                     {"train": SplitInfo(4, (1, 2, 1)), "val": SplitInfo(3, (1, 1, 1))},
                     data_defaults={"image_size": 32})  # fmt: skip
    write_manifest(named, root)
    shard_dataset(root, tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest.name == "tiny" and manifest.classes == named.classes
    assert manifest.data_defaults == {"image_size": 32}
    write_manifest(Manifest("raw", "folder", "raw", CLASSES, {}, (4, 4, 3)), root)
    with pytest.raises(DalikdError, match="holds raw pixels"):
        shard_dataset(root, tmp_path / "out2")


def test_shard_split_finds_samples_and_stops_at_a_truncated_shard(source, tmp_path):
    out = tmp_path / "out"
    shard_dataset(source, out, shard_size=8 << 10)
    split = shard_split(out, "train")
    assert split.samples == 15 and split.classes == CLASSES
    assert split.tar_paths() == [str(out / s.name) for s in split.shards]
    for key, members in read_split(out, "train"):
        name, found = split.locate(int(key))
        assert found == key
        assert split.image(int(key)) == next(v for k, v in members.items() if k in ("jpg", "png"))
        with tarfile.open(out / name) as tar:
            assert f"{key}.cls" in tar.getnames()
    with pytest.raises(DalikdError, match="no sample number 15"):
        split.locate(15)
    with pytest.raises(DalikdError, match="no sample number -1"):
        split.image(-1)
    with open(out / split.shards[1].name, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DalikdError, match=r"train-00001.tar is truncated: 1,000 bytes"):
        shard_split(out, "train")
    with pytest.raises(DalikdError, match="holds no shard set"):
        shard_split(source, "train")


def test_a_stale_index_file_is_one_line_before_dali_reads_through_it(shard_set, tmp_path):
    split = shard_split(shard_set, "train")
    assert [s.samples for s in split.shards[:2]] == [2, 2]
    fine = split.subset([3, 0], tmp_path / "ok")  # the index files are checked as they are read
    assert fine.index_paths()[0].endswith("train-00001.idx")
    idx = shard_set / "train-00001.idx"
    idx.write_bytes((shard_set / "train-00000.idx").read_bytes())  # same count, other samples
    stale = r"train-00001.idx is stale or damaged \(it does not list sample 00000000[23]\)"
    with pytest.raises(DalikdError, match=stale + ".*dalikd check-data"):
        split.subset([0, 3], tmp_path / "sub")
    with pytest.raises(DalikdError, match=stale):
        split.image(2)
    idx.write_text("v1.2 5\n")  # another count
    with pytest.raises(DalikdError, match="train-00001.idx is stale .*header"):
        split.subset([2], tmp_path / "sub2")
    split.subset([0, 1], tmp_path / "sub3")  # the other shards' are still read


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("500MB", 500_000_000), ("2G", 2 << 30),
     ("64k", 64 << 10), ("1.5KiB", 1536), ("4096", 4096), ("10 MB", 10_000_000)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "1 GiBs", "-1MB", "0", "1iB", "1i"])
def test_parse_size_refuses(text):
    with pytest.raises(DalikdError):
        parse_size(text)


# -- check-data ---------------------------------------------------------------------------------


@pytest.fixture
def shard_set(source, tmp_path) -> Path:
    out = tmp_path / "set"
    shard_dataset(source, out, shard_size=8 << 10)
    return out


def test_check_data_passes_a_good_set(shard_set, capsys):
    code, out, err = run_cli(["check-data", shard_set, "--decode"], capsys)
    assert code is None or code == 0, err
    assert "shard set ok" in out and "15 train, 5 val samples" in out and "decoded" in out


def test_check_data_takes_a_glob_of_the_shards_as_their_whole_set(shard_set, capsys):
    code, out, err = run_cli(["check-data", shard_set / "train-0000[01].tar"], capsys)
    assert code is None or code == 0, err
    assert f"checking the whole shard set {shard_set}" in out
    assert "shard set ok" in out and "15 train, 5 val samples" in out
    data = bytearray((shard_set / "val-00000.tar").read_bytes())
    data[600] ^= 1
    (shard_set / "val-00000.tar").write_bytes(bytes(data))
    code, out, err = run_cli(["check-data", shard_set / "train-*.tar"], capsys)
    _one_line_error(code, out, err, "val-00000.tar: sha256 differs")


def _one_line_error(code, out, err, *pieces):
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), (out, err)
    for piece in pieces:
        assert piece in err, err


def test_check_data_names_a_truncated_shard(shard_set, capsys):
    with open(shard_set / "train-00001.tar", "r+b") as f:
        f.truncate(3000)
    _one_line_error(*run_cli(["check-data", shard_set], capsys), "train-00001.tar: truncated")


def test_check_data_names_a_wrong_checksum(shard_set, capsys):
    data = bytearray((shard_set / "val-00000.tar").read_bytes())
    data[600] ^= 1
    (shard_set / "val-00000.tar").write_bytes(bytes(data))
    _one_line_error(*run_cli(["check-data", shard_set], capsys), "val-00000.tar: sha256 differs")


def test_check_data_names_a_stale_index_file(shard_set, capsys):
    idx = shard_set / "train-00000.idx"
    lines = idx.read_text().splitlines()
    fields = lines[2].split()
    fields[2] = str(int(fields[2]) + 1)  # the image's size, one byte off
    idx.write_text("\n".join([*lines[:2], " ".join(fields), *lines[3:]]) + "\n")
    _one_line_error(*run_cli(["check-data", shard_set], capsys), "train-00000.idx", "line 3")


def test_check_data_lists_several_problems(shard_set, capsys):
    (shard_set / "train-00000.tar").unlink()
    (shard_set / "val-00000.idx").unlink()
    code, out, err = run_cli(["check-data", shard_set], capsys)
    assert code == 1 and "2 problems, listed above" in err
    assert "damaged: " in out and "train-00000.tar: missing" in out and "val-00000.idx" in out


def _rewrite(path: Path, change) -> None:
    """Rewrite a tar with ``change(name, data) -> (name, data)`` applied to each member."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            members.append(change(m.name, tar.extractfile(m).read()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda n, d: (n, b"7") if n.endswith(".cls") else (n, d), ".dalikd does not hold"),
        (lambda n, d: (n.replace("000000001", "000000009"), d), "expected key 000000001"),
        (lambda n, d: (n, d[:40]) if n.startswith("000000001.") and not n.endswith(
            ("cls", "dalikd")) else (n, d), "undecodable"),
    ],
)  # fmt: skip
def test_check_data_checks_each_sample(shard_set, change, problem):
    """A shard rewritten with a bad member, its checksum made to match: the sample check (and
    with --decode the decoder) still finds it."""
    path = shard_set / "train-00000.tar"
    _rewrite(path, change)
    manifest = read_manifest(shard_set)
    data = path.read_bytes()
    raw = json.loads((shard_set / "dataset.json").read_text())
    raw["splits"]["train"]["shards"][0].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    (shard_set / "dataset.json").write_text(json.dumps(raw))
    assert manifest.splits["train"].shards[0].name == "train-00000.tar"
    problems = check_shard_set(shard_set, decode=True).problems
    assert problems and problem in problems[0], problems


def test_data_shard_command(source, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        ["data", "shard", source, out, "--shard-size", "8KiB", "--seed", "5"], capsys
    )
    assert code is None or code == 0, err
    assert f"left out: {source / 'train' / 'bee' / 'empty.JPEG'}  (empty file)" in stdout
    assert "train 15 samples in" in stdout and "val 5 samples in" in stdout
    assert read_manifest(out).source["seed"] == 5
    code, _, err = run_cli(["data", "shard", source, out], capsys)
    _one_line_error(code, "", err, "already holds a dataset")
    args = ["data", "shard", source, tmp_path / "x", "--shard-size", "lots"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "cannot read the size 'lots'" in err
    assert "(see: dalikd data shard --help)" in err  # the subcommand's help, not "dalikd shard"


def test_progress_reports_each_phase_up_to_its_total(source, tmp_path):
    calls = []
    shard_dataset(source, tmp_path / "out", shard_size=8 << 10, cache=False,
                  progress=lambda *call: calls.append(call))  # fmt: skip
    phases = list(dict.fromkeys(phase for phase, _, _ in calls))
    assert phases == ["checking files", "sizes of train", "sizes of val", "writing shards"]
    for phase in phases:
        done = [d for p, d, t in calls if p == phase]
        total = {t for p, d, t in calls if p == phase}
        assert done == sorted(done) and len(total) == 1 and done[-1] == total.pop()
    assert calls[-1] == ("writing shards", 20, 20)
    assert len([c for c in calls if c[0] == "writing shards"]) > 20  # per sample, not per shard


def test_a_resume_on_shards_says_how_many_samples_differ_and_which_glob_the_run_read(tmp_path):
    from dalikd.resume import check_listing

    run = tmp_path / "run"
    run.mkdir()
    glob = str(tmp_path / "set" / "train-0000[0-3].tar")
    (run / "config.json").write_text(json.dumps({"data": {"path": glob}}))
    saved = {"classes": 3, "train_files": 8, "sha256": "a", "source": "shards"}
    whole = {"classes": 3, "train_files": 36, "sha256": "b", "source": "shards"}
    check_listing(saved, dict(saved), run, tmp_path / "set")  # the same listing: goes on
    with pytest.raises(DalikdError) as e:
        check_listing(saved, whole, run, tmp_path / "set")
    assert "(8 train samples in the run, 36 there; the run read the shards of " in str(e.value)
    assert f"{glob}: give --data that glob, quoted)" in str(e.value)
    (run / "config.json").write_text(json.dumps({"data": {"path": str(tmp_path / "set")}}))
    with pytest.raises(DalikdError, match=r"was trained on \(other shards or checksums: another"):
        check_listing(saved, {**saved, "sha256": "c"}, run, tmp_path / "set")

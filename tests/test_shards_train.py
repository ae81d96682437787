"""Shard sets as a data source (issue 25): `--data OUT` trains, validates, probes, profiles,
previews and evaluates from tar shards through the same data plan as folders; a run from shards
sees per epoch what a run from the folder sees; resume is bit-identical; a sample that fails to
decode is named by shard and key; a truncated shard or a wrong checksum is one line at start."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_of, make_dataset
from PIL import Image
from test_loaders import decode_colour
from test_robustness import cut_before_its_scan
from tests_helpers import run_cli
from tiny_models import tiny_cnn

from dalikd import loaders, recovery
from dalikd.config import DataConfig
from dalikd.errors import DalikdError
from dalikd.plan import resolve_plan
from dalikd.shard_train import ShardTrainData, reader_state, replay
from dalikd.shardcheck import verify_shards
from dalikd.shards import shard_split
from dalikd.shardwrite import shard_dataset
from dalikd.sources import listing, open_dataset, source_kind
from dalikd.teacher_cache.key import listing_hash

TINY = "tiny_models:tiny_cnn"


@pytest.fixture(scope="module")
def solid(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, its shard set): 3 classes x 8 solid-colour train images (24 = 2 ranks x 3
    batches of 4), 3 x 3 val; shards of about 3 samples."""
    root = tmp_path_factory.mktemp("solid")
    folder = make_dataset(root / "src", n_train=8, n_val=3)
    shard_dataset(folder, root / "out", shard_size=8 << 10)
    return folder, root / "out"


@pytest.fixture(scope="module")
def noise(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, its shard set) of noise images (the order matters to the weights), with a
    teacher's weights in the folder."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("a", "b", "c"):
            (root / "src" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (24, 28, 3), np.uint8)
                Image.fromarray(pixels).save(root / "src" / split / c / f"{i}.png")
    torch.save(tiny_cnn(3).state_dict(), root / "teacher.pt")
    shard_dataset(root / "src", root / "out", shard_size=16 << 10)
    return root / "src", root / "out"


def plan_of(data: Path, seed: int = 11):
    cfg = DataConfig(path=str(data), image_size=16, batch_size=4, threads=1)
    return resolve_plan(cfg, device="cpu", seed=seed)


def seen_per_epoch(loaders_, epochs: int = 2) -> list[Counter]:
    """(label, colour) of every training sample each epoch, over the loaders (ranks)."""
    out = []
    for _ in range(epochs):
        seen: Counter = Counter()
        for ld in loaders_:
            for batch in ld:
                seen.update(
                    (lab, tuple(decode_colour(x)))
                    for x, lab in zip(batch.images, batch.labels.tolist(), strict=True)
                )
        out.append(seen)
    return out


# -- what a run sees ------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_run_from_shards_sees_per_epoch_what_a_run_from_the_folder_sees(solid, ranks, tmp_path):
    """The training loaders of both kinds, per epoch and over the ranks: every train image once
    with its label, the same number of batches per rank; the shard loader's batches carry
    the sample numbers; validation reads every val image once."""
    folder, shards = solid
    kinds = {}
    for data in (folder, shards):
        plan = plan_of(data)
        dataset = open_dataset(data)
        kind = ShardTrainData if plan.source == "shards" else recovery.TrainData
        kinds[plan.source] = [
            kind(dataset, plan, epoch=0, run_dir=tmp_path, reporter=None, shard_id=r,
                 num_shards=ranks)
            for r in range(ranks)
        ]  # fmt: skip
    assert set(kinds) == {"folder", "shards"}
    everything = Counter((label, colour_of(label, i)) for label in range(3) for i in range(8))
    for kind, lds in kinds.items():
        assert [len(ld) for ld in lds] == [24 // ranks // 4] * ranks, kind
        epochs = seen_per_epoch(lds)
        assert epochs == [everything, everything], kind
    # the numbers name the samples: the label the manifest's shard holds is the batch's
    split = shard_split(shards, "train")
    batch = next(iter(loaders.train_loader(split, plan_of(shards), indexed=True)))
    assert batch.index is not None and batch.index.device.type == "cpu"
    truth = {n: lab for n, lab in _labels_in_shards(shards, "train").items()}
    assert [truth[n] for n in batch.index.tolist()] == batch.labels.tolist()
    val = Counter()
    for r in range(ranks):
        ld = loaders.val_loader(open_dataset(shards).val, plan_of(shards), shard_id=r,
                                num_shards=ranks)  # fmt: skip
        for b in ld:
            val.update((lab, tuple(decode_colour(x)))
                       for x, lab in zip(b.images, b.labels.tolist(), strict=True))  # fmt: skip
    assert val == Counter((label, colour_of(label, i)) for label in range(3) for i in range(3))


def _labels_in_shards(out: Path, split: str) -> dict[int, int]:
    from test_shards import read_split

    return {int(key): int(m["cls"]) for key, m in read_split(out, split)}


def test_the_source_kind_is_decided_once_in_the_plan_and_recorded(solid, tmp_path, tiny_env,
                                                                   capsys):  # fmt: skip
    folder, shards = solid
    assert (source_kind(folder), source_kind(shards)) == ("folder", "shards")
    assert plan_of(shards).to_dict()["source"] == "shards"
    run = tmp_path / "run"
    code, out, err = run_cli(train_args(shards, run, epochs=1), capsys)
    assert code == 0, err
    assert "data: 24 train / 9 val images, 3 classes" in out
    config = json.loads((run / "config.json").read_text())
    assert config["plan"]["source"] == "shards" and config["data"]["path"] == str(shards)
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["plan"]["source"] == "shards"
    assert last["train_listing"] == listing(open_dataset(shards))
    assert last["train_listing"]["source"] == "shards"
    assert "/" not in json.dumps(last["train_listing"])  # no paths: the manifest's checksums


def train_args(data: Path, run: Path, *, epochs: int = 2, student: str = TINY, extra=()) -> list:
    return ["train", "--data", data, "--student", student, "--epochs", epochs, "--image-size",
            16, "--batch-size", 4, "--threads", 1, "--device", "cpu", "--seed", 3, "--out", run,
            *extra]  # fmt: skip


# -- exact resume ---------------------------------------------------------------------------------


def test_a_run_from_shards_stopped_mid_epoch_resumes_bit_identically(
    noise, tmp_path, tiny_env, capsys, monkeypatch
):
    """An uninterrupted run and one stopped at epoch 1, step 4 (SIGUSR1) then resumed end with
    the same weights and the same records: DALI's reader state restores mid-epoch."""
    _, shards = noise
    kd = ["--teacher", TINY, "--teacher-weights", noise[0].parent / "teacher.pt", "--aug",
          "cutmix", "--ckpt-every", 2, "--lr", 0.05]  # fmt: skip
    student = "tiny_models:stopping_cnn"
    ref, run = tmp_path / "ref", tmp_path / "run"
    code, _, err = run_cli(train_args(shards, ref, student=student, extra=kd), capsys)
    assert code == 0, err
    monkeypatch.setenv("TINY_STOP_AT", str(2 * 4))  # two training forwards a step (x, x')
    code, _, err = run_cli(train_args(shards, run, student=student, extra=kd), capsys)
    assert code != 0 and "stopped by SIGUSR1 at epoch 1, step 4" in err
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["epoch"], last["step_in_epoch"]) == (0, 4)
    monkeypatch.delenv("TINY_STOP_AT")
    code, out, err = run_cli(["train", "--resume", run], capsys)
    assert code == 0, err
    a = torch.load(ref / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [(run / "metrics.jsonl"), (ref / "metrics.jsonl")]
    got, want = ([json.loads(x) for x in p.read_text().splitlines()] for p in records)
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]
    assert [r["t_stddev"] for r in got] == [r["t_stddev"] for r in want]


def test_a_resume_checks_it_is_on_the_same_shard_set(noise, solid, tmp_path, tiny_env, capsys):
    src, shards = noise
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(shards, run, epochs=1), capsys)
    assert code == 0, err
    moved = tmp_path / "moved"  # a copy elsewhere: the same manifest, the run goes on
    shutil.copytree(shards, moved)
    code, _, err = run_cli(["train", "--resume", run, "--epochs", 2, "--data", moved], capsys)
    assert code == 0, err
    other = tmp_path / "reshard"  # the same images, shuffled with another seed
    shard_dataset(src, other, shard_size=16 << 10, seed=1)
    code, _, err = run_cli(["train", "--resume", run, "--epochs", 3, "--data", other], capsys)
    assert code == 1 and f"{other} is not the shard set {run} was trained on" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["train", "--resume", run, "--epochs", 3, "--data", src], capsys)
    assert code == 1 and f"{src} is a folder of images; {run} was trained on a shard set" in err
    assert len(err.strip().splitlines()) == 1


# -- damage --------------------------------------------------------------------------------------


def test_a_sample_that_fails_to_decode_is_named_by_shard_and_key(tmp_path, tiny_env, capsys):
    """A JPEG that passes the scan (and so is written into a shard) but that DALI cannot
    decode: the run stops with one line naming its shard and key."""
    folder = make_dataset(tmp_path / "src", n_train=8, n_val=1)
    (folder / "train/ant/bad.jpg").write_bytes(cut_before_its_scan())
    shards = tmp_path / "out"
    shard_dataset(folder, shards, shard_size=8 << 10)
    bad = next(n for n, m in _members(shards, "train") if "jpg" in m)
    name, key = shard_split(shards, "train").locate(bad)
    code, _, err = run_cli(train_args(shards, tmp_path / "run", epochs=1), capsys)
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"{shards / name}: sample {key} fails to decode at epoch 1, step " in line
    assert f"dalikd check-data {shards} --decode" in line


def _members(out: Path, split: str):
    from test_shards import read_split

    return [(int(key), members) for key, members in read_split(out, split)]


def test_a_truncated_shard_or_a_wrong_checksum_is_one_line_when_training_starts(
    solid, tmp_path, tiny_env, capsys
):
    _, good = solid
    shards = tmp_path / "out"
    shutil.copytree(good, shards)
    path = shards / shard_split(shards, "train").shards[1].name
    data = path.read_bytes()
    path.write_bytes(data[:-512])
    code, _, err = run_cli(train_args(shards, tmp_path / "r1", epochs=1), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{path} is truncated: {len(data) - 512:,} bytes, the manifest lists" in err
    flipped = bytearray(data)
    flipped[700] ^= 0xFF  # inside the first image: same size, other bytes
    path.write_bytes(bytes(flipped))
    code, _, err = run_cli(train_args(shards, tmp_path / "r2", epochs=1), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{path}: sha256 differs from the manifest's" in err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_verified_checksums_are_cached_by_size_and_mtime(solid, tmp_path):
    _, good = solid
    shards = tmp_path / "out"
    shutil.copytree(good, shards)
    split = shard_split(shards, "train")
    hashed = []
    verify_shards(split, cache_root=tmp_path / "cache",
                  progress=lambda phase, done, total: hashed.append(total))  # fmt: skip
    assert hashed and hashed[-1] == sum(s.bytes for s in split.shards)
    hashed.clear()
    verify_shards(split, cache_root=tmp_path / "cache",
                  progress=lambda phase, done, total: hashed.append(total))  # fmt: skip
    assert hashed == []  # nothing changed: nothing hashed
    path = shards / split.shards[0].name
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: trusted
    verify_shards(split, cache_root=tmp_path / "cache")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: hashed again
    with pytest.raises(DalikdError, match="sha256 differs"):
        verify_shards(split, cache_root=tmp_path / "cache")
    # ranks share the work: rank r of n hashes every n-th shard from its own
    val = shard_split(good, "val")
    for r in range(2):
        totals: list[int] = []
        verify_shards(val, cache_root=None, rank=r, world_size=2,
                      progress=lambda _p, _d, total, seen=totals: seen.append(total))  # fmt: skip
        assert totals[0] == sum(s.bytes for s in val.shards[r::2])


# -- globs, subsets, listings --------------------------------------------------------------------


def test_a_glob_picks_shards_of_a_set_and_needs_its_manifest(solid, tmp_path):
    _, shards = solid
    whole = open_dataset(shards)
    picked = open_dataset(str(shards / "train-0000[0-1].tar"))
    assert [s.name for s in picked.train.shards] == ["train-00000.tar", "train-00001.tar"]
    assert picked.val.shards == whole.val.shards  # the glob picks no val shard: all of them
    assert len(picked.train) == sum(s.samples for s in whole.train.shards[:2])
    assert picked.classes == whole.classes
    assert listing(picked)["sha256"] != listing(whole)["sha256"]
    assert source_kind(str(shards / "*.tar")) == "shards"
    assert open_dataset(str(shards / "*.tar")).train.shards == whole.train.shards
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(shards / "train-00000.tar", loose)
    with pytest.raises(DalikdError, match="no dataset.json of layout shards beside the tars"):
        open_dataset(str(loose / "*.tar"))
    shutil.copy(shards / "dataset.json", loose)
    (loose / "extra.tar").write_bytes(b"")
    with pytest.raises(DalikdError, match="matches extra.tar, which is not a shard of"):
        open_dataset(str(loose / "*.tar"))
    with pytest.raises(DalikdError, match="a glob picks the .tar shards of one folder"):
        open_dataset(str(tmp_path / "*" / "train-*.tar"))


def test_the_teacher_cache_keys_on_the_manifest(solid, tmp_path):
    folder, shards = solid
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    assert listing_hash(open_dataset(copy)) == listing_hash(open_dataset(shards))
    assert listing_hash(open_dataset(shards)) != listing_hash(open_dataset(folder))
    raw = json.loads((copy / "dataset.json").read_text())
    raw["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    (copy / "dataset.json").write_text(json.dumps(raw))
    assert listing_hash(open_dataset(copy)) != listing_hash(open_dataset(shards))


def test_a_subset_reads_the_samples_it_names_through_filtered_index_files(solid, tmp_path):
    """The piece a remainder loader needs: the same tars, only the samples asked for."""
    _, shards = solid
    split = shard_split(shards, "train")
    keep = [0, 2, 5, 9, 10, 23]
    sub = split.subset(keep, tmp_path / "idx")
    assert len(sub) == 6 and sub.tar_paths() == [
        str(shards / s.name) for s in split.shards if any(split.locate(n)[0] == s.name
                                                          for n in keep)
    ]  # fmt: skip
    plan = plan_of(shards)
    ld = loaders.train_loader(sub, plan, indexed=True)
    for _ in range(2):  # every epoch: those samples (batches of 4: 4 of the 6)
        got = [n for b in ld for n in b.index.tolist()]
        assert len(got) == 4 and set(got) <= set(keep) and len(set(got)) == 4
    assert sub.image(9) == split.image(9)
    with pytest.raises(DalikdError, match="does not hold every sample"):
        split.subset([24], tmp_path / "idx2")


def test_a_replay_from_a_training_state_gives_the_next_batches_numbers(solid):
    """The reader-only replay that names a failed batch: restored to the reader's part of a
    training graph's checkpoint (DALI's checkpoint layout, checked here on the DALI
    installed), it reads the sample numbers the training loader reads next."""
    _, shards = solid
    split = shard_split(shards, "train")
    plan = plan_of(shards)
    ld = loaders.train_loader(split, plan, seed=5, shard_id=1, num_shards=2, indexed=True)
    batches = iter(ld)
    next(batches)
    state = ld.checkpoint()
    expected = [b.index.tolist() for b in batches]
    kw = dict(seed=5, shard_id=1, num_shards=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert replay(split, 4, state=state, batches=2, **kw) == expected
        assert replay(split, 4, state=None, batches=3, **kw)[1:] == expected
    with pytest.raises(ValueError, match="not a DALI checkpoint"):
        reader_state(b"\x08\x01", b"")


# -- the other commands --------------------------------------------------------------------------


def test_probe_profile_preview_and_eval_read_shards(noise, tmp_path, tiny_env, capsys):
    _, shards = noise
    teacher = noise[0].parent / "teacher.pt"
    small = ["--image-size", 16, "--batch-size", 4, "--threads", 1, "--device", "cpu"]
    code, _, err = run_cli(["tstddev", "--data", shards, "--teacher", TINY, "--teacher-weights",
                            teacher, "--aug", "none,flip", "--samples", 48, "--group-steps", 1,
                            "--json", tmp_path / "t.json", *small], capsys)  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    assert {r["plan"]["source"] for r in results} == {"shards"}
    code, _, err = run_cli(["profile", "--data", shards, "--aug", "none", "--json",
                            tmp_path / "p.json", "--windows", 2, "--window-seconds", 0,
                            "--warmup", 1, *small], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["dataset"]["source"] == "shards" and report["dataset"]["train_images"] == 24
    assert report["plans"]["none"]["source"] == "shards" and report["baseline"] == []
    code, out, err = run_cli(["preview", "--data", shards, "--aug", "cutmix", "--out",
                              tmp_path / "g.png", "--batch-size", 4, "--image-size", 16,
                              "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "g.png").is_file()
    code, out, err = run_cli(["eval", "--data", shards, "--model", TINY, "--weights", teacher,
                              "--image-size", 16], capsys)  # fmt: skip
    assert code == 0 and "top-1" in out, err


def test_torchrun_two_cpu_processes_read_their_parts_of_a_shard_set(solid, tmp_path):
    """docs/distributed.md's example, on CPU: 2 gloo ranks, a glob of the whole set."""
    import socket
    import subprocess
    import sys

    from conftest import TESTS

    _, shards = solid
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "dalikd", *map(str, train_args(
             Path(shards / "*.tar"), run, epochs=2))],
        env={**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: 2 rank(s), gloo, DDP" in proc.stdout + proc.stderr
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert len(ckpt["dali"]) == 2 and ckpt["plan"]["source"] == "shards"
    assert ckpt["scheduler"]["step"] == 2 * 3  # 24 samples / (2 ranks x 4) per epoch
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(shards / "*.tar")


def test_a_shard_sets_manifest_is_found_from_its_folder_or_a_glob(tmp_path):
    """Where a dataset's own settings (data_defaults) come from, whichever the kind."""
    from dalikd.manifest import Manifest, SplitInfo, write_manifest
    from dalikd.sources import manifest_of

    folder = make_dataset(tmp_path / "src", n_train=2, n_val=1)
    assert manifest_of(folder) is None  # a plain folder of images
    write_manifest(Manifest("mine", "folder", "encoded", ("ant", "bee", "cat"),
                            {"train": SplitInfo(6, (2, 2, 2))}, data_defaults={"image_size": 20}),
                   folder)  # fmt: skip
    shard_dataset(folder, tmp_path / "out", shard_size=8 << 10)
    for path in (folder, tmp_path / "out", str(tmp_path / "out" / "train-*.tar")):
        assert manifest_of(path).data_defaults == {"image_size": 20}, path
    assert manifest_of(tmp_path / "out").layout == "shards"

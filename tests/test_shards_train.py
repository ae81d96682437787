"""Shard sets as a data source (issue 25): `--data OUT` trains, validates, probes, profiles,
previews and evaluates from tar shards through the same data plan and the same recovery as
folders; a run from shards sees per epoch what a run from the folder sees, each rank reading its
own list in dalikd's order; resume is bit-identical; a sample that fails to decode is skipped,
the epoch goes on and data_report.tsv names it by shard and key (under torchrun too); a
truncated shard or a wrong checksum is one line at start."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_of, make_dataset
from PIL import Image
from test_loaders import decode_colour
from test_robustness import bad_scan_header
from tests_helpers import run_cli
from tiny_models import tiny_cnn

from dalikd import loaders, recovery
from dalikd.config import DataConfig
from dalikd.errors import DalikdError
from dalikd.plan import resolve_plan
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
        source = recovery.source_of(open_dataset(data).train)  # the one path for both kinds
        kinds[plan.source] = [recovery.TrainData(source, plan, epoch=0, rank=r, world=ranks)
                              for r in range(ranks)]  # fmt: skip
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
    val = Counter()  # validation as a run reads it: each rank its part, in stored order
    for r in range(ranks):
        part = recovery.ValData(recovery.source_of(open_dataset(shards).val), plan_of(shards),
                                rank=r, world=ranks)  # fmt: skip
        for b in part:
            val.update((lab, tuple(decode_colour(x)))
                       for x, lab in zip(b.images, b.labels.tolist(), strict=True))  # fmt: skip
    assert val == Counter((label, colour_of(label, i)) for label in range(3) for i in range(3))


def test_each_rank_reads_its_own_list_in_dalikds_order_a_shard_in_one_run(solid):
    """The shard order rule: epoch e's permutation of [seed, e] over the shards, then over each
    shard's samples; rank r the slice [N r/n, N (r+1)/n), (N//n)//batch whole batches, read in
    that order (the batches' sample numbers), each shard it touches in one run; the same
    function a folder's order is (recovery.epoch_reads), its groups the shards."""
    _, shards = solid
    plan = plan_of(shards)
    source = recovery.source_of(open_dataset(shards).train)
    assert isinstance(source, recovery.ShardSource) and len(source) == 24
    assert [int(source.groups[i]) for i in range(24)] == [
        k for k, s in enumerate(source.split.shards) for _ in range(s.samples)
    ]
    for ranks in (1, 2):
        for epoch in range(2):
            data = [recovery.TrainData(source, plan, epoch=epoch, rank=r, world=ranks)
                    for r in range(ranks)]  # fmt: skip
            got_all = []
            for r, ld in enumerate(data):
                want, _ = recovery.epoch_reads(
                    range(24),
                    seed=plan.seed,
                    epoch=epoch,
                    rank=r,
                    world=ranks,
                    batch=4,
                    groups=source.groups,
                )
                got = [n for b in ld for n in b.index.tolist()]
                assert got == [source.number(i) for i in want], (ranks, epoch, r)
                shard_runs = [source.groups[i] for i in want]
                runs = [g for k, g in enumerate(shard_runs) if k == 0 or g != shard_runs[k - 1]]
                assert len(runs) == len(set(runs))  # a shard is read in one run
                got_all += got
            assert len(set(got_all)) == len(got_all) == 24 // ranks // 4 * 4 * ranks
    orders = [recovery.epoch_reads(range(24), seed=3, epoch=e, rank=0, world=1, batch=4,
                                   groups=source.groups)[0] for e in range(2)]  # fmt: skip
    assert orders[0] != orders[1]  # reshuffled every epoch
    # a folder's files stand alone: the permutation of them all, as before shards existed
    assert recovery.epoch_order(24, seed=3, epoch=1).tolist() == (
        np.random.default_rng([3, 1]).permutation(24).tolist()
    )


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


def bad_shard_set(tmp_path: Path, n_train: int = 5, n_val: int = 2) -> tuple[Path, list, list]:
    """A shard set of CLASSES x ``n_train`` solid train images and two JPEGs that pass the scan
    (so they are written into shards) but that DALI cannot decode, and one such val image:
    (the set, the bad train samples' numbers, the bad val samples' numbers)."""
    from test_robustness import CLASSES, corrupt_sof

    folder = make_dataset(tmp_path / "src", classes=CLASSES, n_train=n_train, n_val=n_val)
    bad = {"train/ant/bad1.jpg": bad_scan_header(), "train/cat/bad2.jpg": corrupt_sof(),
           "val/bee/bad.jpg": bad_scan_header()}  # fmt: skip
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    shards = tmp_path / "out"
    shard_dataset(folder, shards, shard_size=8 << 10)
    found = [[n for n, m in _members(shards, split) if m.get("jpg") in bad.values()]
             for split in ("train", "val")]  # fmt: skip
    assert [len(f) for f in found] == [2, 1]
    return shards, found[0], found[1]


def test_a_sample_that_fails_to_decode_is_skipped_reported_by_shard_and_key_and_the_epoch_goes_on(
    tmp_path, tiny_env, capsys
):  # fmt: skip
    """Two train samples and a val sample that DALI cannot decode: each is found, left out and
    named in data_report.tsv as <shard path>:<key>; every good image is trained on exactly
    once in the failing epoch and in the next, and every epoch validates."""
    from test_robustness import recording_args
    from tiny_models import Recording

    shards, bad, bad_val = bad_shard_set(tmp_path)
    source = recovery.source_of(open_dataset(shards).train)
    ids = [source.index(f"{shards / source.split.locate(n)[0]}:{n:09d}") for n in bad]
    assert [source.number(i) for i in ids] == bad  # a report's name gives the sample back
    seed = next(s for s in range(100) if set(ids) <= set(recovery.epoch_reads(
        range(22), seed=s, epoch=0, rank=0, world=1, batch=4,
        groups=source.groups)[0]))  # fmt: skip
    Recording.seen = []
    run = tmp_path / "run"
    code, out, err = run_cli([*recording_args(shards, run, epochs=2), "--seed", seed], capsys)
    assert code == 0 and "Traceback" not in out + err, err
    good = Counter(colour_of(label, i) for label in range(4) for i in range(5))
    assert len(Recording.seen) == 40
    assert Counter(Recording.seen[:20]) == good == Counter(Recording.seen[20:])
    rows = dict(line.split("\t", 1) for line in (run / "data_report.tsv").read_text().splitlines())
    train, val = shard_split(shards, "train"), shard_split(shards, "val")
    for split, numbers, reason in ((train, bad, "failed in training (epoch 1"),
                                   (val, bad_val, "failed in validation (epoch 1)")):  # fmt: skip
        for n in numbers:
            name, key = split.locate(n)
            assert rows[f"{shards / name}:{key}"].startswith(reason), rows
    assert len(rows) == 1 + 3  # the header and the three samples
    assert "left out 1 sample(s) that failed to decode at epoch 1" in out + err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "data: 22 train / 9 val images, 4 classes\n" in out  # what the shards hold
    code, out, err = run_cli(["train", "--resume", run, "--epochs", 3], capsys)
    assert code == 0, err  # the report's names are read back: they stay out
    assert "data: 20 train / 8 val images, 4 classes, 3 samples left out" in out


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


def test_a_subset_keeps_its_order_returns_to_a_shard_and_resumes_mid_list(solid, tmp_path):
    """What a rank's loader reads: the samples it names in their order (the same tar again
    later, a sample twice: a remainder's top-up), one index file per run, and a DALI state
    taken mid-list restores the rest of it."""
    _, shards = solid
    split = shard_split(shards, "train")
    first = split.shards[0].samples
    order = [first + 1, first, 0, 2, 1, first + 2, 0, 5]  # shard 1, shard 0, 1, 0, shard 1, ...
    sub = split.subset(order, tmp_path / "idx")
    assert len(sub) == 8 and len(sub.index_paths()) == len(sub.tar_paths())
    runs = [split.locate(n)[0] for n in order]
    runs = [name for k, name in enumerate(runs) if k == 0 or name != runs[k - 1]]
    assert [Path(p).name for p in sub.tar_paths()] == runs
    plan = plan_of(shards)
    ld = loaders.train_loader(sub, plan, indexed=True, ordered=True)
    for _ in range(2):
        assert [n for b in ld for n in b.index.tolist()] == order
    batches = iter(ld)
    next(batches)
    state = ld.checkpoint()
    rest = [b.index.tolist() for b in batches]
    again = loaders.train_loader(sub, plan, indexed=True, ordered=True, checkpoint=state)
    assert [b.index.tolist() for b in again] == rest == [order[4:]]
    assert sub.image(order[2]) == split.image(order[2])  # a subset names its samples still
    with pytest.raises(DalikdError, match="does not hold every sample"):
        split.subset([0, 24], tmp_path / "idx2")


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


def test_a_profile_of_shards_leaves_out_samples_that_fail_to_decode(tmp_path, capsys):
    """As for a folder's files (was: DALI's error as a traceback)."""
    shards, bad, _ = bad_shard_set(tmp_path)
    split = shard_split(shards, "train")
    named = sorted(f"{shards / split.locate(n)[0]}:{n:09d}" for n in bad)
    with pytest.warns(RuntimeWarning) as warned:
        code, _, err = run_cli(["profile", "--data", shards, "--aug", "none", "--json",
                                tmp_path / "p.json", "--windows", 2, "--window-seconds", 0,
                                "--warmup", 1, "--image-size", 16, "--batch-size", 4,
                                "--threads", 1, "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0 and "Traceback" not in err, err
    said = [str(w.message) for w in warned if "left out" in str(w.message)]
    assert sorted(", ".join(m.split(": ")[2].split(" (")[0] for m in said).split(", ")) == named
    assert all("sample(s) that failed to decode" in m for m in said)
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["dataset"]["train_images"] == 20  # 22 - the 2 that fail


def test_eval_on_shards_calls_a_sample_that_fails_to_decode_a_sample(tmp_path, capsys, tiny_env):
    shards, _, bad_val = bad_shard_set(tmp_path)
    name = f"{shards / shard_split(shards, 'val').locate(bad_val[0])[0]}:{bad_val[0]:09d}"
    torch.save(tiny_cnn(4).state_dict(), tmp_path / "w.pt")
    with pytest.warns(RuntimeWarning, match=rf"left out 1 validation sample\(s\) .*: {name} "):
        code, out, err = run_cli(["eval", "--data", shards, "--model", TINY, "--weights",
                                  tmp_path / "w.pt", "--image-size", 16, "--batch-size", 4,
                                  "--device", "cpu"], capsys)  # fmt: skip
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

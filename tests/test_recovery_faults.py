"""Never a dead run at scale (issue 24, items 1-3 and the loaders' gaps): files that fail in DALI
on any rank, in val/, in an epoch's left-over samples, or after a resume; the epoch plan every
rank agrees on; "remove the file and --resume"."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import colour_of, make_dataset
from test_reliability import _free_port, env
from test_robustness import CLASSES, bad_scan_header, corrupt_sof, recording_args
from tests_helpers import run_cli

from dalikd import loaders, recovery
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.plan import resolve_plan

GOOD = Counter(colour_of(label, i) for label in range(4) for i in range(5))  # CLASSES x 5


# -- the epoch plan: a pure function every rank agrees on ---------------------------------------


@pytest.mark.parametrize("n", [9, 24, 25, 43])
@pytest.mark.parametrize("world", [1, 2, 5])
def test_every_rank_reads_its_own_whole_batches_and_nothing_twice(n, world):
    batch = 4
    good = list(range(0, 2 * n, 2))  # identities need not be 0..n-1
    for epoch in range(3):
        parts = [recovery.epoch_reads(good, seed=7, epoch=epoch, rank=r, world=world,
                                      batch=batch) for r in range(world)]  # fmt: skip
        steps = recovery.steps_per_epoch(n, world, batch)
        assert all(len(reads) == steps * batch for reads, _ in parts)  # the same step count
        every = [i for reads, extra in parts for i in reads + extra]
        assert sorted(every) == good  # each good sample in exactly one rank's part
    orders = [recovery.epoch_reads(good, seed=7, epoch=e, rank=0, world=1, batch=batch)[0]
              for e in range(2)]  # fmt: skip
    assert orders[0] != orders[1]  # a fresh shuffle every epoch


def test_after_a_failure_the_unseen_good_ones_are_read_once_topped_up_to_the_epoch():
    reads, extra = list(range(12)), [20, 21]
    after = recovery.after_failure(reads, extra, 1, [5, 9, 20], batch=4)
    assert after[:4] == [0, 1, 2, 3]  # what was read stays
    assert after[4:10] == [4, 6, 7, 8, 10, 11]  # the unseen good ones, in their order
    assert after[10:] == [21, 0]  # topped up: the extra not failed, then what was read first
    assert len(after) == len(reads)
    # nothing read yet and no extra: the unseen good ones again
    assert recovery.after_failure([0, 1, 2, 3], [], 0, [2], batch=4) == [0, 1, 3, 0]
    assert recovery.after_failure([0, 1], [], 0, [0, 1], batch=2) == []


# -- the loaders' gaps (issue 24 item 6a-6c) -----------------------------------------------------


@pytest.fixture(scope="module")
def files24(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("d24"), classes=("a", "b", "c"), n_train=8,
                        n_val=8)  # fmt: skip
    return scan_dataset(root)


def _plan(ds, batch=4):
    return resolve_plan(DataConfig(path=str(ds.root), image_size=16, batch_size=batch,
                                   threads=1), device="cpu", seed=3)  # fmt: skip


def test_no_rank_gets_a_batch_of_padding_in_the_next_epoch(files24):
    # DALI's DROP with pad_last_batch, 24 samples over 5 ranks at batch 4: a rank whose own
    # part fills whole batches but whose padded part does not got [3, 3, 3, 3] as its whole
    # next epoch (tests/test_shards_dali.py). TrainData reads each rank's own list instead.
    plan, source = _plan(files24), recovery.FileSource(files24.train)
    for epoch in range(2):
        seen = []
        for rank in range(5):
            data = recovery.TrainData(source, plan, epoch=epoch, rank=rank, world=5)
            batches = [b.index.tolist() for b in data]
            assert len(batches) == len(data) == 1 and len(batches[0]) == 4
            seen += [data_index for b in batches for data_index in b]
        assert len(seen) == 20  # every rank one full batch of its own, no sample twice
    data = recovery.TrainData(source, plan, epoch=0, rank=0, world=5)
    firsts = [[b.labels.tolist() for b in data] for _ in range(3)]  # 3 epochs, one object
    assert all(len(f) == 1 and len(f[0]) == 4 for f in firsts)


def test_validation_tolerates_a_rank_whose_part_ends_in_an_empty_batch(files24):
    from tiny_models import tiny_cnn

    from dalikd.evaluate import evaluate

    # PARTIAL with padding: 24 val files over 5 ranks at batch 4; rank 0 has 4 (its last batch
    # of 0 samples), rank 1 has 5. (A second pass of DALI's sharded loader gives rank 0 a
    # padding sample, 5: the run's validation reads each rank's own slice instead, ValData.)
    plan, model = _plan(files24), tiny_cnn(3)
    counts = []
    for rank in range(5):
        loader = loaders.val_loader(files24.val, plan, shard_id=rank, num_shards=5)
        counts.append(evaluate(model, loader, "cpu")["count"])  # the empty batch: tolerated
        val = recovery.ValData(recovery.FileSource(files24.val), plan, rank=rank, world=5)
        passes = [evaluate(model, val, "cpu")["count"] for _ in range(2)]
        assert passes == [counts[-1]] * 2 and all(len(b) for b in val)
    assert counts == [4, 5, 5, 5, 5]


def test_a_bad_file_among_an_epochs_left_over_samples_is_recovered_later(tmp_path, capsys,
                                                                          tiny_env):  # fmt: skip
    # 9 files at batch 4: one left over each epoch (LastBatchPolicy.DROP's). A file failing
    # there killed the run with a traceback (its batch was decoded, then dropped).
    from tiny_models import Recording

    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=4, n_val=1)
    (root / "train/b/bad.jpg").write_bytes(bad_scan_header())
    source = recovery.FileSource(scan_dataset(root).train)
    bad = source.index(str(root / "train/b/bad.jpg"))
    seed = next(s for s in range(100) if recovery.epoch_reads(
        range(9), seed=s, epoch=0, rank=0, world=1, batch=4)[1] == [bad])  # fmt: skip
    Recording.seen = []
    run = tmp_path / "run"
    code, out, err = run_cli([*recording_args(root, run, epochs=3), "--seed", seed], capsys)
    assert code == 0 and "Traceback" not in out + err, err
    assert len(Recording.seen) == 3 * 8
    assert "bad.jpg\tfailed in training (epoch 2, step" in (run / "data_report.tsv").read_text()


# -- item 3: exact resume with recovery, wherever the kill and the failure fall --------------------


def _grid_data(tmp_path):
    """4 x 5 good images and two that fail in DALI, with a seed where one fails at step 2 of
    epoch 1 and the other is left over in epoch 1 and fails in epoch 2 (22 files, batch 4:
    5 steps an epoch). Returns (root, seed, {epoch: step of its failure})."""
    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=5, n_val=1)
    (root / "train/ant/bad_sof.jpg").write_bytes(corrupt_sof())
    (root / "train/cat/bad_cut.jpg").write_bytes(bad_scan_header())
    source = recovery.FileSource(scan_dataset(root).train)
    bad = [source.index(str(root / "train" / p)) for p in ("ant/bad_sof.jpg", "cat/bad_cut.jpg")]
    for seed in range(500):
        reads, extra = recovery.epoch_reads(range(22), seed=seed, epoch=0, rank=0, world=1,
                                            batch=4)  # fmt: skip
        good = [i for i in range(22) if i != bad[0]]
        second, _ = recovery.epoch_reads(good, seed=seed, epoch=1, rank=0, world=1, batch=4)
        if bad[0] in reads[8:12] and bad[1] in extra and bad[1] in second[4:16]:
            return root, seed, {1: 2, 2: second.index(bad[1]) // 4}
    raise AssertionError("no seed fits")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(r / "last.pt", weights_only=True)["model"] for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_kill_is_exact_wherever_the_kill_and_the_failure_fall(tmp_path, capsys,
                                                                           tiny_env):  # fmt: skip
    from tiny_models import Recording

    root, seed, fails = _grid_data(tmp_path)
    # kills: during the step before the failure's, during it (the failure is reported, not
    # checkpointed), after it (inside the remainder), in both epochs; ``done``: the steps the
    # checkpoint it leaves holds (a SIGKILL during step done + 1)
    kills = sorted({5 * (e - 1) + f + d for e, f in fails.items() for d in (-1, 0, 1)} - {0, 10})
    args = [*recording_args(root, tmp_path / "ref", epochs=2), "--seed", seed, "--ckpt-every", 1]
    snapshots = tmp_path / "snapshots"

    def snapshot(n: int) -> None:  # during step n / 4: what a SIGKILL now would leave
        if n % 4 == 0 and n // 4 - 1 in kills:
            shutil.copytree(tmp_path / "ref", snapshots / str(n // 4 - 1),
                            ignore=shutil.ignore_patterns("run.lock", "*.tmp"))  # fmt: skip

    Recording.seen, Recording.hook = [], snapshot
    try:
        code, out, err = run_cli(args, capsys)
    finally:
        Recording.hook = None
    assert code == 0, err
    reference = list(Recording.seen)
    assert [Counter(reference[:20]), Counter(reference[20:])] == [GOOD, GOOD]  # once an epoch
    report = (tmp_path / "ref/data_report.tsv").read_text()
    assert report.count("failed in training") == 2
    assert f"(epoch 1, step {fails[1] + 1})" in report
    assert f"(epoch 2, step {fails[2] + 1})" in report
    for done in kills:  # SIGKILL during step done + 1: resumed from the checkpoint after `done`
        run = tmp_path / f"kill{done}"
        shutil.copytree(snapshots / str(done), run)
        Recording.seen = []
        code, out, err = run_cli(["train", "--resume", run], capsys)
        assert code == 0, err
        assert reference[: done * 4] + Recording.seen == reference, done
        assert _same_weights(run, tmp_path / "ref"), done
    for done in (fails[1], fails[1] + 1):  # SIGTERM after step `done`: it checkpoints there
        Recording.seen, Recording.stop_at = [], done * 4
        run = tmp_path / f"term{done}"
        try:
            code, out, err = run_cli([*args[:-6], "--out", run, "--seed", seed,
                                      "--ckpt-every", 1], capsys)  # fmt: skip
        finally:
            Recording.stop_at = None
        assert code == 128 + 15, err
        code, out, err = run_cli(["train", "--resume", run], capsys)
        assert code == 0, err
        assert Recording.seen == reference, done
        assert _same_weights(run, tmp_path / "ref"), done


# -- item 1: recovery under torchrun ------------------------------------------------------------


def _torchrun(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "dalikd", *map(str, args)],
        env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _torchrun_data(tmp_path: Path) -> tuple[Path, list[str], int]:
    """4 x 10 good train images, three that fail in DALI, one bad val image; a seed where each
    rank reads a bad one in epoch 1, before and after the first checkpoint (--ckpt-every 2)."""
    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=10, n_val=2)
    bad = ["train/ant/bad1.jpg", "train/bee/bad2.jpg", "train/cat/bad3.jpg", "val/dog/bad.jpg"]
    for name, data in zip(bad, (corrupt_sof(), bad_scan_header(), corrupt_sof(),
                                bad_scan_header()), strict=True):  # fmt: skip
        (root / name).write_bytes(data)
    source = recovery.FileSource(scan_dataset(root).train)
    ids = [source.index(str(root / b)) for b in bad[:3]]
    for seed in range(200):
        where = {}  # identity -> (rank, step)
        for rank in range(2):
            reads, _ = recovery.epoch_reads(range(43), seed=seed, epoch=0, rank=rank, world=2,
                                            batch=4)  # fmt: skip
            where.update({i: (rank, reads.index(i) // 4) for i in ids if i in reads})
        ranks, steps = {r for r, _ in where.values()}, {s for _, s in where.values()}
        if len(where) == 3 and ranks == {0, 1} and min(steps) < 2 <= max(steps):
            return root, [str(root / b) for b in bad], seed
    raise AssertionError("no seed fits")


def test_torchrun_recovers_bad_files_on_every_rank_and_in_val(tmp_path):
    root, bad, seed = _torchrun_data(tmp_path)
    run = tmp_path / "run"
    proc = _torchrun(["train", "--data", root, "--student", "tiny_models:tiny_cnn", "--epochs", 2,
                      "--image-size", 16, "--batch-size", 4, "--threads", 1, "--device", "cpu",
                      "--seed", seed, "--ckpt-every", 2, "--out", run])  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    rows = dict(line.split("\t", 1) for line in (run / "data_report.tsv").read_text().splitlines())
    for path in bad[:3]:
        assert rows[path].startswith("failed in training (epoch 1, step"), rows
    assert rows[bad[3]].startswith("failed in validation (epoch 1)"), rows
    assert {rows[p].split("rank ")[1][0] for p in bad[:3]} == {"0", "1"}  # both ranks had one
    assert "rank 1 left out" in output  # rank 0 names rank 1's files
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["step"] == 5 + 5  # 43 then 40 files: (n // 2) // 4 steps a rank

    # remove the reported files and resume (one process now): the listing is the run's
    for path in bad:
        os.unlink(path)
    code = subprocess.run(
        [sys.executable, "-m", "dalikd", "train", "--resume", str(run), "--epochs", "3"],
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr[-3000:]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["scheduler"]["step"] == 10 + 40 // 4
    assert (run / "data_report.tsv").read_text().count("\tfailed in ") == 4


def test_a_rank_that_stops_is_its_own_line_and_the_others_no_traceback(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=8, n_val=2)
    proc = _torchrun(["train", "--data", root, "--student", "tiny_models:failing_on_rank1",
                      "--epochs", 1, "--image-size", 16, "--batch-size", 2, "--threads", 1,
                      "--device", "cpu", "--out", tmp_path / "run"])  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: rank 1: a failure of this rank alone" in output
    assert "error: rank 0 stops: another rank stopped first" in output
    assert "[rank0]" not in output and "[rank1]" not in output  # no rank's traceback


def test_remove_the_reported_file_and_resume(tmp_path, capsys, tiny_env):
    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=5, n_val=2)
    bad = root / "train/bee/bad.jpg"
    bad.write_bytes(corrupt_sof())
    run = tmp_path / "run"
    code, out, err = run_cli(recording_args(root, run, epochs=1), capsys)
    assert code == 0, err
    assert f"{bad}\tfailed in training" in (run / "data_report.tsv").read_text()
    bad.unlink()  # as the old advice said
    code, out, err = run_cli(["train", "--resume", run, "--epochs", 2], capsys)
    assert code == 0, err
    (root / "train/bee/img000.png").unlink()  # a file the run did not report: another dataset
    code, out, err = run_cli(["train", "--resume", run, "--epochs", 3], capsys)
    assert code == 1 and "is not the dataset" in err
    assert "21 train files in the run, 20 there" in err


# -- item 2: bad files in val/ --------------------------------------------------------------------


def test_a_bad_val_file_is_left_out_and_every_epoch_validates(tmp_path, capsys, tiny_env):
    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=5, n_val=2)
    (root / "val/cat/bad.jpg").write_bytes(bad_scan_header())
    run = tmp_path / "run"
    code, out, err = run_cli(recording_args(root, run, epochs=2), capsys)
    assert code == 0 and "Traceback" not in out + err, err
    assert "left out 1 validation file(s) that failed to decode (epoch 1)" in out
    report = (run / "data_report.tsv").read_text()
    assert f"{root / 'val/cat/bad.jpg'}\tfailed in validation (epoch 1): " in report
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    code, out, err = run_cli(["train", "--resume", run, "--epochs", 3], capsys)
    assert code == 0 and "data: 20 train / 8 val images" in out, err


def test_eval_leaves_a_bad_file_out_in_one_warning(tmp_path, capsys, tiny_env):
    from tiny_models import tiny_cnn

    root = make_dataset(tmp_path / "d", classes=CLASSES, n_train=1, n_val=2)
    (root / "val/ant/bad.jpg").write_bytes(corrupt_sof())
    weights = tmp_path / "w.pt"
    torch.save(tiny_cnn(4).state_dict(), weights)
    with pytest.warns(RuntimeWarning) as warned:
        code, out, err = run_cli(["eval", "--data", root, "--model", "tiny_models:tiny_cnn",
                                  "--weights", weights, "--batch-size", 3, "--image-size", 16,
                                  "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0 and "Traceback" not in out + err, err
    said = [str(w.message) for w in warned]
    assert len(said) == 1 and said[0].startswith(
        f"dalikd: left out 1 validation file(s) that failed to decode: "
        f"{root / 'val/ant/bad.jpg'} (failed in validation: "
    )
    assert " 8 " in out  # the 8 good images evaluated


def test_tstddev_preview_and_profile_leave_a_failing_file_out_in_one_warning(tmp_path, capsys,
                                                                            tiny_env):  # fmt: skip
    from tiny_models import tiny_cnn

    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=4, n_val=1)
    bad = root / "train/b/bad.jpg"
    bad.write_bytes(bad_scan_header())
    source = recovery.FileSource(scan_dataset(root).train)
    seed = next(
        s
        for s in range(100)
        if source.index(str(bad))
        in recovery.epoch_reads(range(9), seed=s, epoch=0, rank=0, world=1, batch=4)[0][:4]
    )  # in the first batch
    teacher = tmp_path / "t.pt"
    torch.save(tiny_cnn(2).state_dict(), teacher)
    small = ["--image-size", 16, "--batch-size", 4, "--device", "cpu"]
    commands = {
        "preview": ["preview", "--data", root, "--aug", "cutmix", "--out", tmp_path / "p.png",
                    "--seed", seed, *small],
        "tstddev": ["tstddev", "--data", root, "--teacher", "tiny_models:tiny_cnn",
                    "--teacher-weights", teacher, "--aug", "none,flip", "--epochs", 6,
                    "--group-steps", 2, "--json", tmp_path / "t.json", "--threads", 1, *small],
        "profile": ["profile", "--data", root, "--aug", "flip", "--baseline", "torchvision",
                    "--windows", 2, "--window-seconds", 0, "--warmup", 1,
                    "--json", tmp_path / "prof.json", "--threads", 1, *small],
    }  # fmt: skip
    for name, args in commands.items():
        with pytest.warns(RuntimeWarning) as warned:
            code, out, err = run_cli(args, capsys)
        assert code == 0 and "Traceback" not in out + err, (name, err)
        said = [str(w.message) for w in warned if "left out" in str(w.message)]
        assert len(said) == 1, (name, said)  # once, however many schemes or restarts
        assert said[0].startswith("dalikd: left out 1 file(s) that failed to decode") and (
            str(bad) in said[0]
        ), (name, said)


def test_a_mid_epoch_resume_under_torchrun_keeps_every_ranks_train_loss(tmp_path, monkeypatch):
    # a checkpoint saved only rank 0's partial loss sum, and every rank restored it: the resumed
    # epoch's train loss counted rank 0's steps twice and rank 1's never (issue 24 re-test)
    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=8, n_val=2)  # 4 steps a rank
    (tmp_path / "log.toml").write_text("log_every = 1\n")  # stops are agreed at log boundaries
    args = ["train", "--config", tmp_path / "log.toml", "--data", root, "--student",
            "tiny_models:stopping_cnn", "--epochs", 1, "--image-size", 16, "--batch-size", 2,
            "--threads", 1, "--device", "cpu", "--out"]  # fmt: skip
    runs = {}
    for name, stop_at in (("ref", 0), ("run", 2)):
        monkeypatch.setenv("TINY_STOP_AT", str(stop_at))
        runs[name] = _torchrun([*args, tmp_path / name])
    assert runs["ref"].returncode == 0, runs["ref"].stderr[-3000:]
    assert "stopped by SIGUSR1 at epoch 1, step 2" in runs["run"].stderr, runs["run"].stderr
    monkeypatch.setenv("TINY_STOP_AT", "0")
    resumed = _torchrun(["train", "--resume", tmp_path / "run"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    loss = [json.loads((tmp_path / n / "metrics.jsonl").read_text())["train_loss"]
            for n in ("ref", "run")]  # fmt: skip
    assert loss[1] == pytest.approx(loss[0], rel=1e-6)

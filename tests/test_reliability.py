"""Sharding, exact mid-epoch resume, preemption and guards (issue: reliability)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TESTS, make_dataset
from PIL import Image
from test_loaders import decode_colour
from tiny_models import tiny_cnn

from dalikd import loaders
from dalikd.cli.main import main
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.plan import resolve_plan


def env() -> dict[str, str]:
    """The environment for subprocesses, read at call time (after conftest's cache isolation)."""
    return {**os.environ, "PYTHONPATH": str(TESTS)}


def test_shards_cover_every_training_sample_once_per_epoch(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=8, n_val=5)  # 24 train = 2 ranks x 3 x 4
    ds = scan_dataset(root)
    cfg = DataConfig(path=str(root), image_size=16, batch_size=4, threads=1)
    shards = [
        loaders.train_loader(
            ds.train, resolve_plan(cfg, device="cpu", seed=11), shard_id=r, num_shards=2
        )  # fmt: skip
        for r in range(2)
    ]
    assert [len(ld) for ld in shards] == [3, 3]
    orders = []
    for _epoch in range(2):
        seen = []
        for ld in shards:
            for batch in ld:
                seen += [
                    (lab, tuple(decode_colour(x)))
                    for x, lab in zip(batch.images, batch.labels.tolist(), strict=True)
                ]
        assert len(seen) == 24 and len(set(seen)) == 24  # all, each once, across the ranks
        orders.append(seen)
    assert orders[0] != orders[1]  # a fresh global shuffle every epoch

    val_counts = Counter()
    for r in range(2):
        val = loaders.val_loader(ds.val, resolve_plan(cfg, device="cpu"), shard_id=r, num_shards=2)
        for batch in val:
            val_counts.update(
                (lab, tuple(decode_colour(x)))
                for x, lab in zip(batch.images, batch.labels.tolist(), strict=True)
            )
    assert sum(val_counts.values()) == 15 and max(val_counts.values()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(solid_dataset, tmp_path):
    teacher = tmp_path / "t.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "dalikd", "train",
         "--data", str(solid_dataset), "--student", "tiny_models:tiny_cnn",
         "--teacher", "tiny_models:tiny_cnn", "--teacher-weights", str(teacher), "--aug", "flip",
         "--epochs", "2", "--image-size", "16", "--batch-size", "4", "--threads", "1",
         "--device", "cpu", "--out", str(run)],
        env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert len(ckpt["dali"]) == 2  # one pipeline state per rank
    assert ckpt["scheduler"]["step"] == 2 * 3  # 24 images / (2 ranks x 4) per epoch
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_torchrun_with_one_process_joins_a_group_and_wraps_ddp(solid_dataset, tmp_path,
                                                                monkeypatch, capsys):  # fmt: skip
    # torchrun --nproc_per_node 1 runs the multi-GPU code path (process group, DDP, collectives)
    # on one device: how benchmarks/gpu_check.py tests NCCL on a single GPU. In-process, gloo.
    import torch.distributed as dist
    from tests_helpers import run_cli

    for k, v in {"TORCHELASTIC_RUN_ID": "t", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["train", "--data", solid_dataset, "--student", "tiny_models:tiny_cnn", "--epochs", "1",
         "--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu",
         "--out", run],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "distributed: 1 rank(s), gloo, DDP" in out + err
    assert not dist.is_initialized()  # the group is left at the end
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    from dalikd import distributed

    assert not distributed.init("cpu").enabled  # WORLD_SIZE=1 alone: no torchrun, no group


def _buffers_worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from dalikd import distributed

    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    ctx = distributed.Dist(rank, 2, rank, "gloo")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ddp = distributed.wrap(ctx, model, "cpu")
    bn = model[1]
    bn.running_mean.fill_(rank + 1.0)  # this rank's own statistics
    ddp.eval()
    ddp(torch.zeros(2, 3, 8, 8)).sum().backward()  # DDP's forward: no buffer broadcast
    kept = bn.running_mean.tolist()
    distributed.average_buffers(ctx, model)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(
        {"kept": kept, "averaged": bn.running_mean.tolist(),
         "batches": int(bn.num_batches_tracked)}))  # fmt: skip
    dist.destroy_process_group()


def test_ddp_leaves_each_ranks_batchnorm_statistics_until_they_are_averaged(tmp_path):
    # DDP's per-forward buffer broadcast between the step's two student passes fails backward
    # on torch < 2.14 (distributed.wrap); the statistics are averaged before val and saves.
    torch.multiprocessing.spawn(_buffers_worker, args=(str(tmp_path),), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["kept"] for g in got] == [[1.0] * 4, [2.0] * 4]
    assert [g["averaged"] for g in got] == [[1.5] * 4, [1.5] * 4]
    assert [g["batches"] for g in got] == [0, 0]


# -- exact resume ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (24, 28, 3), np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    teacher = root / "teacher.pt"
    torch.save(tiny_cnn(3).state_dict(), teacher)
    return root


def train_args(data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "dalikd", "train", "--data", str(data),
        "--student", "tiny_models:slow_cnn", "--teacher", "tiny_models:tiny_cnn",
        "--teacher-weights", str(data / "teacher.pt"), "--aug", "flip", "--epochs", "2",
        "--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu",
        "--seed", "3", "--ckpt-every", "2", "--lr", "0.05", "--out", str(out),
    ]  # fmt: skip


def final_weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(noise_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    proc = subprocess.run(
        train_args(noise_dataset, run), env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def start_and_signal(noise_dataset, run, sig) -> subprocess.Popen:
    """Start a run; send ``sig`` once a mid-epoch checkpoint of epoch 1 exists."""
    proc = subprocess.Popen(
        train_args(noise_dataset, run),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        last = run / "last.pt"
        if last.is_file():
            ckpt = torch.load(last, weights_only=True)
            if ckpt["step_in_epoch"] > 0:
                break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("no mid-epoch checkpoint appeared")
    proc.send_signal(sig)
    return proc


def resume(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dalikd", "train", "--resume", str(run)],
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(
    noise_dataset, uninterrupted, tmp_path
):
    run = tmp_path / "run"
    proc = start_and_signal(noise_dataset, run, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = resume(run)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = final_weights(uninterrupted), final_weights(run)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for a, b in zip(records, reference, strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_checkpoints_and_says_how_to_resume(
    noise_dataset, uninterrupted, tmp_path, sig
):
    run = tmp_path / "run"
    proc = start_and_signal(noise_dataset, run, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in err
    assert f"continue with: dalikd train --resume {run}" in err
    assert "Traceback" not in err
    done = resume(run)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = final_weights(uninterrupted), final_weights(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


# -- guards ------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_the_step(solid_dataset, tmp_path, tiny_env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(solid_dataset), "--student", "tiny_models:tiny_cnn",
              "--lr", "1e30", "--epochs", "3", "--image-size", "16", "--batch-size", "4",
              "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "r"),
              "--ckpt-every", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert any(m in err for m in ("became non-finite by step", "loss is nan at", "loss is inf at"))
    assert len(err.strip().splitlines()) == 1
    last = tmp_path / "r" / "last.pt"
    if last.is_file():  # whatever was saved before the stop is finite
        state = torch.load(last, weights_only=True)["model"]
        assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_out_of_memory_names_the_batch_size(solid_dataset, tmp_path, tiny_env, capsys, monkeypatch):
    def explode(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("dalikd.step.Distiller.__call__", explode)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(solid_dataset), "--student", "tiny_models:tiny_cnn",
              "--epochs", "1", "--image-size", "16", "--batch-size", "4", "--threads", "1",
              "--device", "cpu", "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "out of memory at --batch-size 4" in err and "lower --batch-size" in err

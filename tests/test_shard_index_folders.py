"""The index folders a shard set's ShardSource writes its loaders' index files to: under
$DALIKD_CACHE/shard-index/, removed with the source, and those of a run killed by SIGKILL (whose
finalizers never ran) removed by the next source made, so requeued runs do not pile them up."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import make_dataset

from dalikd.recovery.shards import ShardSource, index_folder, sweep_index_folders
from dalikd.shards import shard_split
from dalikd.shardwrite import shard_dataset

KILLED = """
import os, signal, sys
from dalikd.recovery.shards import ShardSource
from dalikd.shards import shard_split
source = ShardSource(shard_split(sys.argv[1], "train"))
source.subset([0, 1, 2])
print(source._root, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("index")
    make_dataset(root / "src", n_train=2, n_val=1)
    shard_dataset(root / "src", root / "out", shard_size=8 << 10)
    return root / "out"


def everything(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def test_a_killed_runs_index_folders_are_removed_by_the_next_source(shards, tmp_path, monkeypatch):
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "DALIKD_CACHE": str(cache), "TMPDIR": str(tmp)}
    killed = subprocess.run([sys.executable, "-c", KILLED, str(shards)], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    left = Path(killed.stdout.strip())
    assert any(left.iterdir()), "the killed source had written index files"
    assert everything(tmp) == set(), "nothing in the temporary folder: it piles up at scale"
    monkeypatch.setenv("DALIKD_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    source = ShardSource(shard_split(shards, "train"))
    assert not left.exists()
    mine = source._root.relative_to(cache / "shard-index")
    assert everything(cache / "shard-index") == {str(mine), f"{mine}.lock"}
    source.subset([1])
    del source
    assert everything(cache / "shard-index") == set()
    assert everything(tmp) == set()


def test_a_sweep_keeps_live_folders_and_removes_dead_and_orphaned_ones(tmp_path):
    base = tmp_path / "shard-index"
    live, lock = index_folder(base)
    assert lock is not None and live.parent == base
    (live / "000001").mkdir()
    dead = base / "123-dead"  # a killed run's: its lock file there, held by no one
    (dead / "000001").mkdir(parents=True)
    Path(f"{dead}.lock").touch()
    orphan = base / "456-orphan"  # a folder whose lock file is gone
    orphan.mkdir()
    assert sorted(sweep_index_folders(base)) == sorted([dead, orphan])
    assert everything(base) == {live.name, f"{live.name}.lock", f"{live.name}/000001"}
    other, other_lock = index_folder(base)  # a second live source: the first one stays
    assert live.exists() and other.exists() and other != live
    os.close(other_lock)  # its process "dies": the next sweep removes it, not the live one
    assert sweep_index_folders(base) == [other]
    assert live.exists()
    os.close(lock)


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    folder, lock = index_folder(blocker / "shard-index")
    assert lock is None and folder.parent == tmp_path and folder.is_dir()

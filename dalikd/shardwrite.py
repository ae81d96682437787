"""``dalikd data shard``: an ImageNet-style folder written as tar shards in the WebDataset
layout (:mod:`dalikd.shards` describes it), atomically and resumably. No DALI here.

Each shard and its index file are written to temporary names, synced and renamed; the manifest
is written last, so a killed run leaves no manifest claiming shards that are not there. A
journal (``OUT/.dalikd-shard.json``) records the run's plan (a digest of the files, their
order and cut, and the settings) and each finished shard's checksums: a rerun keeps those
shards whose files still match, and starts over when the plan changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dalikd.data import Dataset, scan_dataset, train_listing
from dalikd.errors import DalikdError
from dalikd.manifest import Manifest, Shard, SplitInfo, read_manifest, write_manifest
from dalikd.shards import (
    BLOCK,
    INDEX_VERSION,
    SPLITS,
    GiB,
    Progress,
    file_sha256,
    index_line,
    index_name,
    padded,
    sample_members,
    sample_tar_bytes,
    shard_name,
    tar_header,
)

JOURNAL = ".dalikd-shard.json"  # a run in progress: its plan and the shards it finished
WRITE_FORMAT = 1  # bumped when the bytes written for the same plan change
_SHARD_FILE = re.compile(r"^(train|val)-\d{5}\.(tar|idx)$")
# temporary files of a killed run: a shard, an index file, the journal, the manifest, as
# dalikd.atomic names them (.NAME.PID.RANDOM.tmp), or as older versions did (.NAME.tmp)
_TEMP_FILE = re.compile(r"^\.?(\.(train|val)-\d{5}\.(tar|idx)|\.dalikd-shard\.json|"
                        r"dataset\.json)(\.\d+\.[0-9a-f]{8})?\.tmp$")  # fmt: skip


# -- planning -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    path: str
    label: int
    size: int
    mtime_ns: int


def _items(dataset: Dataset, split: str, report: Progress) -> list[Item]:
    found = getattr(dataset, split)
    items = []
    for path, label in zip(found.files, found.labels, strict=True):
        try:
            st = os.stat(path)
        except OSError as e:
            raise DalikdError(f"cannot read {path}: {e.strerror}") from None
        items.append(Item(path, label, st.st_size, st.st_mtime_ns))
        if len(items) % 10_000 == 0 or len(items) == len(found):
            report(f"sizes of {split}", len(items), len(found))
    return items


def plan_split(items: list[Item], split: str, shard_size: int, seed: int) -> list[list[Item]]:
    """The split's items shuffled once with ``seed``, cut into shards of at most
    ``shard_size`` bytes (at least one sample each)."""
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(items))
    shards: list[list[Item]] = []
    size = 0
    for i in order.tolist():
        add = sample_tar_bytes(items[i].size)
        if not shards or size + add + 2 * BLOCK > shard_size:  # 2 blocks: the end of archive
            shards.append([])
            size = 0
        shards[-1].append(items[i])
        size += add
    return shards


def _plan_digest(root: Path, plans: dict[str, list[list[Item]]], classes, seed, shard_size) -> str:
    """What the bytes of the shards depend on: the files (relative path, label, size, mtime),
    their order and cut, the classes, and the writer's format."""
    h = hashlib.sha256(json.dumps([WRITE_FORMAT, list(classes), seed, shard_size]).encode())
    for split, shards in plans.items():
        for i, shard in enumerate(shards):
            h.update(f"{split} {i}\n".encode())
            for it in shard:
                line = f"{os.path.relpath(it.path, root)}\t{it.label}\t{it.size}\t{it.mtime_ns}\n"
                h.update(line.encode(errors="surrogateescape"))
    return h.hexdigest()


def listing_digest(dataset: Dataset, splits: tuple[str, ...]) -> str:
    """sha256 of the classes and of each split's files (relative path, label) in listing order:
    a copy of the folder elsewhere has the same digest."""
    h = hashlib.sha256(("\n".join(dataset.classes) + "\n").encode())
    for split in splits:
        found = getattr(dataset, split)
        h.update(f"[{split}]\n".encode())
        for path, label in zip(found.files, found.labels, strict=True):
            line = f"{os.path.relpath(path, dataset.root)}\t{label}\n"
            h.update(line.encode(errors="surrogateescape"))
    return h.hexdigest()


# -- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardResult:
    out: Path
    manifest: Manifest
    written: tuple[str, ...]  # shard files written by this run
    reused: tuple[str, ...]  # shard files a killed run had finished, their checksums verified
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of the files the scan left out
    restarted: bool  # a partial run of other files or settings was found and discarded


def shard_dataset(
    source: str | Path,
    out: str | Path,
    *,
    shard_size: int = GiB,
    splits: tuple[str, ...] | None = None,
    seed: int = 0,
    cache: bool = True,
    progress: Progress | None = None,
    note: Callable[[str], None] | None = None,
) -> ShardResult:
    """Write the ImageNet-style folder ``source`` as tar shards in ``out`` (see the module
    docstring for the layout), the manifest last.

    ``splits``: default the ones ``source`` has. The data scan runs first (its bad files are
    left out and returned). ``out`` must be new, empty, or a killed run's: a rerun keeps the
    shards that run finished when their checksums still match its journal, and starts over
    when the source files or the settings changed. ``progress(phase, done, total)``; ``note``
    hears, before the writing, whether a killed run is continued or discarded.
    """
    report = progress or (lambda phase, done, total: None)
    root = Path(source).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    splits = splits or tuple(s for s in SPLITS if (root / s).is_dir()) or SPLITS
    origin = _source_manifest(root)
    _check_out_outside(out, root)
    dataset = scan_dataset(
        root, splits=splits, cache=cache, progress=lambda d, t: report("checking files", d, t)
    )
    plans = {s: plan_split(_items(dataset, s, report), s, shard_size, seed) for s in splits}
    journal, restarted = _prepare_out(
        out, root, _plan_digest(root, plans, dataset.classes, seed, shard_size)
    )
    if restarted and note:
        note("a killed run of other files or settings was found and discarded: writing every "
             "shard again")  # fmt: skip
    elif journal["done"] and note:
        note(f"continuing a killed run: checking the {len(journal['done'])} shard(s) it "
             "finished, writing the rest")  # fmt: skip
    total = sum(len(getattr(dataset, s)) for s in splits)
    done, written, reused, infos = 0, [], [], {}
    report("writing shards", 0, total)
    for split in splits:
        number, shards = 0, []
        for i, items in enumerate(plans[split]):
            name = shard_name(split, i)
            record = journal["done"].get(name)
            if _reusable(out, name, record, len(items)):
                reused.append(name)
            else:
                record = _write_shard(
                    out, name, items, number,
                    lambda k, base=done: report("writing shards", base + k, total),
                )  # fmt: skip
                journal["done"][name] = record
                _write_journal(out, journal)
                written.append(name)
            shards.append(Shard(name, record["samples"], record["bytes"], record["sha256"]))
            number += len(items)
            done += len(items)
            report("writing shards", done, total)
        labels = getattr(dataset, split).labels
        per_class = np.bincount(np.asarray(labels, int), minlength=dataset.num_classes)
        infos[split] = SplitInfo(number, tuple(per_class.tolist()), tuple(shards))
    manifest = Manifest(
        name=origin.name if origin else root.name,
        layout="shards",
        codec="encoded",
        classes=_classes(origin, dataset),
        splits=infos,
        data_defaults=dict(origin.data_defaults) if origin else {},
        source=_source_info(root, dataset, splits, seed, shard_size),
    )
    write_manifest(manifest, out)
    (out / JOURNAL).unlink(missing_ok=True)
    return ShardResult(out, manifest, tuple(written), tuple(reused), dataset.skipped, restarted)


def _source_manifest(root: Path) -> Manifest | None:
    origin = read_manifest(root) if root.is_dir() else None
    if origin is not None and origin.layout == "shards":
        raise DalikdError(f"{root} is a shard set already; shard an ImageNet-style folder")
    if origin is not None and origin.codec != "encoded":
        raise DalikdError(
            f"{root} holds {origin.codec} pixels (its dataset.json); shards hold encoded "
            "images (JPEG, PNG, ...) that DALI decodes"
        )
    return origin


def _classes(origin: Manifest | None, dataset: Dataset) -> tuple[str, ...]:
    """The source manifest's class names where it has one per class folder (an imported
    dataset's folders may be "007_name"), else the folder names."""
    if origin is not None and len(origin.classes) == dataset.num_classes:
        return tuple(origin.classes)
    return dataset.classes


def _source_info(root: Path, dataset: Dataset, splits, seed: int, shard_size: int) -> dict:
    info: dict[str, Any] = {
        "folder": str(root),
        "listing_sha256": listing_digest(dataset, splits),
        "left_out": len(dataset.skipped),
        "seed": seed,
        "shard_size": shard_size,
    }
    if "train" in splits:
        info["train_listing"] = train_listing(dataset)
    return info


def _check_out_outside(out: Path, root: Path) -> None:
    for split in SPLITS:
        if out == root / split or (root / split) in out.parents:
            raise DalikdError(f"{out} is inside the dataset's {split}/ folder; write elsewhere")


def _read_source(item: Item) -> bytes:
    try:
        with open(item.path, "rb") as f:
            image = f.read()
    except OSError as e:
        raise DalikdError(f"cannot read {item.path}: {e.strerror}") from None
    if len(image) != item.size:
        raise DalikdError(f"{item.path} changed while it was being sharded; run again")
    return image


def _write_shard(
    out: Path, name: str, items: list[Item], first: int, on_sample: Callable[[int], None]
) -> dict[str, Any]:
    """Write shard ``name`` (samples ``first``..), then its index file, each through
    dalikd.atomic (a fresh temporary name, never a link followed, synced, renamed into place;
    a full disk named as such). Returns its journal record."""
    from dalikd.atomic import write_atomic, write_text_atomic

    idx = index_name(name)
    digest, lines, size = hashlib.sha256(), [], [0]

    def write_tar(f: Any) -> None:
        offset = 0
        for j, item in enumerate(items):
            image = _read_source(item)
            try:
                members = sample_members(first + j, item.label, image)
            except ValueError:
                raise DalikdError(f"{item.path} changed while it was being sharded") from None
            entry = []
            for ext, member, data in members:
                block = tar_header(member, len(data)) + data.ljust(padded(len(data)), b"\0")
                f.write(block)
                digest.update(block)
                entry.append((ext, offset + BLOCK, len(data), member))
                offset += len(block)
            lines.append(index_line(entry))
            on_sample(j + 1)  # samples of this shard written
        end = bytes(2 * BLOCK)  # tar's end of archive
        f.write(end)
        digest.update(end)
        size[0] = offset + len(end)

    write_atomic(out / name, write_tar)
    index = f"{INDEX_VERSION} {len(items)}\n" + "".join(line + "\n" for line in lines)
    write_text_atomic(index, out / idx)
    return {"samples": len(items), "bytes": size[0], "sha256": digest.hexdigest(),
            "index_sha256": hashlib.sha256(index.encode()).hexdigest()}  # fmt: skip


def _reusable(out: Path, name: str, record: dict | None, samples: int) -> bool:
    """Whether a killed run's shard ``name`` (journal ``record``) is whole: both files there,
    the samples planned now, and both checksums as the journal recorded them."""
    if record is None or record.get("samples") != samples:
        return False
    tar, idx = out / name, out / index_name(name)
    try:
        return (
            tar.stat().st_size == record["bytes"]
            and file_sha256(tar) == record["sha256"]
            and file_sha256(idx) == record["index_sha256"]
        )
    except (OSError, KeyError):
        return False


# -- the output folder and the journal of a run in progress -------------------------------------


def _prepare_out(out: Path, root: Path, plan: str) -> tuple[dict[str, Any], bool]:
    """Make ``out`` ready: new or empty, or a killed run's (its journal says which source and
    plan). Returns the journal to continue and whether a run of another plan was discarded."""
    from dalikd.manifest import manifest_path

    if out.exists() and not out.is_dir():
        raise DalikdError(f"{out} is a file; the shards need a folder")
    if manifest_path(out).exists():
        raise DalikdError(
            f"{out} already holds a dataset (dataset.json); shard into a new folder, or check "
            f"this one with: dalikd check-data {out}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        names = sorted(os.listdir(out))
    except OSError as e:
        raise DalikdError(f"cannot create {out}: {e.strerror}") from None
    journal = _read_journal(out)
    foreign = [n for n in names if n != JOURNAL and not _SHARD_FILE.match(n)
               and not _TEMP_FILE.match(n)]  # fmt: skip
    if names and (journal is None or foreign):
        raise DalikdError(
            f"{out} is not empty and is no killed `dalikd data shard` run (it holds "
            f"{(foreign or names)[0]}); choose a new or empty folder"
        )
    if journal is not None and journal.get("source") != str(root):
        raise DalikdError(
            f"{out} holds a killed run of another source ({journal.get('source')}); remove it "
            "or choose another folder"
        )
    for n in names:
        if _TEMP_FILE.match(n):
            (out / n).unlink()
    restarted = journal is not None and journal.get("plan") != plan
    if restarted:  # the source files or the settings changed: none of its shards fits
        for n in names:
            if _SHARD_FILE.match(n):
                (out / n).unlink()
    if journal is None or restarted:
        journal = {"format": WRITE_FORMAT, "source": str(root), "plan": plan, "done": {}}
        _write_journal(out, journal)
    return journal, restarted


def _read_journal(out: Path) -> dict[str, Any] | None:
    path = out / JOURNAL
    if not path.exists():
        return None
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(journal, dict) or not isinstance(journal.get("done"), dict):
            raise ValueError("not a journal")
    except (OSError, ValueError) as e:
        raise DalikdError(f"cannot read {path} ({e}); remove {out} and run again") from None
    return journal


def _write_journal(out: Path, journal: dict[str, Any]) -> None:
    from dalikd.atomic import write_text_atomic

    write_text_atomic(json.dumps(journal, indent=1) + "\n", out / JOURNAL)

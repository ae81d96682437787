"""`dalikd data shard` and check-data's report for a shard set (thin adapters to
:mod:`dalikd.shardwrite` and :mod:`dalikd.shardcheck`)."""

from __future__ import annotations

from typing import Any

import click

from dalikd.cli.report import LiveBar, console
from dalikd.errors import DalikdError


class PhaseProgress(LiveBar):
    """One bar per phase of a ``progress(phase, done, total)`` callback."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = ""

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self._new_bar(phase, total)
            self._phase = phase
        self._progress.update(self._task, completed=done, total=total)


def _size(ctx: Any, param: Any, value: str) -> int:
    from dalikd.shards import parse_size

    try:
        return parse_size(value)
    except DalikdError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--shard-size", default="1GiB", show_default=True, callback=_size,
    help="largest shard (KiB/MiB/GiB powers of 1024, KB/MB/GB of 1000)",
)  # fmt: skip
@click.option(
    "--split", "split", type=click.Choice(["train", "val"]), default=None,
    help="shard this split only (default: the splits SOURCE has)",
)  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the one shuffle")
@click.option("--no-cache", is_flag=True, help="check every file again, ignoring the scan cache")
def shard(source: str, out: str, shard_size: int, split: str | None, seed: int, no_cache: bool):
    """Write a folder as tar shards (WebDataset layout) with DALI's index files.

    SOURCE is an ImageNet-style folder (SOURCE/train/<class>/*, SOURCE/val/<class>/*); OUT
    gets train-NNNNN.tar and val-NNNNN.tar, an .idx beside each, and dataset.json last. The
    data scan runs first: its bad files are listed and left out. Samples are shuffled once
    with --seed. A killed run is continued by the same command: finished shards whose
    checksums match are kept. See docs/shards.md.
    """
    from dalikd.shardwrite import shard_dataset

    with PhaseProgress() as progress:
        result = shard_dataset(
            source, out, shard_size=shard_size, splits=(split,) if split else None, seed=seed,
            cache=not no_cache, progress=progress.update,
            note=lambda line: console.print(line, soft_wrap=True, markup=False),
        )  # fmt: skip
    for path, reason in result.skipped:
        console.print(f"left out: {path}  ({reason})", soft_wrap=True, markup=False)
    if result.reused:
        console.print(
            f"kept {len(result.reused)} shard(s) a killed run had finished (checksums match): "
            f"{', '.join(result.reused)}",
            soft_wrap=True,
            markup=False,
        )
    splits = ", ".join(
        f"{name} {info.samples:,} samples in {len(info.shards)} shard(s)"
        for name, info in result.manifest.splits.items()
    )
    console.print(
        f"{result.out}: {splits}; {len(result.manifest.classes)} classes, "
        f"{len(result.skipped)} file(s) left out",
        soft_wrap=True,
        markup=False,
    )


def check_shards(folder: str, decode: bool) -> None:
    """check-data for a shard set: one line per damaged shard, then a summary; a damaged set
    ends with one error line naming its first problem."""
    from dalikd.shardcheck import check_shard_set
    from dalikd.shards import shard_set_of

    found = shard_set_of(folder)
    if found is not None and found[1]:  # a glob: its shards' set, whole (counts are per split)
        folder = str(found[0])
        console.print(f"checking the whole shard set {folder} (a glob picks shards of it)",
                      soft_wrap=True, markup=False)  # fmt: skip
    with PhaseProgress() as progress:
        result = check_shard_set(folder, decode=decode, progress=progress.update)
    if len(result.problems) > 1:
        for line in result.problems:
            console.print(f"damaged: {line}", soft_wrap=True, markup=False)
    if result.problems:
        n = len(result.problems)
        raise DalikdError(result.problems[0] + (f" ({n} problems, listed above)" if n > 1 else ""))
    splits = ", ".join(f"{n:,} {split}" for split, n in result.samples.items())
    decoded = ", every image decoded" if decode else ""
    console.print(
        f"{result.folder}: shard set ok: {result.shards} shards with their index files, "
        f"{splits} samples, {len(result.manifest.classes)} classes{decoded}",
        soft_wrap=True,
        markup=False,
    )

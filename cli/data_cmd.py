"""`dalikd data ...`: commands that make datasets (import official archives, shard a folder)."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.progress import TextColumn

from dalikd.cli.report import LiveBar, console
from dalikd.cli.shard_cmd import shard


@click.group()
def data() -> None:
    """Make datasets dalikd reads: import official archives, shard a folder.

    See docs/datasets.md and docs/shards.md.
    """


class ImportProgress(LiveBar):
    """Implements dalikd.dataimport.ImportReporter: one bar per phase (checksum, read, write)."""

    def __init__(self) -> None:
        super().__init__(TextColumn(""))
        self._phase = ""

    def progress(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self._phase = phase
            self._new_bar(escape(phase), total)
        self._progress.update(self._task, completed=done)

    def message(self, text: str) -> None:
        self._progress.console.print(text, soft_wrap=True, markup=False)


@data.command(name="import")
@click.argument("dataset", type=click.Choice(("cifar100", "cifar10", "tiny-imagenet")))
@click.argument("archive", type=click.Path())
@click.argument("out", type=click.Path())
def import_cmd(dataset: str, archive: str, out: str) -> None:
    """Import DATASET's official ARCHIVE into the new or empty folder OUT.

    \b
    cifar100       cifar-100-python.tar.gz  (fine labels, the meta file's names)
    cifar10        cifar-10-python.tar.gz
    tiny-imagenet  tiny-imagenet-200.zip    (train and val; classes: sorted wnids)

    OUT gets train/<class>/*.hwc and val/<class>/*.hwc (each file an image's uint8 pixels,
    height x width x RGB, no header) and dataset.json: the classes, the counts, the archive's
    checksum and the dataset's own data settings (image size, pad-crop base view, mean/std,
    validation without resize). Written beside OUT first and renamed at the end: an
    interrupted import leaves nothing at OUT.
    """
    from dalikd.dataimport import import_dataset

    with ImportProgress() as progress:
        manifest = import_dataset(dataset, archive, out, progress)
    shape = "×".join(str(v) for v in manifest.image_shape or ())
    counts = ", ".join(f"{s.samples:,} {name}" for name, s in manifest.splits.items())
    console.print(
        f"imported {manifest.name} into {out}: {counts} images, {len(manifest.classes)} "
        f"classes, raw {shape} uint8 per file",
        soft_wrap=True,
        markup=False,
    )


data.add_command(shard)

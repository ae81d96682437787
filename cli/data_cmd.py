"""`dalikd data`: commands that make datasets (a thin group; each command has its own module)."""

from __future__ import annotations

import click

from dalikd.cli.shard_cmd import shard


@click.group()
def data() -> None:
    """Make datasets: tar shards of a folder (shard)."""


data.add_command(shard)

"""`dalikd plot`: the training curves of runs, overlaid in one PNG."""

from __future__ import annotations

import click

from dalikd.cli.report import console


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out",
    default="curves.png",
    show_default=True,
    type=click.Path(),
    help="PNG to write (*.png; missing folders are made)",
)
def plot(run_dirs: tuple[str, ...], out: str) -> None:
    """Train/val loss, val top-1, lr and T. stddev per epoch of each RUN_DIR (its
    metrics.jsonl), overlaid and named by directory."""
    from dalikd.plots import write_curves

    console.print(f"curves: {write_curves(list(run_dirs), out)}", markup=False, soft_wrap=True)

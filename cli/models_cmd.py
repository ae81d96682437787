"""`dalikd models`: the CIFAR model zoo (cifar:NAME), its sizes and the paper's pairs."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON (one object a model)")
def models(as_json: bool) -> None:
    """List the CIFAR models for --teacher/--student cifar:NAME: parameters at 100 classes,
    the paper's teacher/student pairs each is in, and the reference file it follows. Their
    weights keys are the reference's: a CRD checkpoint (ckpt_epoch_240.pth) loads as it is.
    torchvision names and timm:NAME work as well (see torchvision.models.list_models())."""
    from rich.table import Table

    from dalikd.cifar_models import listing
    from dalikd.cli.report import print_table

    rows = listing(num_classes=100)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table = Table(title="CIFAR models (--teacher/--student NAME); parameters at 100 classes")
    for col, justify in (("name", "left"), ("parameters", "right"), ("paper pairs", "left"),
                         ("reference file", "left")):  # fmt: skip
        table.add_column(col, justify=justify, style="bold" if col == "name" else None)
    for r in rows:
        pairs = [f"teacher of {', '.join(r['teacher_of'])}"] if r["teacher_of"] else []
        pairs += [f"student of {', '.join(r['student_of'])}"] if r["student_of"] else []
        table.add_row(r["name"], f"{r['params']:,}", "; ".join(pairs), r["source"])
    print_table(table)

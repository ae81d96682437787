"""`dalikd doctor`: versions, CUDA, and the native mixing operator's state (a thin adapter)."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def doctor(as_json: bool) -> None:
    """Report versions (Python, torch, torchvision, DALI), CUDA, whether the native operators
    are built and loaded (CPU, GPU), and which mixing and resize path each device uses. Builds
    them on first use (about half a minute), as training would."""
    from rich.markup import escape
    from rich.table import Table

    from dalikd.cli.report import console
    from dalikd.doctor import report

    info = report()
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    cuda = "yes: " + ", ".join(info["cuda_devices"]) if info["cuda_available"] else "no"
    rows = [
        ("python", info["python"]),
        ("torch", info["torch"]),
        ("torchvision", info["torchvision"]),
        ("DALI", f"{info['dali']} (CUDA build {info['dali_cuda']})"),
        ("CUDA (torch)", cuda),
        ("DALIKD_NATIVE", info["native_mode"]),
    ]
    native = info["native"] or {}
    rows += [(f"native {k}", str(v)) for k, v in native.items() if v not in ("", None)]
    rows += [(f"mixing on {device}", path) for device, path in info["mixing"].items()]
    rows += [(f"resize on {device}", path) for device, path in info["resize"].items()]
    for name, value in rows:
        table.add_row(name, escape(value))
    console.print(table)

"""`dalikd doctor`: versions, CUDA, and the native mixing operator's state (a thin adapter)."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.option(
    "--build",
    "build_only",
    is_flag=True,
    help="only build the native operators (or confirm the cached build), run the GPU backend "
    "once on this machine's GPU if one is visible (the pass is recorded), and say what was built; "
    "exit 1 if the CPU operators could not be built. Run it once before many ranks start.",
)
def doctor(as_json: bool, build_only: bool) -> None:
    """Report versions (Python, torch, torchvision, DALI), CUDA, whether the native operators
    (mixing, resize) are built and loaded (CPU, GPU), whether the mixing GPU backend ran
    correctly on this GPU ("GPU backend: verified on <GPU>", or why not), and which mixing and
    resize path each device uses. Builds them on first use (10-40 s), as training
    would."""
    from rich.markup import escape
    from rich.table import Table

    from dalikd.cli.report import print_table
    from dalikd.doctor import build_native, report
    from dalikd.errors import DalikdError

    if build_only:
        built = build_native()
        if as_json:
            click.echo(json.dumps(built, indent=1))
        else:
            folder = built["folder"]
            click.echo(f"native operator: {'cached' if built['cached'] else 'built'} in {folder}")
            cpu, gpu = built["cpu_library"], built["gpu_library"]
            click.echo(f"CPU operator: {cpu or 'not built: ' + built['cpu_error']}")
            click.echo(f"GPU operator: {gpu or 'not built: ' + built['gpu_error']}")
            if built["retry"]:
                click.echo(f"retry: {built['retry']}")
            click.echo(f"GPU backend: {built['gpu_backend']}")
        if not built["cpu_library"]:
            raise DalikdError(f"the native CPU operator could not be built: {built['cpu_error']}")
        return
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
    rows.append(("GPU backend", info["gpu_backend"]))
    rows += [(f"mixing on {device}", path) for device, path in info["mixing"].items()]
    rows += [(f"resize on {device}", path) for device, path in info["resize"].items()]
    for name, value in rows:
        table.add_row(name, escape(value))
    print_table(table)

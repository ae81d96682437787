"""`dalikd profile`: options -> dalikd.profile.run_profile -> rich tables, JSON, PNG."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dalikd.cli.options import MODEL_HELP, device_option, mixing_option, threads_option
from dalikd.cli.report import print_table

console = Console(highlight=False)


@click.command()
@click.option("--data", required=True, type=click.Path(), help="dataset or shard set: train split")
@click.option(
    "--aug",
    "augs",
    default="all",
    show_default=True,
    help="comma-separated schemes (names, a+b, file.py:function); all = every built-in recipe "
    "and the CutMixPick pool. Plain KD (none) is always measured",
)
@device_option
@click.option("--batch-size", default=32, show_default=True, type=int, help="samples per batch")
@threads_option("DALI threads, and torchvision workers (0: one per core, at most 8)")
@click.option("--image-size", type=int, help="px, square side  [default: the dataset's, else 224]")
@click.option(
    "--teacher", default="", help=f"teacher model ({MODEL_HELP}), random weights; optional"
)
@click.option(
    "--student",
    default="",
    help=f"student model ({MODEL_HELP}); without it no model stages are timed",
)
@click.option(
    "--baseline", type=click.Choice(["torchvision", "none"]), default="torchvision",
    show_default=True, help="what the DALI hand-off is compared with",
)  # fmt: skip
@mixing_option
@click.option(
    "--antialias/--no-antialias",
    default=True,
    show_default=True,
    help="antialiased resize (torchvision's quality); --no-antialias is faster, not comparable",
)
@click.option(
    "--pool-size", "--pool", "pool_size", default=2, show_default=True, type=int,
    help="CutMixPick candidates per image, k (--pool: the old name)",
)  # fmt: skip
@click.option("--windows", default=5, show_default=True, type=int, help="timed windows per stage")
@click.option(
    "--window-seconds", default=1.0, show_default=True, type=float, help="min length of a window"
)
@click.option("--warmup", default=3, show_default=True, type=int, help="untimed batches first")
@click.option(
    "--json", "json_out", type=click.Path(), help="write the report as JSON here (folders made)"
)
@click.option("--plot", type=click.Path(), help="write a bar chart here (*.png; folders made)")
def profile(json_out: str | None, plot: str | None, **options: Any) -> None:
    """Images/s of every stage of the data path and the KD step, against torchvision."""
    from dalikd.atomic import write_text_atomic
    from dalikd.outputs import output_file
    from dalikd.profile import ProfileConfig, check, run_profile, write_plot

    cfg = ProfileConfig(**options)
    check(cfg)  # user mistakes first, as one line, before minutes of measuring
    json_path = output_file(json_out, "--json") if json_out else None
    plot_path = output_file(plot, "--plot", (".png",)) if plot else None
    with console.status("profiling") as status:
        report = run_profile(cfg, progress=lambda stage: status.update(f"timing {stage}"))
    print_report(report)
    if json_path:
        write_text_atomic(json.dumps(report, indent=2) + "\n", json_path)
        console.print(f"JSON: {json_path}", markup=False)
    if plot_path:
        console.print(f"plot: {write_plot(report, plot_path)}", markup=False)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(report: dict[str, Any]) -> None:
    ds = report["dataset"]
    console.print(
        f"[bold]dalikd profile[/]: {report['device']}, {report['cpu_count']} cores, "
        f"{report['threads']} DALI threads (= torchvision workers), batch {report['batch_size']}, "
        f"{report['image_size']} px, {'antialiased' if report['antialias'] else 'NON-antialiased'}"
        f" resize; {ds['train_images']} images, {ds['mean_file_kb']} KB mean; mixing: "
        f"{report['mixing']}; resize: {report['resize']}"
    )
    bounds: dict[str, list[str]] = {}
    for aug, b in report["bound"].items():
        bounds.setdefault(b["stage"], []).append(aug)
    table = Table(title="stages (samples/s: B per batch; medians of timed windows)")
    table.add_column("stage")
    table.add_column("samples/s", justify="right")
    table.add_column("own ms/sample", justify="right")
    table.add_column("CPU ms/sample", justify="right")
    table.add_column("bounds")
    current = None
    for st in report["stages"]:
        if st["aug"] != current:
            table.add_section()
            current = st["aug"]
            title = "plain pipeline, every scheme" if current is None else f"scheme {current}"
            table.add_row(f"[bold]{title}[/]")
        table.add_row(
            st["name"].removesuffix(f" ({st['aug']})"),
            _rate(st["img_per_s"]),
            _ms(st.get("own_ms_per_img")),
            _ms(st["cpu_ms_per_img"]),
            ", ".join(bounds.get(st["name"], [])),
        )
    print_table(table, console)
    base = {b["aug"]: b for b in report["baseline"]}
    handoff = {st["aug"]: st for st in report["stages"] if st["name"].startswith("hand-off")}
    x_aug = {st["aug"]: st for st in report["stages"] if "vs_plain" in st}
    summary = Table(title="per scheme: DALI -> torch vs torchvision DataLoader, same CPU budget")
    cols = ["scheme", "DALI", "torchvision", "ratio", "CPU ratio", "x' / plain", "(CPU)", "bound"]
    cols += ["KD efficiency"] if report["efficiency"] else []
    for col in cols:
        summary.add_column(col, justify="left" if col in ("scheme", "bound") else "right")
    for aug, b in report["bound"].items():
        row = [
            aug,
            _rate(handoff[aug]["img_per_s"]),
            _rate(base[aug]["img_per_s"]) if aug in base else "-",
            f"{report['ratio'][aug]:.2f}x" if aug in report["ratio"] else "-",
            f"{report['cpu_ratio'][aug]:.2f}x" if aug in report["cpu_ratio"] else "-",
            f"{x_aug[aug]['vs_plain']:.2f}" if aug in x_aug else "-",
            f"{x_aug[aug]['vs_plain_cpu']:.2f}" if "vs_plain_cpu" in x_aug.get(aug, {}) else "-",
            f"{b['stage'].removesuffix(f' ({aug})')}: {b['own_ms_per_img']:.2f} ms",
        ]
        if report["efficiency"]:
            eff = report["efficiency"].get(aug)
            row.append("-" if eff is None else f"{eff:.2f}")
        summary.add_row(*row)
    print_table(summary, console)
    console.print(
        "own ms/sample: what a cumulative DALI stage adds to the one before. ratio: DALI "
        "hand-off / torchvision samples/s, in interleaved windows; CPU ratio: torchvision / "
        "DALI CPU ms per sample (steadier on a shared machine); x' / plain: the scheme's "
        "pipeline rate / the plain pipeline's, same windows, and (CPU) the plain pipeline's "
        "CPU ms per sample / the scheme's. KD efficiency: step fed by the pipeline / the same "
        "step on tensors in memory."
    )
    if report.get("baseline_skipped"):
        console.print(report["baseline_skipped"], markup=False)
    for name, alt in report["alternatives"].items():  # plain KD, same interleaved windows
        label = "timm's training loader (prefetcher)" if name == "timm" else f"dalikd with {name}"
        console.print(
            f"plain KD vs {label}: {_rate(alt['img_per_s'])} samples/s; dalikd "
            f"{alt['dalikd_ratio']:.2f}x"
        )

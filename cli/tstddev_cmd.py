"""`dalikd tstddev`: options -> dalikd.probe.run_probe -> a ranked rich table, JSON, PNG."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.progress import TextColumn
from rich.table import Table

from dalikd.cli.options import (
    MODEL_HELP,
    WEIGHTS_HELP,
    device_option,
    granularity_option,
    mixing_option,
    resize_option,
    seed_option,
    threads_option,
)
from dalikd.cli.report import LiveBar, console, print_table
from dalikd.config import PAPER_AUGS, PickCriterion, Precision, choices

SCHEMES = ",".join(PAPER_AUGS)

# option -> the dotted config key it sets (the probe's settings are a TrainConfig's)
OPTION_KEYS = {
    "data": "data.path", "teacher": "model.teacher", "teacher_weights": "model.teacher_weights",
    "augs": "probe.augs", "epochs": "probe.epochs", "group_steps": "probe.group_steps",
    "batch_size": "data.batch_size", "image_size": "data.image_size",
    "crop_scale": "data.crop_scale", "threads": "data.threads", "mixing": "data.mixing",
    "resize": "data.resize", "device": "device", "precision": "precision",
    "granularity": "kd.granularity", "seed": "seed", "pick_criterion": "kd.pick_criterion",
    "pool_size": "kd.pool_size", "student": "model.student",
    "student_weights": "model.student_weights",
}  # fmt: skip
FLAG_NAMES = {"augs": "--aug", "granularity": "--aug-granularity"}  # not --option-name
_TYPED = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


class ProbeProgress(LiveBar):
    """Implements dalikd.probe.ProbeReporter: one bar per scheme, a line when it ends."""

    def __init__(self) -> None:
        super().__init__(TextColumn("steps"))

    def aug_start(self, aug: str, steps: int) -> None:
        self._new_bar(escape(aug), steps)

    def step(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def aug_end(self, result: Any) -> None:
        self._progress.console.print(
            f"{result.aug}: T. stddev {result.t_stddev:.6f}  mean entropy "
            f"{result.mean_entropy:.4f}  {result.samples:,} samples, {result.groups} groups, "
            f"{result.seconds:.1f} s",
            markup=False,
        )


def _given(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """The options typed on the command line, as dotted config keys: only those override a
    config file or the dataset's own settings (the defaults shown are the probe's own)."""
    given = {}
    for name, key in OPTION_KEYS.items():
        if params[name] is not None and ctx.get_parameter_source(name) in _TYPED:
            given[key] = params[name]
    if "probe.augs" in given:
        given["probe.augs"] = [a for a in given["probe.augs"].split(",") if a.strip()]
    return given


def _pair(ctx: Any, param: Any, value: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected MIN,MAX, got '{value}'") from None
    return low, high


@click.command()
@click.option(
    "--config", "config_file", type=click.Path(),
    help="TOML file of settings ([data], [model], [kd], [probe]: e.g. a paper config); the "
    "flags given override it",
)  # fmt: skip
@click.option("--data", type=click.Path(), help="dataset or shard set: its train split")
@click.option("--teacher", help=f"teacher model: {MODEL_HELP}")
@click.option("--teacher-weights", help=f"teacher weights: {WEIGHTS_HELP}")
@click.option(
    "--aug",
    "augs",
    default=SCHEMES,
    show_default=True,
    help="comma-separated schemes to rank (names, a+b, file.py:function; none = x only)",
)
@click.option(
    "--epochs", type=int, default=None, help="probe length in epochs of train/  [default: 10]"
)
@click.option(
    "--samples",
    type=int,
    default=None,
    help="probe length in images of x instead (rounded up to whole steps)",
)
@click.option(
    "--group-steps",
    type=int,
    default=5,
    show_default=True,
    help="steps of teacher rows per group, the reference's 5 (at batch 64: 640 rows with x', "
    "320 for none)",
)
@click.option("--batch-size", default=64, show_default=True, type=int, help="images per step")
@click.option("--image-size", type=int, help="image side in px  [default: the dataset's, else 224]")
@click.option(
    "--crop-scale",
    default="0.08,1",
    show_default=True,
    callback=_pair,
    help="random-resized-crop area range of x, MIN,MAX (as the training run's)",
)
@threads_option()
@mixing_option
@resize_option
@device_option
@click.option(
    "--precision",
    type=click.Choice(choices(Precision)),
    default="auto",
    show_default=True,
    help="teacher autocast (auto: bf16 on GPU, fp32 on CPU)",
)
@granularity_option()
@seed_option
@click.option(
    "--pick-criterion",
    type=click.Choice(choices(PickCriterion)),
    default="teacher_entropy",
    show_default=True,
    help="what the pick of a pool recipe (cutmixpick) keeps the highest of",
)
@click.option(
    "--pool-size", default=2, show_default=True, type=int, help="candidates per image in a pool"
)
@click.option(
    "--student", default="", help=f"student model, for student-based pick criteria: {MODEL_HELP}"
)
@click.option("--student-weights", default="", help=f"the student's weights: {WEIGHTS_HELP}")
@click.option(
    "--json", "json_out", type=click.Path(), help="write the ranked results here (folders made)"
)
@click.option("--plot", type=click.Path(), help="write a bar chart here (*.png; folders made)")
def tstddev(config_file, samples, json_out, plot, **params) -> None:
    """Rank augmentation schemes by the teacher's T. stddev (lowest = best for KD first).

    The frozen teacher sees x and x' of each scheme's training batches; nothing is trained.
    Settings: the defaults shown < the dataset's own (DATA/dataset.json) < --config < the flags
    given (a paper config holds the reference's probe: --config configs/paper/...).
    """
    from dalikd.errors import DalikdError
    from dalikd.outputs import output_file
    from dalikd.probe import probe_config, run_probe, write_json, write_plot

    if params["epochs"] is not None and samples is not None:
        raise DalikdError("give --epochs or --samples, not both")
    for flag, value in (("--epochs", params["epochs"]), ("--samples", samples)):
        if value is not None and value <= 0:
            raise DalikdError(f"{flag} must be > 0, got {value}")
    json_out = output_file(json_out, "--json") if json_out else None
    plot = output_file(plot, "--plot", (".png",)) if plot else None
    given = _given(click.get_current_context(), params)
    flags = {key: FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
             for name, key in OPTION_KEYS.items()}  # fmt: skip
    cfg = probe_config(config_file, given, samples or 0, flags)
    teacher, group_steps = cfg.model.teacher, cfg.group_steps
    with ProbeProgress() as progress:
        results = run_probe(cfg, progress)

    title = f"T. stddev of {escape(teacher)} (groups of {group_steps} steps)"
    table = Table(title=title)
    for col, justify in (("rank", "right"), ("aug", "left"), ("T. stddev", "right"),
                         ("mean entropy", "right"), ("samples", "right")):  # fmt: skip
        table.add_column(col, justify=justify)
    table.add_column("group rows", justify="right")
    for i, r in enumerate(results, 1):
        table.add_row(
            str(i),
            escape(r.aug),
            f"{r.t_stddev:.6f}",
            f"{r.mean_entropy:.4f}",
            f"{r.samples:,}",
            str(r.group_rows),
        )
    print_table(table)
    console.print("lowest T. stddev first: the best candidates for KD (Wang et al., 2022)")
    if json_out:
        write_json(results, cfg, json_out)
        console.print(f"wrote {json_out}", markup=False)
    if plot:
        write_plot(results, plot, title=f"T. stddev, teacher {teacher}")
        console.print(f"wrote {plot}", markup=False)

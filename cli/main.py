"""The `dalikd` command: a thin adapter from flags to config to a library call.

Every user mistake surfaces as a DalikdError (or a click usage error) and is printed as one
line with a non-zero exit; tracebacks are kept for dalikd's own bugs.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from dalikd.cli.cache_cmd import cache_info
from dalikd.cli.data_cmd import data as data_group
from dalikd.cli.doctor_cmd import doctor
from dalikd.cli.models_cmd import models
from dalikd.cli.options import (
    DEVICE,
    GRANULARITY,
    MAX_PIXELS_HELP,
    MIXING,
    MODEL_HELP,
    RESIZE,
    SEED,
    THREADS,
    WEIGHTS_HELP,
    device_option,
    threads_option,
)
from dalikd.cli.plot_cmd import plot
from dalikd.cli.preview_cmd import preview
from dalikd.cli.profile_cmd import profile
from dalikd.cli.report import ScanProgress
from dalikd.cli.tstddev_cmd import tstddev
from dalikd.config import (
    BaseView,
    CacheFormat,
    PickCriterion,
    Precision,
    Schedule,
    TrainConfig,
    ValTransform,
    choices,
)
from dalikd.errors import DalikdError, escape_text

err_console = Console(stderr=True, highlight=False)


def _default(dotted: str) -> Any:
    obj: Any = TrainConfig()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in obj)
    return obj


def _numbers(kind):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got '{value}'") from None

    return parse


# (flag, dotted config key, click type or callback, help). Defaults come from TrainConfig.
TRAIN_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--data", "data.path", click.Path(), "dataset folder (train/, val/) or shard set"),
    (
        "--aug",
        "kd.aug",
        str,
        "second-view recipe: a name (see `dalikd pipelines`), a+b, or file.py:function",
    ),
    (GRANULARITY.name, "kd.granularity", GRANULARITY.type, GRANULARITY.help),
    (
        "--teacher",
        "model.teacher",
        str,
        f"teacher model ({MODEL_HELP}); omit to train supervised",
    ),
    (
        "--teacher-weights",
        "model.teacher_weights",
        str,
        "teacher weights: a file (state_dict or dalikd checkpoint) or a torchvision name; "
        "none for a timm name with a pretrained tag (timm:resnet50.a1_in1k)",
    ),
    (
        "--student",
        "model.student",
        str,
        f"student model ({MODEL_HELP})",
    ),
    ("--student-weights", "model.student_weights", str, f"initial student weights: {WEIGHTS_HELP}"),
    ("--epochs", "optim.epochs", int, "epochs to train (with --resume: the new total)"),
    ("--batch-size", "data.batch_size", int, "images per step"),
    ("--lr", "optim.lr", float, "peak learning rate"),
    ("--momentum", "optim.momentum", float, "SGD momentum"),
    ("--nesterov/--no-nesterov", "optim.nesterov", None, "Nesterov momentum"),
    ("--weight-decay", "optim.weight_decay", float, "weight decay"),
    (
        "--decay-norm-and-bias/--no-decay-norm-and-bias",
        "optim.decay_norm_and_bias",
        None,
        "weight decay on BatchNorm and biases too (the reference code's SGD)",
    ),
    ("--schedule", "optim.schedule", click.Choice(choices(Schedule)), "learning-rate schedule"),
    (
        "--milestones",
        "optim.milestones",
        _numbers(int),
        "step schedule: epochs where lr is multiplied by --gamma",
    ),
    ("--gamma", "optim.gamma", float, "step schedule factor"),
    ("--warmup-epochs", "optim.warmup_epochs", float, "linear warmup length in epochs"),
    ("--ce-weight", "kd.ce_weight", float, "weight of CE(s(x), y) (gamma)"),
    ("--kd-weight", "kd.kd_weight", float, "weight of each KD term (alpha)"),
    ("--temperature", "kd.temperature", float, "KD temperature T"),
    (
        "--mixed-label-ce",
        "kd.mixed_label_ce",
        float,
        "weight of CE on x' with its (mixed) soft labels; 0 is the paper's loss",
    ),
    ("--pool-size", "kd.pool_size", int, "candidates per image for pool recipes (cutmixpick)"),
    ("--pick-count", "kd.pick_count", int, "candidates kept from the pool (0: --pick-fraction)"),
    ("--pick-fraction", "kd.pick_fraction", float, "share of the pool kept"),
    (
        "--pick-criterion",
        "kd.pick_criterion",
        click.Choice(choices(PickCriterion)),
        "what the pick keeps the highest of",
    ),
    ("--image-size", "data.image_size", int, "train and val image side in px (or the dataset's)"),
    ("--crop-scale", "data.crop_scale", _numbers(float), "random-resized-crop area range, MIN,MAX"),
    (
        "--base-view",
        "data.base_view",
        click.Choice(choices(BaseView)),
        "x: random_resized_crop or pad_crop (--pad px of zeros, a window, a flip: CIFAR's); "
        "or the dataset's",
    ),
    ("--pad", "data.pad", int, "px of zero padding of --base-view pad_crop (or the dataset's)"),
    (
        "--val-transform",
        "data.val_transform",
        click.Choice(choices(ValTransform)),
        "validation: center_crop (shorter side resized, centre crop) or none (as stored); "
        "or the dataset's",
    ),
    (THREADS.name, "data.threads", THREADS.type, THREADS.help),
    ("--max-pixels", "data.max_pixels", int, MAX_PIXELS_HELP),
    (MIXING.name, "data.mixing", MIXING.type, MIXING.help),
    (RESIZE.name, "data.resize", RESIZE.type, RESIZE.help),
    (DEVICE.name, "device", DEVICE.type, DEVICE.help),
    (
        "--precision",
        "precision",
        click.Choice(choices(Precision)),
        "autocast (auto: bf16 on GPU, fp32 on CPU)",
    ),
    (SEED.name, "seed", SEED.type, SEED.help),
    (
        "--ckpt-every",
        "ckpt_every",
        int,
        "also checkpoint every N steps mid-epoch (0: epoch ends only)",
    ),
    (
        "--log-seconds",
        "log_seconds",
        float,
        "when stdout is not a terminal (nohup, SLURM): a progress line at most every N s",
    ),
    ("--out", "out", click.Path(), "run directory, new or empty (default runs/<timestamp>)"),
    (
        "--teacher-cache",
        "teacher_cache",
        click.Path(),
        "teacher-output cache folder: read the teacher's outputs where cached, else run it and "
        "write them (docs/teacher_cache.md; `dalikd cache-info DIR`)",
    ),
    (
        "--teacher-cache-format",
        "teacher_cache_format",
        click.Choice(choices(CacheFormat)),
        "how the cache stores teacher logits: exact (the live targets bit for bit), compact "
        "(1 byte a logit, about half of fp16; KL measured <= 4e-5 nats at T = 4) or topk (lossy: "
        "the K largest and the rest's mass)",
    ),
    (
        "--teacher-cache-topk",
        "teacher_cache_topk",
        int,
        "K of --teacher-cache-format topk: the K largest teacher logits per row are kept (fp16)",
    ),
    (
        "--eval-teacher/--no-eval-teacher",
        "eval_teacher",
        None,
        "report the teacher's val accuracy before training",
    ),
    (
        "--tensorboard/--no-tensorboard",
        "tensorboard",
        None,
        "also write the metrics.jsonl scalars to RUN_DIR/tb/ (pip install 'dalikd[tensorboard]')",
    ),
]


def train_options(f):
    for flag, dotted, kind, help_text in reversed(TRAIN_OPTIONS):
        dest = dotted.replace(".", "__")
        default = _default(dotted)
        shown = help_text if default == "" else f"{help_text}  [default: {default}]"
        if kind is None:  # boolean on/off pair
            f = click.option(flag, dest, default=None, help=shown)(f)
        elif callable(kind) and not isinstance(kind, type | click.ParamType):
            f = click.option(flag, dest, default=None, callback=kind, help=shown)(f)
        else:
            f = click.option(flag, dest, type=kind, default=None, help=shown)(f)
    return f


def overrides_from(params: dict[str, Any]) -> dict[str, Any]:
    """The flags the user actually gave, as dotted config keys."""
    return {k.replace("__", "."): v for k, v in params.items() if v is not None}


def flags_of(overrides: dict[str, Any]) -> dict[str, str]:
    """Dotted config key -> the flag that set it, for the keys in ``overrides`` (errors name
    the flag the user typed, not the config key)."""
    return {
        dotted: flag.split("/")[0] for flag, dotted, _, _ in TRAIN_OPTIONS if dotted in overrides
    }


class Interrupted(Exception):
    """Ctrl-C in a command; ``run_dir``: a train run's folder where it holds a last.pt to
    continue from. Not a KeyboardInterrupt, which click turns into a blank line and Abort."""

    def __init__(self, run_dir: str = "") -> None:
        super().__init__(run_dir)
        self.run_dir = run_dir


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dalikd")
def cli() -> None:
    """dalikd: knowledge distillation with the augmentations computed by NVIDIA DALI."""


@cli.command()
@click.option(
    "--config", "config_file", type=click.Path(), help="TOML file of settings; flags override it"
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(),
    help="continue the run in this directory (or its last.pt) from last.pt; --data may name "
    "a copy of its dataset in another folder",
)
@click.option("--epochs-factor", type=float, default=None,
              help="train F times as long: epochs and milestones times F, truncated (the "
              "reference's --epoch_factor: 2 makes 240 epochs at 150,180,210 into 480 at "
              "300,360,420)")  # fmt: skip
@train_options
def train(
    config_file: str | None, resume_dir: str | None, epochs_factor: float | None, **params: Any
) -> None:
    """Distill --student from --teacher on --data (or train it supervised without --teacher).

    Settings: built-in defaults < the dataset's own (DATA/dataset.json of `dalikd data
    import`) < --config < flags."""
    from dalikd.cli.report import RichReporter, print_summary
    from dalikd.config import read_config_file
    from dalikd.settings import command_config, scale_epochs
    from dalikd.train import load_resume
    from dalikd.train import train as run_training

    overrides = overrides_from(params)
    if resume_dir:
        if config_file or epochs_factor is not None:
            raise DalikdError(
                f"--resume takes the run's saved config; drop "
                f"{'--config' if config_file else '--epochs-factor (give --epochs N instead)'}"
            )
        cfg = load_resume(resume_dir, overrides, flags_of(overrides))
    else:
        file_values = read_config_file(config_file) if config_file else None
        kd = (file_values or {}).get("kd")
        aug = overrides.get("kd.aug") or (kd.get("aug") if isinstance(kd, dict) else None)
        if isinstance(aug, str):  # an unknown name first, before what the others mean with it
            from dalikd.recipes import resolve

            resolve(aug)
        cfg = command_config(file_values, overrides, flags=flags_of(overrides))
        if epochs_factor is not None:
            cfg = scale_epochs(cfg, epochs_factor)
    try:
        with RichReporter(cfg.log_seconds) as reporter:
            summary = run_training(cfg, reporter, resume=bool(resume_dir))
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one before the loop took the signals
        run_dir = getattr(e, "run_dir", "") or cfg.out  # train() names the folder it claimed
        last = bool(run_dir) and (Path(run_dir) / "last.pt").is_file()
        raise Interrupted(run_dir if last else "") from None
    if summary.get("rank", 0):  # another rank of torchrun's: rank 0 says it all
        sys.exit(128 + getattr(signal, summary["stopped_by"]) if summary["stopped_by"] else 0)
    if summary["stopped_by"]:
        # Preempted (SIGTERM/SIGUSR1) or Ctrl-C: the checkpoint is written; exit 128 + signal.
        err_console.print(
            f"stopped by {summary['stopped_by']} at epoch {summary['epochs_done'] + 1}, step "
            f"{summary['step_in_epoch']}, checkpoint written; "
            f"continue with: dalikd train --resume {summary['run_dir']}",
            soft_wrap=True,
            markup=False,
        )
        sys.exit(128 + getattr(signal, summary["stopped_by"]))
    print_summary(summary)


@cli.command(name="eval")
@click.option(
    "--data", required=True, type=click.Path(), help="dataset or shard set: its val split"
)
@click.option("--model", "model_name", required=True, help=MODEL_HELP)
@click.option("--weights", required=True, help=WEIGHTS_HELP)
@click.option("--batch-size", default=100, show_default=True, type=int, help="images per step")
@click.option(
    "--image-size",
    default=None,
    type=int,
    help="val image side in px: the shorter side resized and a centre crop, as training's "
    "validation (an imported dataset's images are used as stored: only their own size fits)  "
    "[default: the dataset's (DATA/dataset.json), else 224]",
)
@threads_option()
@device_option
def evaluate_cmd(data, model_name, weights, batch_size, image_size, threads, device) -> None:
    """Validation top-1 / top-5 / loss of a model on DATA/val (DATA may hold val/ only).

    An imported dataset's own settings apply (image size, validation transform, normalization:
    DATA/dataset.json); a model without a normalization of its own (cifar:NAME) gets the data's.

    The class index is the checkpoint's classes where it carries them (a dalikd checkpoint),
    else DATA/train's class folders, else DATA/val's.
    """
    from dalikd.cli.report import print_eval
    from dalikd.evaluate import evaluate_model

    result = evaluate_model(
        data, model_name, weights, batch_size=batch_size, image_size=image_size,
        threads=threads, device=device,
    )  # fmt: skip
    print_eval(model_name, weights, result)


@cli.command(name="check-data")
@click.argument("data", type=click.Path())
@click.option("--decode", is_flag=True, help="also decode every image with PIL (slow, thorough)")
@click.option("--no-cache", is_flag=True, help="check every file again, ignoring the scan cache")
@click.option("--max-pixels", type=click.IntRange(min=0), default=_default("data.max_pixels"),
              show_default=True, help=MAX_PIXELS_HELP)  # fmt: skip
def check_data(data: str, decode: bool, no_cache: bool, max_pixels: int) -> None:
    """Scan DATA's train/ and val/ for files that would stop a run; list what is left out.

    Exits non-zero only when a split has no usable image or a train class folder holds none.
    A shard set (DATA/dataset.json of `dalikd data shard`, or a quoted glob of its tars: the
    whole set) is checked shard by shard against its manifest instead; any damage exits
    non-zero.
    """
    from dalikd.cli.report import print_check
    from dalikd.data import scan_dataset
    from dalikd.shards import shard_set_of

    if shard_set_of(data) is not None:  # a shard set (dalikd data shard), or a glob of its tars
        from dalikd.cli.shard_cmd import check_shards

        return check_shards(data, decode)
    with ScanProgress() as progress:
        dataset = scan_dataset(
            data, decode=decode, cache=not no_cache, progress=progress.update, strict=False,
            max_pixels=max_pixels,
        )  # fmt: skip
    print_check(dataset)
    unusable = [name for name in ("train", "val") if not len(getattr(dataset, name))]
    if unusable:  # the list above says why; the line below is what stops a run
        split = f"{dataset.root}/{unusable[0]}"
        left = sum(path.startswith(split + "/") for path, _ in dataset.skipped)
        raise DalikdError(f"{split} holds no usable images; {left} left out (listed above)")
    # empty train classes: one line
    scan_dataset(data, decode=decode, cache=not no_cache, max_pixels=max_pixels)


@cli.command()
def pipelines() -> None:
    """List the built-in augmentation recipes for --aug."""
    from dalikd.cli.report import print_recipes
    from dalikd.recipes import builtin_recipes, recipe_info

    print_recipes([recipe_info(r) for r in builtin_recipes().values()])


@cli.command()
@click.option(
    "--out",
    type=click.Path(),
    default="runs/demo",
    show_default=True,
    help="where the four runs go",
)
@click.option(
    "--epochs", type=int, default=None, help="override the demo's epoch count (all four runs)"
)
@device_option
def demo(out: str, epochs: int | None, device: str) -> None:
    """Build a small digits dataset; train a teacher, a student alone, and the student
    distilled with --aug flip and with --aug cutmixpick."""
    from dalikd.cli.report import RichReporter, console, print_demo
    from dalikd.demo import CURVES, run_demo

    with RichReporter() as reporter:
        rows = run_demo(Path(out), reporter, epochs=epochs, device=device)
    print_demo(rows)
    console.print(f"curves of the four runs: {Path(out) / CURVES}", markup=False, soft_wrap=True)


cli.add_command(preview)
cli.add_command(profile)
cli.add_command(tstddev)
cli.add_command(doctor)
cli.add_command(plot)
cli.add_command(cache_info)
cli.add_command(data_group)
cli.add_command(models)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """dalikd's warnings (a fallback, a cache not trusted) as one line, not two with a path."""
    if category is RuntimeWarning and str(message).startswith(("dalikd", "scan cache")):
        return f"warning: {escape_text(str(message))}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


_FORMAT_WARNING = warnings.formatwarning


def main(argv: list[str] | None = None) -> None:
    # torch's OpenMP threads spin while they wait for work; beside DALI's threads, and with any
    # other busy process on the machine, that starved training to ~1% of its speed on 2 cores
    # (measured: 9 instead of 700 img/s). Sleeping waits kept ~60% under that load and cost
    # 10-25% on an idle machine; OMP_WAIT_POLICY=ACTIVE in the environment wins. It must be set
    # before torch is first imported (nothing above imports it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.formatwarning = _one_line_warning
    if not (sys.argv[1:] if argv is None else argv):  # bare `dalikd`: the help, as git and pip
        click.echo(cli.get_help(click.Context(cli, info_name="dalikd")))
        sys.exit(0)
    try:
        code = cli.main(args=argv, prog_name="dalikd", standalone_mode=False)
    except DalikdError as e:  # the message is text, not markup: "dalikd[timm]" stays whole
        err_console.print(f"[bold red]error:[/] {escape(escape_text(str(e)))}", soft_wrap=True)
        sys.exit(1)
    except click.UsageError as e:
        hint = f" (see: {e.ctx.command_path if e.ctx else 'dalikd'} --help)"  # dalikd data shard
        err_console.print(
            f"[bold red]error:[/] {escape(e.format_message() + hint)}", soft_wrap=True
        )
        sys.exit(2)
    except click.ClickException as e:
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", soft_wrap=True)
        sys.exit(e.exit_code)
    except (Interrupted, KeyboardInterrupt, click.Abort) as e:  # the hint only with a last.pt
        run_dir = getattr(e, "run_dir", "")
        hint = f"; the run continues with: dalikd train --resume {run_dir}" if run_dir else ""
        err_console.print(f"interrupted{hint}", soft_wrap=True, markup=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""The typed run configuration: frozen dataclasses, a TOML loader and the flag overrides.

Precedence is defaults < ``--config FILE.toml`` < command-line flags. A key in the file that no
dataclass field reads is an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from dalikd.errors import DalikdError

# The choices of the string settings, defined once: ops, pick, preview and the CLI read them
# here (:func:`choices`), and a config value outside them is refused.
Device = Literal["auto", "cpu", "gpu"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Schedule = Literal["step", "cosine"]
Granularity = Literal["sample", "batch"]
PickCriterion = Literal["teacher_entropy", "student_entropy", "kld"]
Mixing = Literal["auto", "native", "composed"]
Resize = Literal["auto", "native", "dali"]
CacheFormat = Literal["exact", "compact", "topk"]
BaseView = Literal["random_resized_crop", "pad_crop"]
ValTransform = Literal["center_crop", "none"]


def choices(kind: Any) -> tuple[str, ...]:
    """The values of a Literal type, in order: ``choices(Granularity) == ("sample", "batch")``."""
    return typing.get_args(kind)


# Upper bounds of the integer settings that go to DALI and torch as fixed-size integers (a
# seed grows by the epoch and rank; a side of 100000 px would be 30 GB per image): beyond them
# a setting is refused in one line, not turned into an overflow or allocation error mid-run.
MAX_SEED = 2**32 - 1
MAX_IMAGE_SIZE = 8192  # px: a 8192² RGB image is 201 MB
MAX_THREADS = 1024
MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: the scan's default decompression guard

TIMM_PREFIX = "timm:"  # --teacher/--student timm:NAME: a timm model by name


def timm_pretrained(name: str) -> bool:
    """A timm name with a pretrained tag (``timm:resnet50.a1_in1k``): its weights come with it."""
    return name.startswith(TIMM_PREFIX) and "." in name.removeprefix(TIMM_PREFIX)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # dataset root holding train/<class>/* and val/<class>/*
    image_size: int = 224  # px, square side fed to the models
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction range of the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of the random crop
    val_crop_fraction: float = 0.875  # val: resize shorter side to image_size / this, centre crop
    # x, the view every recipe starts from: random_resized_crop (a random window, area in
    # crop_scale and aspect in crop_ratio, resized to image_size², then a flip: ImageNet's) or
    # pad_crop (zero padding of `pad` px on every side, a random image_size² window, then a flip:
    # torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, the reference's view on
    # CIFAR and Tiny-ImageNet, for images stored at image_size²)
    base_view: BaseView = "random_resized_crop"
    pad: int = 4  # px of zero padding on every side of pad_crop (reference: 4 at 32 px, 8 at 64)
    # validation: center_crop (resize the shorter side to image_size / val_crop_fraction, crop
    # the centre image_size²) or none (images used as stored; they must be image_size²)
    val_transform: ValTransform = "center_crop"
    # the data's normalization, (x - mean) / std per RGB channel on the 0-255 scale (dataset.json
    # sets CIFAR's); empty: each model's own. Where set, the student gets it, and so does a
    # teacher without a normalization of its own (a cifar: model); docs/datasets.md
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    batch_size: int = 256  # images per step (per process)
    threads: int = 0  # DALI CPU threads; 0 = one per core, at most 8 (raw images: one)
    # the scan leaves out images whose header claims more pixels than this (decompression
    # bombs: a few KB on disk, gigabytes decoded); 0 = no limit
    max_pixels: int = MAX_PIXELS
    antialias: bool = True  # antialiased resize, as torchvision's RandomResizedCrop
    # mixing's pixel work: native (dalikd's fused fn.dalikd_mix) | composed (stock DALI
    # operators; the same pixels) | auto (native where it builds and loads; DALIKD_NATIVE=0|1
    # is auto's default). A run resolves it once and saves the answer with its state.
    mixing: Mixing = "auto"
    # the antialiased resize: native (dalikd's fn.dalikd_resize, CPU only, the flip fused in) |
    # dali (DALI's fn.resize; up to 2 grey levels apart) | auto (native on CPU with antialias
    # where it loads, else dali; DALIKD_NATIVE_RESIZE=0 is auto's default). Resolved once, saved.
    resize: Resize = "auto"
    # The "mixed" (GPU) JPEG decoder only (ignored on CPU); values of NVIDIA's ResNet-50 DALI
    # example, sized for ImageNet's largest image, so nvJPEG never reallocates mid-run.
    hw_decoder_load: float = 0.65  # share (0-1) of JPEG data for the GPU's JPEG engines (A100+)
    preallocate_width_hint: int = 5980  # px, image width the JPEG engines preallocate for
    preallocate_height_hint: int = 6430  # px, image height the JPEG engines preallocate for
    device_memory_padding: int = 211025920  # bytes of padding per nvJPEG GPU buffer
    host_memory_padding: int = 140544512  # bytes of padding per nvJPEG pinned host buffer


@dataclass(frozen=True)
class ModelConfig:
    student: str = "resnet18"  # torchvision name, timm:NAME or module:function
    student_weights: str = ""  # optional initial weights for the student
    teacher: str = ""  # empty: train the student supervised (no distillation)
    teacher_weights: str = ""  # file (state_dict or dalikd checkpoint) or torchvision name


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 100  # passes over train/
    lr: float = 0.1  # peak learning rate, after warmup (not scaled with the batch size)
    momentum: float = 0.9  # SGD momentum (fraction of the last update kept)
    nesterov: bool = False
    weight_decay: float = 1e-4  # L2 coefficient, on conv and linear weights
    # decay BatchNorm weights and biases too (the reference code's plain SGD over every
    # parameter, docs/method.md); False: weights of conv and linear layers only
    decay_norm_and_bias: bool = False
    schedule: Schedule = "step"
    milestones: tuple[int, ...] = (30, 60, 90)  # epochs where the step schedule multiplies by gamma
    gamma: float = 0.1  # lr factor at each milestone (step schedule)
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs (fractions allowed)


@dataclass(frozen=True)
class KDConfig:
    aug: str = "none"  # recipe for the second view x'; none = plain KD
    granularity: Granularity = "sample"  # sample: a draw per image | batch: one per batch
    ce_weight: float = 0.1  # gamma: weight of CE(s(x), y)
    kd_weight: float = 0.9  # alpha: weight of each D_T term
    temperature: float = 4.0  # T of the KD terms (unitless; logits are divided by it)
    mixed_label_ce: float = 0.0  # weight of CE(s(x'), soft labels of x'); 0 = the paper's loss
    pool_size: int = 2  # k: candidates per image for pool recipes (cutmixpick)
    pick_count: int = 0  # candidates kept from a pool of k·B; 0 = pick_fraction of the pool
    pick_fraction: float = 0.5  # share of the pool kept (0.5 of 2·B = B, the paper's)
    pick_criterion: PickCriterion = "teacher_entropy"  # what the pick keeps the highest of


# The paper's nine schemes (--aug values) less the student-entropy pick (--pick-criterion).
PAPER_AUGS = (
    "identity", "flip", "crop_flip", "cutout", "autoaugment", "mixup", "cutmix", "cutmixpick",
)  # fmt: skip


@dataclass(frozen=True)
class ProbeSettings:
    """`dalikd tstddev`'s own settings, as a config file's [probe] table holds them (a paper
    config carries the reference's probe); `dalikd train` does not read them."""

    augs: tuple[str, ...] = PAPER_AUGS  # --aug values to rank, one probe each
    epochs: int = 10  # probe length in epochs of train/ (the reference's probe: 10)
    group_steps: int = 5  # steps of teacher rows per group (the reference's 5)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    device: Device = "auto"  # auto: gpu when CUDA is available
    seed: int = 0  # torch and DALI seeds derive from it
    out: str = ""  # run directory; empty = runs/<timestamp>
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU; fp16 on GPU only
    channels_last: bool = True  # GPU only: models and their inputs in NHWC memory
    eval_teacher: bool = False  # report the teacher's val accuracy before training
    tensorboard: bool = False  # also write metrics.jsonl's scalars to RUN_DIR/tb/
    log_every: int = 10  # steps between progress updates (each one is a device sync)
    # seconds between the plain progress lines written when stdout is not a terminal (a pipe,
    # nohup, SLURM); 0: at every update. A terminal shows a live bar instead.
    log_seconds: float = 60.0
    ckpt_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    teacher_cache: str = ""  # teacher-output cache folder (docs/teacher_cache.md); "" = none
    # how the cache stores teacher logits: exact (as computed: the live run's targets bit for
    # bit), compact (1 byte a logit + 2 a row; KL(full || stored) measured <= 4e-5 nats at
    # T = 4) or topk (lossy: the K largest and the rest's mass; ~0.1 nats on 1000 classes)
    teacher_cache_format: CacheFormat = "exact"
    # K of the topk format (ignored by the others). 12: ImageNet, 100 epochs of KD + CutMixPick
    # in 17.8 GB (docs/teacher_cache.md)
    teacher_cache_topk: int = 12

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flags_named_as_keys(*keys: str) -> dict[str, str]:
    """Dotted key -> its flag where the flag is the key's last part in kebab case
    (``data.batch_size`` -> ``--batch-size``), for commands whose options are named so."""
    return {key: "--" + key.rsplit(".", 1)[-1].replace("_", "-") for key in keys}


def _label(key: str, flags: Mapping[str, str] | None) -> str:
    """How a message names a setting: the flag it came from, else its config key."""
    return (flags or {}).get(key) or key


def _coerce(key: str, value: Any, annotation: Any, flags: Mapping[str, str] | None = None) -> Any:
    """Check one value against the field's type; lists become tuples, ints may be floats."""
    name = (flags or {}).get(key) or f"config key '{key}'"
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise DalikdError(f"{name} must be a list, got {value!r}")
        item_type = args[0]
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise DalikdError(f"{name} must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(key, v, item_type, flags) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise DalikdError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DalikdError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DalikdError(f"{name} must be a number, got {value!r}")
        return float(value)
    if typing.get_origin(annotation) is Literal:
        if value not in choices(annotation):
            raise DalikdError(
                f"'{key}' must be one of {', '.join(choices(annotation))}; got '{value}'"
            )
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise DalikdError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annotation!r}")  # a dalikd bug, not user input


def apply_values(
    obj: Any, values: Mapping[str, Any], prefix: str = "", flags: Mapping[str, str] | None = None
) -> Any:
    """``obj`` (a config dataclass) with nested ``values`` applied, each checked against its
    field's type; an unknown key is one line naming it."""
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise DalikdError(
            f"unknown config key '{prefix}{unknown[0]}' in {where}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    changes = {}
    for name, value in values.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise DalikdError(f"config key '{prefix}{name}' must be a table of keys")
            changes[name] = apply_values(current, value, f"{prefix}{name}.", flags)
        else:
            changes[name] = _coerce(f"{prefix}{name}", value, hints[name], flags)
    return dataclasses.replace(obj, **changes)


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (or a saved config.json) into nested dicts; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise DalikdError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise DalikdError(f"cannot read {path}: not UTF-8 text (byte {e.start})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise DalikdError(f"cannot parse {path}: {e}") from None
    if not isinstance(values, dict):
        raise DalikdError(f"{path} must hold a table of settings")
    if path.suffix == ".json":  # a run's config.json: its "plan" records what was resolved
        values.pop("plan", None)
    return values


def build_config(
    file_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: TrainConfig | None = None,
    flags: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Defaults (or ``base``) < file values (nested) < overrides (dotted keys, e.g. 'optim.lr').

    ``flags``: dotted key -> the command-line flag of an override, named in its errors."""
    cfg = base or TrainConfig()
    if file_values:
        cfg = apply_values(cfg, file_values)
    if overrides:
        cfg = apply_values(cfg, _nest(overrides), flags=flags)
    validate(cfg, flags if overrides else None)
    return cfg


def _check_choices(obj: Any, prefix: str = "") -> None:
    """Every Literal-typed setting holds one of its choices (also for configs built in code)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, kind = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(kind) is Literal and value not in choices(kind):
            raise DalikdError(
                f"'{prefix}{f.name}' must be one of {', '.join(choices(kind))}; got '{value}'"
            )


def _check_finite(obj: Any, prefix: str, flags: Mapping[str, str] | None) -> None:
    """Every float setting (and float in a tuple) is a finite number: NaN passes every
    comparison the checks below make, and config.json could not hold it as standard JSON."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.", flags)
            continue
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise DalikdError(f"{_label(key, flags)} must be a finite number, got {value}")


def validate(cfg: TrainConfig, flags: Mapping[str, str] | None = None) -> None:
    """One-line errors for settings out of range. ``flags``: dotted key -> the command-line
    flag its value came from; the message names the flag there, the config key elsewhere."""
    _check_choices(cfg)
    _check_finite(cfg, "", flags)
    for ok, key, message in _data_checks(cfg.data) + _view_checks(cfg.data) + _run_checks(cfg):
        if not ok:
            raise DalikdError(f"{_label(key, flags)} {message}" if key else message)
    _check_combinations(cfg)


# (ok, dotted key or "" where the message names its settings itself, message after the name)
Check = tuple[bool, str, str]


def _data_checks(d: DataConfig) -> list[Check]:
    return [
        (d.image_size >= 16, "data.image_size", f"must be at least 16 px, got {d.image_size}"),
        (
            d.image_size <= MAX_IMAGE_SIZE,
            "data.image_size",
            f"must be at most {MAX_IMAGE_SIZE} px, got {d.image_size} (one {d.image_size}² RGB "
            f"image would take {3 * d.image_size**2 / 1e9:,.1f} GB)",
        ),
        (d.batch_size >= 1, "data.batch_size", f"must be positive, got {d.batch_size}"),
        (
            0 <= d.threads <= MAX_THREADS,
            "data.threads",
            f"must be in [0, {MAX_THREADS}], got {d.threads}",
        ),
        (d.max_pixels >= 0, "data.max_pixels", f"must be >= 0, got {d.max_pixels}"),
        (
            0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
            "data.crop_scale",
            f"must satisfy 0 < min <= max <= 1, got {d.crop_scale}",
        ),
        (
            0 < d.crop_ratio[0] <= d.crop_ratio[1],
            "data.crop_ratio",
            f"must satisfy 0 < min <= max, got {d.crop_ratio}",
        ),
        (
            0 < d.val_crop_fraction <= 1,
            "data.val_crop_fraction",
            f"must be in (0, 1], got {d.val_crop_fraction}",
        ),
        (
            0 <= d.hw_decoder_load <= 1,
            "data.hw_decoder_load",
            f"must be in [0, 1], got {d.hw_decoder_load}",
        ),
        (
            min(
                d.preallocate_width_hint,
                d.preallocate_height_hint,
                d.device_memory_padding,
                d.host_memory_padding,
            )
            >= 0,
            "",
            "decoder hints and paddings must be >= 0",
        ),  # fmt: skip
    ]


# fmt: off
def _view_checks(d: DataConfig) -> list[Check]:
    return [
        (0 <= d.pad <= MAX_IMAGE_SIZE, "data.pad", f"must be in [0, {MAX_IMAGE_SIZE}]: {d.pad}"),
        (len(d.mean) in (0, 3) and len(d.std) == len(d.mean), "", "data.mean and data.std are 3 "
         f"values each (RGB, 0-255) or both empty; got {list(d.mean)} and {list(d.std)}"),
        (all(v > 0 for v in d.std), "data.std", f"must be positive, got {list(d.std)}"),
        (not d.mean or max(*d.mean, *d.std) > 1, "", "data.mean and data.std are on the 0-255 "
         f"scale; {list(d.mean)} / {list(d.std)} look like 0-1 values (multiply by 255)"),
    ]
# fmt: on


def _run_checks(cfg: TrainConfig) -> list[Check]:
    d, o, k = cfg.data, cfg.optim, cfg.kd
    return [
        (o.epochs >= 1, "optim.epochs", f"must be positive, got {o.epochs}"),
        (o.lr > 0, "optim.lr", f"must be positive, got {o.lr}"),
        (0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}"),
        (o.momentum > 0 or not o.nesterov, "", "--nesterov needs a momentum above 0"),
        (o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}"),
        (cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}"),
        (cfg.seed <= MAX_SEED, "seed", f"must be at most {MAX_SEED} (32 bits), got {cfg.seed}"),
        (o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}"),
        (
            list(o.milestones) == sorted(o.milestones),
            "optim.milestones",
            f"must be increasing, got {o.milestones}",
        ),
        (
            min(o.milestones, default=0) >= 0,
            "optim.milestones",
            f"must be epochs >= 0, got {o.milestones}",
        ),
        (k.temperature > 0, "kd.temperature", f"must be positive, got {k.temperature}"),
        (k.pool_size >= 1, "kd.pool_size", f"must be positive, got {k.pool_size}"),
        (k.pick_count >= 0, "kd.pick_count", f"must be >= 0, got {k.pick_count}"),
        (
            k.pick_count <= k.pool_size * d.batch_size,
            "kd.pick_count",
            f"must be at most the pool, --pool-size x --batch-size = {k.pool_size} x "
            f"{d.batch_size} = {k.pool_size * d.batch_size}, got {k.pick_count}",
        ),
        (0 < k.pick_fraction <= 1, "kd.pick_fraction", f"must be in (0, 1], got {k.pick_fraction}"),
        (min(k.ce_weight, k.kd_weight, k.mixed_label_ce) >= 0, "", "loss weights must be >= 0"),
        (
            min(cfg.probe.epochs, cfg.probe.group_steps) >= 1,
            "",
            "probe.epochs and probe.group_steps must be positive",
        ),
        (bool(cfg.probe.augs), "probe.augs", "must name at least one --aug value"),
        (cfg.log_every >= 1, "log_every", f"must be positive, got {cfg.log_every}"),
        (cfg.log_seconds >= 0, "log_seconds", f"must be >= 0, got {cfg.log_seconds}"),
        (cfg.ckpt_every >= 0, "ckpt_every", f"must be >= 0, got {cfg.ckpt_every}"),
        (
            cfg.teacher_cache_topk >= 0,
            "teacher_cache_topk",
            f"must be >= 0, got {cfg.teacher_cache_topk}",
        ),  # fmt: skip
    ]


def _check_combinations(cfg: TrainConfig) -> None:
    """One-line errors for settings that do not go together."""
    if (
        cfg.model.teacher
        and not cfg.model.teacher_weights
        and not timm_pretrained(cfg.model.teacher)
    ):
        raise DalikdError(
            "--teacher needs --teacher-weights (a file or a torchvision weights name such as "
            "IMAGENET1K_V1) or a timm name with a pretrained tag (timm:resnet50.a1_in1k): "
            "distilling from an untrained teacher teaches nothing"
        )
    if cfg.model.teacher_weights and not cfg.model.teacher:
        raise DalikdError(
            f"--teacher-weights {cfg.model.teacher_weights} needs --teacher (the model the "
            "weights are for); without --teacher the student trains supervised"
        )
    if cfg.eval_teacher and not cfg.model.teacher:
        raise DalikdError("--eval-teacher reports a teacher's val accuracy; give --teacher too")
    if cfg.teacher_cache_format == "topk" and cfg.teacher_cache_topk < 1:
        raise DalikdError(
            f"--teacher-cache-format topk keeps the K largest logits per row: give "
            f"--teacher-cache-topk K >= 1, got {cfg.teacher_cache_topk}"
        )
    if cfg.teacher_cache and not cfg.model.teacher:
        raise DalikdError("--teacher-cache stores a teacher's outputs; give --teacher too")
    if cfg.teacher_cache and cfg.kd.pick_criterion != "teacher_entropy":
        raise DalikdError(
            f"--teacher-cache cannot replay --pick-criterion {cfg.kd.pick_criterion}: it scores "
            "the pool with the student being trained; use teacher_entropy or drop the cache"
        )
    if not cfg.model.teacher and cfg.kd.aug != "none" and not cfg.kd.mixed_label_ce:
        raise DalikdError(
            f"--aug {cfg.kd.aug} makes a second view for the teacher to label; without "
            "--teacher either use --aug none or train on x' with --mixed-label-ce WEIGHT"
        )

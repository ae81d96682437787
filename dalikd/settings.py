"""Where a command's settings come from, in layers: the built-in defaults (:mod:`dalikd.config`)
< the dataset's own (``dataset.json``'s ``data_defaults``, written by ``dalikd data import``)
< a config file (``--config``) < the flags given.

``dalikd train``, ``eval``, ``tstddev``, ``profile`` and ``preview`` build their settings so
(:func:`command_config`); what they resolve is what config.json and the checkpoints record, so a
resumed run keeps the values it started with whatever the dataset's file says later.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dalikd.config import TrainConfig, apply_values, build_config, validate
from dalikd.errors import DalikdError

if TYPE_CHECKING:
    from dalikd.manifest import Manifest


def dataset_defaults(path: str | Path) -> dict[str, Any]:
    """The dataset's own [data] settings: ``data_defaults`` of ``path``/dataset.json; {} where
    there is none (a plain folder, or no path yet)."""
    manifest = _manifest(path)
    return dict(manifest.data_defaults) if manifest is not None else {}


def _manifest(path: str | Path) -> Manifest | None:
    """The dataset.json of ``path`` (a glob of a shard set's tars: the set's); None where there
    is none (a plain folder, or no path yet)."""
    from dalikd.manifest import read_manifest

    folder = Path(path).expanduser() if str(path) else None
    if folder is not None and not folder.is_dir() and any(c in str(path) for c in "*?["):
        folder = folder.parent  # a glob of a shard set's tars: the set's manifest
    if folder is None or not folder.is_dir():
        return None
    return read_manifest(folder)


def with_dataset_defaults(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the built-in defaults) with the dataset's own data settings on top."""
    cfg = base or TrainConfig()
    defaults = dataset_defaults(path)
    if not defaults:
        return cfg
    from dalikd.manifest import manifest_path

    try:
        return apply_values(cfg, {"data": defaults})
    except DalikdError as e:  # a key or value this version does not know
        raise DalikdError(f"{manifest_path(path)}: data_defaults: {e}") from None


def data_path_of(file_values: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> str:
    """The dataset folder a command is given: the --data flag, else the config file's."""
    if overrides.get("data.path"):
        return str(overrides["data.path"])
    data = (file_values or {}).get("data")
    path = data.get("path", "") if isinstance(data, Mapping) else ""
    return path if isinstance(path, str) else ""


def command_config(
    file_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: TrainConfig | None = None,
    flags: Mapping[str, str] | None = None,
) -> TrainConfig:
    """A command's settings: ``base`` (default: the built-in defaults; a command may start from
    its own, e.g. the probe's batch of 64) < the dataset's data_defaults < ``file_values`` (a
    config file, nested) < ``overrides`` (the flags given, dotted keys). ``flags``: dotted key
    -> the flag named in errors."""
    overrides = dict(overrides or {})
    path = data_path_of(file_values, overrides)
    base = with_dataset_defaults(path, base)
    cfg = build_config(file_values, overrides, base=base, flags=flags)
    if "data.image_size" not in overrides:
        _check_config_size(file_values, path, cfg)
    return cfg


def _check_config_size(file_values: Mapping[str, Any] | None, path: str, cfg: TrainConfig) -> None:
    """One line naming the likely mistake where a config file for another dataset (a Tiny-
    ImageNet paper config on CIFAR-100) sets an image size the imported images cannot give as
    stored: the plan's own refusal would only ask for another --image-size."""
    data = (file_values or {}).get("data")
    size = data.get("image_size") if isinstance(data, Mapping) else None
    if size is None or not path or cfg.data.val_transform != "none":
        return  # (the common case: no manifest read again)
    manifest = _manifest(path)  # a glob's too: its set's
    own = manifest.data_defaults.get("image_size") if manifest is not None else None
    if own is None or size == own:
        return
    name = manifest.name
    raise DalikdError(
        f"the config file is for {size}-px images, but {path} holds {name}'s {own}-px images, "
        f"used as stored: take the config of {name} (configs/paper/), or give --image-size {own}"
    )


def scale_epochs(cfg: TrainConfig, factor: float) -> TrainConfig:
    """``cfg`` trained ``factor`` times as long: epochs and the step schedule's milestones
    multiplied and truncated to whole epochs, as the reference's ``--epoch_factor`` does
    (option.py: 240 epochs at 150/180/210 become 480 at 300/360/420 with 2)."""
    if not (math.isfinite(factor) and factor > 0):
        raise DalikdError(f"--epochs-factor must be a positive number, got {factor}")
    o = cfg.optim
    optim = dataclasses.replace(
        o, epochs=int(o.epochs * factor), milestones=tuple(int(m * factor) for m in o.milestones)
    )
    scaled = dataclasses.replace(cfg, optim=optim)
    validate(scaled, {"optim.epochs": "--epochs-factor"})
    return scaled

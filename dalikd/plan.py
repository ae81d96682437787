"""The data plan: what the data graphs compute, decided once and handed to every graph builder.

A :class:`DataPlan` is resolved once (:func:`resolve_plan`) from the config, the environment
(``DALIKD_NATIVE``, ``DALIKD_NATIVE_RESIZE``: the defaults of "auto") and the machine (the
device, the native operators that load, the thread count), and then nothing re-resolves it:
``dalikd train``, ``tstddev``, ``profile``, ``preview``, ``eval`` and the teacher cache build it
the same way, graphs are built from it (:mod:`dalikd.loaders`), runs save it in config.json and
their checkpoints, the probe's and the profile's JSON name it, and the teacher cache's key is
derived from it (:mod:`dalikd.teacher_cache.key`).

Extending it: a new data setting is a field of :class:`dalikd.config.DataConfig` (the plan
carries it as ``plan.data``) handled where the graphs are built; a new plan-level decision is a
field here. ``tests/test_teacher_cache_key.py`` fails until the field is in the cache key or on
its commented exclusion list.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dalikd.batch import IMAGENET_NORM, InputNorm
from dalikd.config import DataConfig, KDConfig, TrainConfig
from dalikd.errors import DalikdError
from dalikd.recipes import AugContext, Recipe, Seeds, recipe_info, resolve
from dalikd.sources import source_kind


def default_threads(raw: bool = False) -> int:
    """DALI CPU threads where ``data.threads`` is 0: one per core, at most 8; one for ``raw``
    images (a few KB each: reading and cropping one costs a few µs, and a second thread's
    wake-ups cost more CPU than it adds; benchmarks/README.md, CIFAR hand-off)."""
    return 1 if raw else max(1, min(len(os.sched_getaffinity(0)), 8))


@dataclass(frozen=True)
class DataPlan:
    """Every decision the data graphs are built from; nothing in it is "auto"."""

    # the data settings (base view, validation transform, sizes, decoder hints), with
    # data.mixing ("native" | "composed", where the recipe mixes) and data.resize ("native" |
    # "dali") resolved and data.threads the thread count DALI gets
    data: DataConfig
    device: str = "cpu"  # "cpu" | "gpu": where DALI runs
    aug: str = "none"  # the --aug spec that makes x' ("none": no x')
    granularity: str = "sample"  # random draws per image ("sample") or per batch ("batch")
    pool_size: int = 0  # x' views per image the graph makes: k for a pool recipe, 1, 0 (no x')
    seed: int = 0  # the run's seed; a loader's draws start from it (+ its shard, + an epoch)
    norm: InputNorm = IMAGENET_NORM  # the models' input normalization (0-255); cutout's fill
    recipe: Recipe | None = field(default=None, compare=False, repr=False)  # ``aug``, resolved
    # the GPU decoder's preallocation hints and nvJPEG paddings (loaders.decoder_args): the
    # training loader only (recovery.TrainData sets it); tooling pipelines go without. Changes
    # memory, not pixels: not in the cache key, not in to_dict (config.json)
    preallocate: bool = False
    # where the images come from (dalikd.sources): "folder" (image files, DALI's file reader)
    # or "shards" (a shard set's tars, its webdataset reader: another sample order)
    source: str = "folder"
    # (H, W, C) of a dataset stored as raw pixels (dataset.json's codec "raw": each file is read
    # and reshaped, nothing is decoded); (): encoded image files, decoded
    raw_shape: tuple[int, ...] = ()

    @property
    def mixes(self) -> bool:
        """The recipe mixes samples of the batch (its x' carries lam and perm)."""
        return self.recipe is not None and recipe_info(self.recipe).mixing

    @property
    def native_mixing(self) -> bool:
        """Mixing's pixel work runs through dalikd's fused operator fn.dalikd_mix."""
        return self.mixes and self.data.mixing == "native"

    @property
    def native_resize(self) -> bool:
        """The antialiased resize runs through dalikd's fn.dalikd_resize (flip fused in)."""
        return self.data.resize == "native"

    def with_resize(self, resize: str) -> DataPlan:
        """The same plan on another resize path (the profile times both side by side)."""
        from dalikd import native

        resolved = native.resolve_resize(resize, self.data.antialias, self.device)
        return replace(self, data=replace(self.data, resize=resolved))

    def aug_context(self, seeds: Seeds) -> AugContext:
        """What the recipe gets: the static facts, its ``seeds`` and mixing's path."""
        return AugContext(self.data.image_size, self.device, self.norm.mean, self.granularity,
                          max(self.pool_size, 1), seeds, self.native_mixing)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what config.json, checkpoints and the probe's and profile's JSON record."""
        return {
            "data": asdict(self.data), "device": self.device, "aug": self.aug,
            "granularity": self.granularity, "pool_size": self.pool_size, "seed": self.seed,
            "norm": {"mean": list(self.norm.mean), "std": list(self.norm.std)},
            "mixing": self.data.mixing if self.mixes else "none", "resize": self.data.resize,
            "source": self.source,
            "raw_shape": list(self.raw_shape),
        }  # fmt: skip


def resolve_plan(
    data: DataConfig,
    aug: str | Recipe | None = "none",
    *,
    device: str,
    seed: int = 0,
    granularity: str = "sample",
    pool_size: int = 2,
    norm: InputNorm = IMAGENET_NORM,
    dali_state: str | bytes | None = None,
    raw_shape: tuple[int, ...] = (),
    validates: bool = True,
) -> DataPlan:
    """The plan of ``data`` with recipe ``aug`` (an --aug spec, or a recipe function) on
    ``device`` ("cpu" | "gpu"). ``pool_size``: k, the candidates per image of a pool recipe.
    ``dali_state``: a saved DALI state the graph will restore, whose paths win over "auto" (and
    contradict any other: a state restores only into the graph it was saved from).
    ``raw_shape``: (H, W, C) of a raw dataset's images (``Dataset.raw_shape``); () for encoded
    files. ``validates``: the plan also builds the validation graph (train, eval), whose
    settings must then fit the raw images; a command that reads train/ alone (preview, profile,
    the probe) passes False."""
    from dalikd import native

    _check_raw(data, tuple(raw_shape), validates)

    recipe = aug if callable(aug) else resolve(aug or "none")
    spec = "none" if recipe is None else (aug if isinstance(aug, str) else recipe_info(aug).name)
    info = recipe_info(recipe) if recipe is not None else None
    if dali_state is not None:
        data = _restored(data, dali_state, info is not None and info.mixing,
                         _resizes(data, tuple(raw_shape)))  # fmt: skip
    resize = native.resolve_resize(data.resize, data.antialias, device)
    mixing = data.mixing
    if info is not None and info.mixing:  # resolved only where something mixes
        mixing = native.resolve(mixing, device)
    views = 0 if info is None else (pool_size if info.pool else 1)
    threads = data.threads or default_threads(bool(raw_shape))
    resolved = replace(data, resize=resize, mixing=mixing, threads=threads)
    return DataPlan(resolved, device, spec.strip(), granularity, views, seed, norm,
                    recipe=recipe, source=source_kind(data.path),
                    raw_shape=tuple(raw_shape))  # fmt: skip


def _check_raw(data: DataConfig, raw_shape: tuple[int, ...], validates: bool) -> None:
    """One line where raw images cannot give the settings' views: validation without a
    transform shows images as stored, so they must be image_size² (where it is built)."""
    if not raw_shape:
        return
    h, w, c = raw_shape
    if c != 3:
        raise DalikdError(f"the dataset's raw images have {c} channels; dalikd reads RGB (3)")
    size = data.image_size
    if validates and data.val_transform == "none" and (h, w) != (size, size):
        raise DalikdError(
            f"the dataset's images are {h}x{w} px and validation uses them as stored "
            f"(val_transform none), but --image-size is {size}: give --image-size {h}, or "
            f"validate at {size} px with --val-transform center_crop (dalikd train)"
        )


def plan_of(
    cfg: TrainConfig,
    device: str,
    norm: InputNorm = IMAGENET_NORM,
    dali_state: Any = None,
    raw_shape: tuple[int, ...] = (),
) -> DataPlan:
    """The plan of a run's config (its data settings and its kd section's recipe, granularity
    and pool size) on a dataset of ``raw_shape`` (``Dataset.raw_shape``)."""
    return plan_for(cfg.data, cfg.kd, device=device, seed=cfg.seed, norm=norm,
                    dali_state=dali_state, raw_shape=raw_shape)  # fmt: skip


def plan_for(data: DataConfig, kd: KDConfig, **kw: Any) -> DataPlan:
    return resolve_plan(data, kd.aug, granularity=kd.granularity, pool_size=kd.pool_size, **kw)


# -- the paths a saved DALI state was built with ------------------------------------------------


def checkpoint_mixing(checkpoint: str | bytes) -> str:
    """The mixing path a DALI checkpoint was saved from ("native" | "composed"): the operators
    of its graph are named in it."""
    return "native" if _holds(checkpoint, "DalikdMix") else "composed"


def checkpoint_resize(checkpoint: str | bytes) -> str:
    """The resize path a DALI checkpoint was saved from ("native" | "dali")."""
    return "native" if _holds(checkpoint, "DalikdResize") else "dali"


def _holds(checkpoint: str | bytes, name: str) -> bool:
    return (name.encode() if isinstance(checkpoint, bytes) else name) in checkpoint


def _resizes(data: DataConfig, raw_shape: tuple[int, ...]) -> bool:
    """The training graph resizes on the plan's resize path (a random-resized crop decoded from
    image files); pad_crop and raw images (DALI's own random_resized_crop) take no path."""
    return data.base_view == "random_resized_crop" and not raw_shape


def _restored(
    data: DataConfig, checkpoint: str | bytes, mixes: bool, resizes: bool = True
) -> DataConfig:
    """``data`` for a graph that restores ``checkpoint``: its resize (where the graph
    ``resizes``) and mixing paths win over "auto" and contradict any other."""
    resize = checkpoint_resize(checkpoint) if resizes else data.resize
    if data.resize not in ("auto", resize):
        raise DalikdError(
            f"the data pipeline state was saved with the {resize} resize path; this run asks for "
            f"{data.resize} (--resize {resize} resumes it)"
        )
    data = replace(data, resize=resize)
    if not mixes:
        return data
    mixing = checkpoint_mixing(checkpoint)
    if data.mixing not in ("auto", mixing):
        raise DalikdError(
            f"the data pipeline state was saved with the {mixing} mixing path; this run asks for "
            f"{data.mixing} (--mixing {mixing} resumes it)"
        )
    return replace(data, mixing=mixing)


def check_state(plan: DataPlan, checkpoint: str | bytes) -> None:
    """A DALI state restores only into the graph it was saved from: one line where ``plan``'s
    paths are not its."""
    _restored(plan.data, checkpoint, plan.mixes, _resizes(plan.data, plan.raw_shape))

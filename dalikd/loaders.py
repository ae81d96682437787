"""The data loaders: the DALI graphs for training and validation, built into pipelines, and
their hand-off to PyTorch (:class:`Loader`, :func:`train_loader`, :func:`val_loader`).

``pipeline_def`` and the PyTorch iterator are applied here and nowhere else. Both graphs run on
CPU (``device="cpu"``, DALI's ``device_id=None``) or GPU (``device="gpu"``: the decoder runs as
"mixed" and everything after it on the GPU) from the same code. Their outputs are uint8 HWC
images: torch normalizes them on the training device (:mod:`dalikd.batch`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dalikd import ops
from dalikd.batch import IMAGENET_MEAN, IMAGENET_STD, Batch
from dalikd.config import DataConfig
from dalikd.data import Split
from dalikd.device import torch_device
from dalikd.errors import DalikdError
from dalikd.recipes import AugContext, Pool, Recipe, View, recipe_info

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Batch", "torch_device", "train_loader", "val_loader",
]  # fmt: skip

READER = "Reader"


def default_threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


# -- graph pieces (DataNode -> DataNode) ---------------------------------------------------------


def read(
    split: Split, *, shuffle: bool, shard_id: int, num_shards: int, seed: int = 0
) -> tuple[Any, Any]:
    """Encoded files and int32 labels of this shard. ``pad_last_batch`` gives every shard the
    same number of batches; ``shuffle_after_epoch`` is a true global reshuffle each epoch, and
    the same ``seed`` on every rank makes the shards split one shared permutation."""
    return fn.readers.file(
        seed=seed,
        files=list(split.files),
        labels=list(split.labels),
        name=READER,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=shuffle,
        pad_last_batch=True,
    )


def decoder_args(data: DataConfig, device: str, preallocate: bool = False) -> dict[str, Any]:
    """The decoder's device, and on GPU the "mixed" decoder's JPEG-engine share (DataConfig);
    with ``preallocate`` (the training loader only) also NVIDIA's ResNet-50 preallocation hints
    and nvJPEG buffer paddings, which every decoder instance allocates up front (pinned host
    and device buffers per thread, and the JPEG engines' batch at the hinted size: see
    docs/training.md). Tooling pipelines (validation, profile, recovery's re-decode, checks)
    go without them. DALI's CPU decoder takes none of these."""
    if device != "gpu":
        return {"device": "cpu"}
    args: dict[str, Any] = {"device": "mixed", "hw_decoder_load": data.hw_decoder_load}
    if preallocate:
        args.update(
            preallocate_width_hint=data.preallocate_width_hint,
            preallocate_height_hint=data.preallocate_height_hint,
            device_memory_padding=data.device_memory_padding,
            host_memory_padding=data.host_memory_padding,
        )
    return args


def random_crop_decode(jpegs: Any, data: DataConfig, device: str, preallocate: bool = False) -> Any:
    """Decode only a random crop window (area in crop_scale, aspect in crop_ratio), at its own
    size. Out: uint8 HWC RGB on ``device``. ``preallocate``: see :func:`decoder_args`."""
    return fn.decoders.image_random_crop(
        jpegs,
        **decoder_args(data, device, preallocate),
        output_type=types.RGB,
        random_area=list(data.crop_scale),
        random_aspect_ratio=list(data.crop_ratio),
        num_attempts=10,
    )


def native_resize(data: DataConfig, device: str, native: bool | None = None) -> bool:
    """Whether the resize runs through dalikd's fn.dalikd_resize (CPU, antialiased, the flip
    fused in) instead of DALI's fn.resize: ``data.resize`` resolved
    (:func:`dalikd.native.resolve_resize`, which also keeps GPU and --no-antialias on DALI's);
    ``native`` overrides it (the profile times both paths)."""
    from dalikd import native as native_op

    resize = data.resize if native is None else ("native" if native else "dali")
    return native_op.resolve_resize(resize, data.antialias, device) == "native"


def random_resized_crop(
    jpegs: Any,
    data: DataConfig,
    device: str,
    flip: bool = False,
    native: bool | None = None,
    preallocate: bool = False,
) -> Any:
    """:func:`random_crop_decode`, resized to image_size², and with ``flip`` mirrored
    horizontally with probability 1/2 (a seeded coin per sample). Out: uint8 HWC RGB on
    ``device``. ``native``: see :func:`native_resize`; ``preallocate``: :func:`decoder_args`."""
    images = random_crop_decode(jpegs, data, device, preallocate)
    if native_resize(data, device, native):
        kw = {"flip": fn.random.coin_flip(probability=0.5)} if flip else {}
        return fn.dalikd_resize(images, size_y=data.image_size, size_x=data.image_size, **kw)
    images = fn.resize(
        images, resize_x=data.image_size, resize_y=data.image_size, antialias=data.antialias
    )
    if flip:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    return images


def center_crop(jpegs: Any, data: DataConfig, device: str, native: bool | None = None) -> Any:
    """Decode, resize the shorter side to image_size / val_crop_fraction, crop the centre
    image_size². Deterministic. Out: uint8 HWC RGB on ``device``."""
    images = fn.decoders.image(jpegs, **decoder_args(data, device), output_type=types.RGB)
    shorter = round(data.image_size / data.val_crop_fraction)
    if native_resize(data, device, native):
        images = fn.dalikd_resize(images, resize_shorter=shorter)
    else:
        images = fn.resize(images, resize_shorter=shorter, antialias=data.antialias)
    return fn.crop(images, crop=(data.image_size, data.image_size))


def train_graph(
    split,
    data,
    recipe,
    device,
    shard_id,
    num_shards,
    granularity="sample",
    reader_seed=0,
    pool_size=2,
    native_resize=None,
    preallocate=False,
):
    """x = random-resized-crop + flip of each file; x' = recipe(x) from the same decode.
    Every image output is uint8 HWC. The recipe's mixing ops run on the path of
    ``data.mixing`` (:func:`dalikd.ops.mixing_path`; "auto" is resolved by the first of them);
    ``native_resize``: the resize path (:func:`native_resize`); ``preallocate``: the decoder's
    preallocation, for training's loader only (:func:`decoder_args`).

    On GPU, λ and perm leave the pipeline as GPU nodes (``.gpu()``; a no-op for the native
    operator's λ, already there): a CPU node that also feeds GPU work (``images * lam``) is
    allocated in pinned host memory, which DALI exports over DLPack as kDLCUDAHost, a device
    type torch's ``from_dlpack`` rejects. Labels feed nothing on the GPU and stay on CPU."""
    jpegs, labels = read(
        split, shuffle=True, shard_id=shard_id, num_shards=num_shards, seed=reader_seed
    )
    images = random_resized_crop(
        jpegs, data, device, flip=True, native=native_resize, preallocate=preallocate
    )
    outputs = {"images": images, "labels": labels}
    if recipe is not None:
        ctx = AugContext(data.image_size, device, IMAGENET_MEAN, granularity, pool_size)
        with ops.mixing_path(data.mixing):
            out = recipe(images, ctx)
        _check_recipe_output(recipe, out)
        for j, view in enumerate(out.views if isinstance(out, Pool) else (out,)):
            outputs[f"aug_images_{j}"] = view.images
            if view.lam is not None:  # float32 and int32 here; the Loader makes perm int64
                outputs[f"lam_{j}"] = view.lam.gpu() if device == "gpu" else view.lam
                outputs[f"perm_{j}"] = view.perm.gpu() if device == "gpu" else view.perm
    return outputs


def _check_recipe_output(recipe: Recipe, out: Any) -> None:
    """A user recipe's mistakes as one line naming it, at trace time (DALI's own errors come
    later, from deep inside the graph)."""
    from nvidia.dali.data_node import DataNode

    name = f"recipe {recipe_info(recipe).name}"
    if not isinstance(out, View | Pool):
        raise DalikdError(f"{name} returned {type(out).__name__}, not a View or a Pool of Views")
    for view in out.views if isinstance(out, Pool) else (out,):
        if not isinstance(view, View):
            raise DalikdError(f"{name}: a Pool holds {type(view).__name__}, not a View")
        for field in ("images", "lam", "perm"):
            value = getattr(view, field)
            if not (value is None and field != "images") and not isinstance(value, DataNode):
                raise DalikdError(
                    f"{name}: View.{field} is {type(value).__name__}, not a DALI DataNode"
                )
        if (view.lam is None) != (view.perm is None):
            raise DalikdError(
                f"{name} returns {'lam without perm' if view.perm is None else 'perm without lam'}"
                "; a mixing recipe returns both (the loss needs the partner of each sample)"
            )


def val_graph(split, data, device, shard_id, num_shards):
    jpegs, labels = read(split, shuffle=False, shard_id=shard_id, num_shards=num_shards)
    return {"images": center_crop(jpegs, data, device), "labels": labels}


# -- pipeline + iterator -------------------------------------------------------------------------


def _dali_device_id(device: str) -> int | None:
    return torch.cuda.current_device() if device == "gpu" else None


def build_pipeline(
    graph,
    *,
    data: DataConfig,
    device: str,
    seed: int,
    checkpoint: str | None = None,
    **graph_kwargs,
):
    """Apply pipeline_def to a graph function returning a dict of named outputs.

    Returns ``(pipeline, output names)``. The graph is traced here; nothing is built yet.
    Checkpointing is always on: ``checkpoint`` (from :meth:`Loader.checkpoint`) restores the
    readers and every random operator bit-exactly, mid-epoch included.
    """
    names: list[str] = []
    errors: list[DalikdError] = []

    def graph_fn():
        try:
            outputs = graph(data=data, device=device, **graph_kwargs)
        except DalikdError as e:  # conditionals' tracing rewrites it into a multi-line one
            errors.append(e)
            raise
        names.extend(outputs)
        return tuple(outputs.values())

    try:
        pipe = pipeline_def(graph_fn, enable_conditionals=True, enable_checkpointing=True)(
            batch_size=data.batch_size,
            num_threads=data.threads or default_threads(),
            device_id=_dali_device_id(device),
            seed=seed,
            checkpoint=checkpoint,
        )
    except Exception:
        if errors:
            raise errors[0] from None
        raise
    assert names, "pipeline_def traces the graph when the pipeline is created"
    return pipe, names


class ForeignState(DalikdError):
    """A saved DALI state that this version's graph cannot restore (its operators differ)."""


class Loader:
    """Iterates one epoch of :class:`Batch`; ``len()`` is the number of batches per epoch.
    ``cpu_labels``: the labels stay on CPU (a caller that maps them moves them once itself,
    instead of copying them back from the GPU: a blocking sync every step)."""

    def __init__(
        self,
        pipe,
        names: list[str],
        *,
        last_batch: LastBatchPolicy,
        device: torch.device,
        cpu_labels: bool = False,
    ):
        self._device = device
        self._labels_to = torch.device("cpu") if cpu_labels else device
        # builds the pipeline, and restores its saved state if it was given one. The first
        # batches are not prepared here but at the first next(): a file that fails to decode
        # in them must fail where the caller iterates (recovery.TrainData leaves it out there)
        try:
            self._iter = DALIGenericIterator(
                [pipe], names, reader_name=READER, last_batch_policy=last_batch, auto_reset=True,
                prepare_first_batch=False,
            )  # fmt: skip
        except RuntimeError as e:
            if "might come from another pipeline" not in str(e):
                raise
            raise ForeignState(
                "the saved data-pipeline state belongs to another DALI graph (one that a "
                "different dalikd version built), so the run cannot continue its data order"
            ) from None

    def __len__(self) -> int:
        return len(self._iter)

    def checkpoint(self) -> str:
        """The pipeline's state after the batches consumed so far (DALI checkpointing)."""
        return self._iter.checkpoints()[0]

    def __iter__(self) -> Iterator[Batch]:
        to = self._device
        for out in self._iter:
            d = out[0]
            # Images come out of DALI already on the training device, uint8 NHWC; labels
            # (and on CPU λ, perm) are moved here: a no-op for what is already there.
            views = sum(name.startswith("aug_images_") for name in d)
            for name in ("images", *(f"aug_images_{j}" for j in range(views))):
                if (
                    d[name].dtype != torch.uint8
                    or d[name].dim() != 4
                    or d[name].shape[1:] != d["images"].shape[1:]
                ):
                    raise DalikdError(
                        f"the pipeline's {name.removesuffix('_0')} are "
                        f"{str(d[name].dtype).removeprefix('torch.')} "
                        f"{tuple(d[name].shape)}; a recipe must return uint8 HWC RGB images "
                        f"of the size it receives ({tuple(d['images'].shape[1:])})"
                    )
            yield Batch(
                images=d["images"],
                labels=_flat(d["labels"], self._labels_to, torch.int64),
                aug_images=_views(d, "aug_images", views),
                lam=_flat(_views(d, "lam", views), to, torch.float32),
                perm=_flat(_views(d, "perm", views), to, torch.int64),
                pool=max(views, 1),
            )


def _views(d: dict[str, torch.Tensor], name: str, views: int) -> torch.Tensor | None:
    """Output ``name_0 .. name_{views-1}`` as one tensor, view-major; a single view uncopied.
    (uint8 images: the concatenation copies a quarter of the bytes a float hand-off would.)"""
    parts = [d[f"{name}_{j}"] for j in range(views) if f"{name}_{j}" in d]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _flat(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).to(device, dtype, non_blocking=True)


def train_loader(
    split: Split,
    data: DataConfig,
    recipe: Recipe | None,
    *,
    device: str,
    seed: int,
    shard_id: int = 0,
    num_shards: int = 1,
    granularity: str = "sample",
    pool_size: int = 2,
    checkpoint: str | None = None,
    cpu_labels: bool = False,
    preallocate: bool = False,
) -> Loader:
    """Shuffled, augmented training batches; the incomplete last batch is dropped.

    All shards shuffle with ``seed`` (one shared permutation, split between them); the
    augmentations of shard i draw from ``seed + i``. ``checkpoint`` resumes a saved state.
    ``cpu_labels``: labels handed over on CPU (see :class:`Loader`). ``preallocate``: the GPU
    decoder's preallocation hints and paddings (:func:`decoder_args`); ``dalikd train``'s
    loader sets it, tools leave it off.
    """
    data = _restored_data(data, recipe, checkpoint)
    pipe, names = build_pipeline(
        train_graph, data=data, device=device, seed=seed + shard_id, checkpoint=checkpoint,
        split=split, recipe=recipe, shard_id=shard_id, num_shards=num_shards,
        granularity=granularity, reader_seed=seed, pool_size=pool_size, preallocate=preallocate,
    )  # fmt: skip
    return Loader(pipe, names, last_batch=LastBatchPolicy.DROP, device=torch_device(device),
                  cpu_labels=cpu_labels)  # fmt: skip


def checkpoint_mixing(checkpoint: str | bytes) -> str:
    """The mixing path a DALI checkpoint was saved from ("native" | "composed"): the
    operators of its graph are named in it."""
    return "native" if _native_in(checkpoint, "DalikdMix") else "composed"


def checkpoint_resize(checkpoint: str | bytes) -> str:
    """The resize path a DALI checkpoint was saved from ("native" | "dali")."""
    return "native" if _native_in(checkpoint, "DalikdResize") else "dali"


def _restored_data(data: DataConfig, recipe: Recipe | None, checkpoint: str | None) -> DataConfig:
    """``data`` for a graph that restores ``checkpoint``: a DALI state only restores into the
    graph it was saved from, so its resize and mixing paths win over "auto" and contradict any
    other."""
    if checkpoint is None:
        return data
    resize = checkpoint_resize(checkpoint)
    if data.resize == "auto":
        data = replace(data, resize=resize)
    elif data.resize != resize:
        raise DalikdError(
            f"the data pipeline state was saved with the {resize} resize path; this run asks for "
            f"{data.resize} (--resize {resize} resumes it)"
        )
    if recipe is None or not recipe_info(recipe).mixing:
        return data
    saved = checkpoint_mixing(checkpoint)
    if data.mixing == "auto":
        return replace(data, mixing=saved)
    if data.mixing != saved:
        raise DalikdError(
            f"the data pipeline state was saved with the {saved} mixing path; this run asks for "
            f"{data.mixing} (--mixing {saved} resumes it)"
        )
    return data


def _native_in(checkpoint: str | bytes, name: str) -> bool:
    """Whether a DALI checkpoint's graph holds operator ``name`` (e.g. "DalikdResize"): a
    resumed run rebuilds the same graph whatever DALIKD_NATIVE says now."""
    return (name.encode() if isinstance(checkpoint, bytes) else name) in checkpoint


def val_loader(
    split: Split, data: DataConfig, *, device: str, shard_id: int = 0, num_shards: int = 1
) -> Loader:
    """Every validation image exactly once per epoch, in file order (last batch partial)."""
    pipe, names = build_pipeline(
        val_graph, data=data, device=device, seed=0, split=split,
        shard_id=shard_id, num_shards=num_shards,
    )  # fmt: skip
    return Loader(pipe, names, last_batch=LastBatchPolicy.PARTIAL, device=torch_device(device))

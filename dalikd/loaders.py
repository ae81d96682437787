"""The data loaders: the DALI graphs for training and validation, built into pipelines, and
their hand-off to PyTorch (:class:`Loader`, :func:`train_loader`, :func:`val_loader`).

``pipeline_def`` and the PyTorch iterator are applied here and nowhere else. Both graphs run on
CPU (``device="cpu"``, DALI's ``device_id=None``) or GPU (``device="gpu"``: the decoder runs as
"mixed" and everything after it on the GPU) from the same code. Their outputs are uint8 HWC
images: torch normalizes them on the training device (:mod:`dalikd.batch`). A raw dataset's
files (``plan.raw_shape``: ``dalikd data import``'s) are reshaped, not decoded (:func:`pixels`);
x is a random-resized crop or, for CIFAR and Tiny-ImageNet, a pad-crop (``data.base_view``).

Every graph is built from a :class:`dalikd.plan.DataPlan` (the resolved data settings, recipe,
paths and seeds) and a :class:`dalikd.recipes.Seeds` the builder makes from the loader's seed:
nothing here resolves a setting or draws a seed of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
from dalikd.plan import DataPlan, check_state
from dalikd.recipes import Pool, Seeds, check_output, recipe_error, recipe_info
from dalikd.shards import ShardSplit

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Batch", "torch_device", "train_loader", "val_loader",
]  # fmt: skip

READER = "Reader"
AnySplit = Split | ShardSplit  # what read() reads: a folder's files or a shard set's samples


# -- graph pieces (DataNode -> DataNode) ---------------------------------------------------------


def read(
    split: AnySplit,
    *,
    shuffle: bool,
    shard_id: int,
    num_shards: int,
    seed: int = 0,
    indexed: bool = False,
    small_files: bool = False,
) -> tuple[Any, Any, Any]:
    """Encoded images, int32 labels and (``indexed``) each sample's position of this rank's
    part of ``split``: a folder's files (DALI's file reader) or a shard set's samples
    (:func:`dalikd.shard_source.read_shards`; a position is the sample's number, and the labels
    are read from the shards). A folder read ``indexed`` hands over each file's position in
    ``split`` as its label instead (:class:`Loader` maps it to its label) and no third output.
    ``pad_last_batch`` gives every rank the same number of batches; ``shuffle`` reshuffles each
    epoch, and the same ``seed`` on every rank makes the ranks split one shared order.
    ``small_files`` (raw images of a few KB): plain reads instead of a memory map per file,
    which cost ~10 µs of CPU per 3 KB CIFAR image more (benchmarks/README.md)."""
    if isinstance(split, ShardSplit):
        from dalikd.shard_source import read_shards

        images, labels, numbers = read_shards(split, shuffle=shuffle, shard_id=shard_id,
                                              num_shards=num_shards, seed=seed)  # fmt: skip
        return images, labels, numbers if indexed else None
    jpegs, labels = fn.readers.file(
        dont_use_mmap=small_files,
        seed=seed,
        files=list(split.files),
        labels=list(range(len(split))) if indexed else list(split.labels),
        name=READER,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=shuffle,
        pad_last_batch=True,
    )
    return jpegs, labels, None


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


def pixels(encoded: Any, plan: DataPlan, preallocate: bool = False) -> Any:
    """The images of the files :func:`read` gives, whole: uint8 HWC RGB on ``plan.device``.
    Raw files (``plan.raw_shape``: ``dalikd data import``'s headerless pixels) are reshaped,
    nothing decoded (on GPU then copied there: a few KB per image); encoded files go through
    DALI's image decoder ("mixed" on GPU; ``preallocate``: :func:`decoder_args`). A raw file
    of another size fails here as a damaged image fails in the decoder."""
    if plan.raw_shape:
        images = fn.reshape(encoded, shape=list(plan.raw_shape), layout="HWC")
        return images.gpu() if plan.device == "gpu" else images
    args = decoder_args(plan.data, plan.device, preallocate)
    return fn.decoders.image(encoded, **args, output_type=types.RGB)


def random_crop_decode(jpegs: Any, plan: DataPlan, seeds: Seeds | None = None) -> Any:
    """Decode only a random crop window (area in crop_scale, aspect in crop_ratio), at its own
    size. Out: uint8 HWC RGB on ``plan.device``."""
    data = plan.data
    return fn.decoders.image_random_crop(
        jpegs,
        **decoder_args(data, plan.device, plan.preallocate),
        output_type=types.RGB,
        random_area=list(data.crop_scale),
        random_aspect_ratio=list(data.crop_ratio),
        num_attempts=10,
        **ops.seed(seeds),
    )


def random_resized_crop(
    jpegs: Any, plan: DataPlan, seeds: Seeds | None = None, flip: bool = False
) -> Any:
    """:func:`random_crop_decode`, resized to image_size², and with ``flip`` mirrored
    horizontally with probability 1/2 (a coin per sample). Out: uint8 HWC RGB on
    ``plan.device``. The resize is the plan's: dalikd's fn.dalikd_resize (the flip fused in) or
    DALI's fn.resize."""
    data = plan.data
    images = random_crop_decode(jpegs, plan, seeds)
    # the coin is made where it is used: the operators keep the order (and DALI's instance
    # names) of the graphs checkpoints were saved from
    if plan.native_resize:
        kw = {"flip": fn.random.coin_flip(probability=0.5, **ops.seed(seeds))} if flip else {}
        return fn.dalikd_resize(images, size_y=data.image_size, size_x=data.image_size, **kw)
    images = fn.resize(
        images, resize_x=data.image_size, resize_y=data.image_size, antialias=data.antialias
    )
    if not flip:
        return images
    return fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5, **ops.seed(seeds)))


def center_crop(jpegs: Any, plan: DataPlan) -> Any:
    """Decode, resize the shorter side to image_size / val_crop_fraction, crop the centre
    image_size². Deterministic. Out: uint8 HWC RGB on ``plan.device``."""
    data = plan.data
    images = pixels(jpegs, plan)
    shorter = round(data.image_size / data.val_crop_fraction)
    if plan.native_resize:
        images = fn.dalikd_resize(images, resize_shorter=shorter)
    else:
        images = fn.resize(images, resize_shorter=shorter, antialias=data.antialias)
    return fn.crop(images, crop=(data.image_size, data.image_size))


def pad_crop(encoded: Any, plan: DataPlan, seeds: Seeds | None = None) -> Any:
    """The whole image zero-padded by ``data.pad`` px on every side, a random image_size² window
    of it, mirrored with p = 1/2 (:func:`dalikd.ops.crop_flip`, a draw per image): torchvision's
    RandomCrop(size, padding=pad) + RandomHorizontalFlip, the reference's x on CIFAR (32 px,
    pad 4) and Tiny-ImageNet (64 px, pad 8). The padding is zeros in uint8 space, as there.
    Out: uint8 HWC RGB on ``plan.device``."""
    images = pixels(encoded, plan, plan.preallocate)
    return ops.crop_flip(images, plan.data.image_size, pad=plan.data.pad, seeds=seeds)


def raw_random_resized_crop(raw: Any, plan: DataPlan, seeds: Seeds | None = None) -> Any:
    """:func:`random_resized_crop` of raw images (nothing to decode a window of): DALI's
    ``fn.random_resized_crop`` over the reshaped image (the same area and aspect ranges, its
    own resize), then the flip. Out: uint8 HWC RGB on ``plan.device``."""
    data = plan.data
    images = fn.random_resized_crop(
        pixels(raw, plan), size=[data.image_size, data.image_size],
        random_area=list(data.crop_scale), random_aspect_ratio=list(data.crop_ratio),
        num_attempts=10, antialias=data.antialias, **ops.seed(seeds),
    )  # fmt: skip
    return fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5, **ops.seed(seeds)))


def base_view(jpegs: Any, plan: DataPlan, seeds: Seeds) -> Any:
    """x, the training view every recipe starts from (``data.base_view``): random-resized-crop
    + flip, or :func:`pad_crop` (+ flip). Its draws take the ``base`` stream of ``seeds``,
    apart from the recipe's."""
    base = seeds.stream("base")
    if plan.data.base_view == "pad_crop":
        return pad_crop(jpegs, plan, base)
    if plan.raw_shape:
        return raw_random_resized_crop(jpegs, plan, base)
    return random_resized_crop(jpegs, plan, base, flip=True)


def train_graph(
    split: AnySplit,
    plan: DataPlan,
    seeds: Seeds,
    *,
    shard_id: int,
    num_shards: int,
    reader_seed: int = 0,
    indexed: bool = False,
    shuffle: bool = True,
) -> dict[str, Any]:
    """x = :func:`base_view` of each file; x' = the plan's recipe of x, from the same decode
    (``plan.pool_size`` views per image). Every image output is uint8 HWC. ``shuffle``: DALI's
    global reshuffle each epoch; without it the files are read in ``split``'s order.

    On GPU, λ and perm leave the pipeline as GPU nodes (``.gpu()``; a no-op for the native
    operator's λ, already there): a CPU node that also feeds GPU work (``images * lam``) is
    allocated in pinned host memory, which DALI exports over DLPack as kDLCUDAHost, a device
    type torch's ``from_dlpack`` rejects. Labels feed nothing on the GPU and stay on CPU."""
    jpegs, labels, index = read(split, shuffle=shuffle, shard_id=shard_id, num_shards=num_shards,
                                seed=reader_seed, indexed=indexed,
                                small_files=bool(plan.raw_shape))  # fmt: skip
    images = base_view(jpegs, plan, seeds)
    outputs = {"images": images, "labels": labels}
    if index is not None:  # a shard set's sample numbers (a folder's positions are its labels)
        outputs["index"] = index
    if plan.recipe is not None:
        out = plan.recipe(images, plan.aug_context(seeds))
        check_output(plan.recipe, out, plan.pool_size)
        gpu = plan.device == "gpu"
        for j, view in enumerate(out.views if isinstance(out, Pool) else (out,)):
            outputs[f"aug_images_{j}"] = view.images
            if view.lam is not None:  # float32 and int32 here; the Loader makes perm int64
                outputs[f"lam_{j}"] = view.lam.gpu() if gpu else view.lam
                outputs[f"perm_{j}"] = view.perm.gpu() if gpu else view.perm
    return outputs


def val_view(jpegs: Any, plan: DataPlan) -> Any:
    """The validation transform (``data.val_transform``, deterministic): :func:`center_crop`,
    or none: the images as stored (:func:`pixels`; the reference's CIFAR and Tiny-ImageNet
    test transform is ToTensor + Normalize alone)."""
    if plan.data.val_transform == "none":
        return pixels(jpegs, plan)
    return center_crop(jpegs, plan)


def val_graph(
    split: AnySplit, plan: DataPlan, seeds: Seeds, *, shard_id: int, num_shards: int
) -> dict[str, Any]:
    """Every file of this shard once, in order, through :func:`val_view` (``seeds``: unused,
    the view draws nothing)."""
    jpegs, labels, _ = read(split, shuffle=False, shard_id=shard_id, num_shards=num_shards,
                            small_files=bool(plan.raw_shape))  # fmt: skip
    return {"images": val_view(jpegs, plan), "labels": labels}


# -- pipeline + iterator -------------------------------------------------------------------------


def _dali_device_id(device: str) -> int | None:
    return torch.cuda.current_device() if device == "gpu" else None


def build_pipeline(
    graph,
    plan: DataPlan,
    *,
    seed: int,
    checkpoint: str | bytes | None = None,
    **graph_kwargs,
):
    """Apply pipeline_def to a graph function ``graph(plan=, seeds=, **graph_kwargs)``
    returning a dict of named outputs; its ``seeds`` start from ``seed``, the pipeline's.

    Returns ``(pipeline, output names)``. The graph is traced here; nothing is built yet.
    Checkpointing is always on: ``checkpoint`` (from :meth:`Loader.checkpoint`) restores the
    readers and every random operator bit-exactly, mid-epoch included.
    """
    names: list[str] = []
    errors: list[DalikdError] = []

    def graph_fn():
        try:
            outputs = graph(plan=plan, seeds=Seeds(seed), **graph_kwargs)
        except DalikdError as e:  # conditionals' tracing rewrites it into a multi-line one
            errors.append(e)
            raise
        except Exception as e:  # a user recipe's own mistake: its line, then where
            said = recipe_error(plan.recipe, e)
            if said is None:
                raise
            errors.append(said)
            raise said from None
        names.extend(outputs)
        return tuple(outputs.values())

    try:
        pipe = pipeline_def(graph_fn, enable_conditionals=True, enable_checkpointing=True)(
            batch_size=plan.data.batch_size,
            num_threads=plan.data.threads,
            device_id=_dali_device_id(plan.device),
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
    ``pool_size``: the x' views per image the graph makes (the plan's). ``labels``: the label
    of each file where the reader hands over file positions (``indexed`` graphs): a batch then
    carries those as ``index`` (on CPU, where a caller reads them without a device sync) and
    their labels, looked up on the CPU and moved to the device once."""

    def __init__(
        self,
        pipe,
        names: list[str],
        *,
        pool_size: int,
        last_batch: LastBatchPolicy,
        device: torch.device,
        labels: Sequence[int] | None = None,
        recipe: str = "",
    ):
        self._device, self._pool_size = device, pool_size
        self._recipe = recipe  # names the recipe in its mistakes ("recipe cutmix")
        self._labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
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

    def _outputs(self) -> Iterator[Any]:
        """The iterator's outputs; a batch of images of several sizes is the recipe's mistake
        (DALI hands over only batches of one shape), one line naming it."""
        iterator = iter(self._iter)
        while True:
            try:
                out = next(iterator)
            except StopIteration:
                return
            except RuntimeError as e:
                if "IsDenseTensor" not in str(e) and "uniform shape" not in str(e):
                    raise
                raise DalikdError(
                    f"{self._recipe or 'the pipeline'} returns images whose size varies from "
                    "sample to sample; a recipe must return uint8 HWC RGB images of the size it "
                    "receives"
                ) from None
            yield out

    def __iter__(self) -> Iterator[Batch]:
        to = self._device
        for out in self._outputs():
            d = out[0]
            if not len(d["labels"]):
                # a shard one sample short of the others ends in an empty batch (DALI's
                # pad_last_batch with LastBatchPolicy.PARTIAL): nothing to hand over
                continue
            # Images come out of DALI already on the training device, uint8 NHWC; labels
            # (and on CPU λ, perm) are moved here: a no-op for what is already there.
            pool_size = self._pool_size
            for name in ("images", *(f"aug_images_{j}" for j in range(pool_size))):
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
            index = None
            labels = _flat(d["labels"], to, torch.int64)
            if "index" in d:  # a shard set's sample numbers, beside their labels
                index = _flat(d["index"], torch.device("cpu"), torch.int64)
            elif self._labels is not None:  # file positions: the labels follow on the CPU
                index = _flat(d["labels"], torch.device("cpu"), torch.int64)
                labels = self._labels[index].to(to, non_blocking=True)
            yield Batch(
                images=d["images"],
                labels=labels,
                aug_images=_views(d, "aug_images", pool_size),
                lam=_flat(_views(d, "lam", pool_size), to, torch.float32),
                perm=_flat(_views(d, "perm", pool_size), to, torch.int64),
                pool_size=max(pool_size, 1),
                index=index,
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
    split: AnySplit,
    plan: DataPlan,
    *,
    seed: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    checkpoint: str | bytes | None = None,
    indexed: bool = False,
    ordered: bool = False,
) -> Loader:
    """Shuffled, augmented training batches of ``plan``; the incomplete last batch is dropped.

    All shards shuffle with ``seed`` (default: the plan's; one shared permutation, split between
    them); the augmentations of shard i draw from ``seed + i``. ``checkpoint`` resumes a saved
    state (of a graph of the same paths: one line otherwise). ``indexed``: batches carry each
    sample's position in ``split`` (:class:`Loader`). ``ordered``: ``split`` is this shard's
    own reads, in order (dalikd.recovery orders the epochs): read whole, not shuffled or
    sharded again (``shard_id`` then seeds only the augmentations).
    """
    seed = plan.seed if seed is None else seed
    if checkpoint is not None:
        check_state(plan, checkpoint)
    reader = {"shard_id": shard_id, "num_shards": num_shards}
    if ordered:
        reader = {"shard_id": 0, "num_shards": 1, "shuffle": False}
    pipe, names = build_pipeline(
        train_graph, plan, seed=seed + shard_id, checkpoint=checkpoint, split=split,
        reader_seed=seed, indexed=indexed, **reader,
    )  # fmt: skip
    labels = split.labels if indexed and isinstance(split, Split) else None
    recipe = f"recipe {recipe_info(plan.recipe).name}" if plan.recipe is not None else ""
    return Loader(pipe, names, pool_size=plan.pool_size, last_batch=LastBatchPolicy.DROP,
                  device=torch_device(plan.device), labels=labels, recipe=recipe)  # fmt: skip


def val_loader(
    split: AnySplit, plan: DataPlan, *, shard_id: int = 0, num_shards: int = 1
) -> Loader:
    """Every validation image exactly once per epoch, in file order (last batch partial)."""
    pipe, names = build_pipeline(
        val_graph, plan, seed=0, split=split, shard_id=shard_id, num_shards=num_shards
    )
    return Loader(pipe, names, pool_size=0, last_batch=LastBatchPolicy.PARTIAL,
                  device=torch_device(plan.device))  # fmt: skip

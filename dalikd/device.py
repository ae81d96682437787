"""Where and in which precision the models run; one switch, the same code on CPU and GPU."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch

from dalikd.batch import IMAGENET_NORM, Batch, InputNorm, normalize
from dalikd.errors import DalikdError


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' when CUDA is available, else 'cpu'."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise DalikdError("--device gpu asked for, but torch sees no CUDA device; use --device cpu")
    return device


def torch_device(device: str) -> torch.device:
    """The torch device of dalikd's ``device`` ("cpu" | "gpu": the current CUDA device)."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if device == "gpu"
        else torch.device("cpu")
    )


def amp_dtype(device: str, precision: str) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPU by default; fp32 (None) on CPU, where bf16 is slow."""
    if precision == "auto":
        return torch.bfloat16 if device == "gpu" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: str, precision: str):
    dtype = amp_dtype(device, precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast("cuda" if device == "gpu" else "cpu", dtype=dtype)


def prepare_images(
    images: torch.Tensor, device: str, norm: InputNorm = IMAGENET_NORM, channels_last: bool = True
) -> torch.Tensor:
    """The model's input from the pipeline's uint8 NHWC images: float32 NCHW, normalized with
    the model's own ``norm`` (:func:`dalikd.models.input_norm`), on the images' device
    (channels_last memory on GPU unless ``channels_last`` is False), in every precision:
    autocast, where on, casts inside the model."""
    return normalize(images, channels_last=channels_last and device == "gpu", norm=norm)


def prepare_batch(
    batch: Batch, device: str, norm: InputNorm = IMAGENET_NORM, channels_last: bool = True
) -> Batch:
    """``batch`` with its images (x, and x' where there is one) as the model's input."""
    aug = batch.aug_images
    return replace(
        batch,
        images=prepare_images(batch.images, device, norm, channels_last),
        aug_images=None if aug is None else prepare_images(aug, device, norm, channels_last),
    )


def place(model: torch.nn.Module, device: str, channels_last: bool = True) -> torch.nn.Module:
    """``model`` on ``device``; channels_last memory on a GPU (the layout its convolutions
    prefer, and the one :func:`prepare_images` hands over there)."""
    model.to(torch_device(device))
    if device == "gpu" and channels_last:
        model.to(memory_format=torch.channels_last)
    return model

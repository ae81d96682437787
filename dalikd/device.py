"""Where and in which precision the models run; one switch, the same code on CPU and GPU."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from dalikd.errors import DalikdError


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' when CUDA is available, else 'cpu'."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise DalikdError("--device gpu asked for, but torch sees no CUDA device; use --device cpu")
    return device


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


def prepare_images(images: torch.Tensor, device: str, precision: str) -> torch.Tensor:
    if device == "gpu":
        images = images.contiguous(memory_format=torch.channels_last)
    if amp_dtype(device, precision) is None:
        images = images.float()  # an fp16 hand-off meets fp32 weights; a no-op for fp32
    return images

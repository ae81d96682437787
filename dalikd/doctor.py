"""What this installation runs with: versions, CUDA, and which mixing path is active.

:func:`report` is the library half of ``dalikd doctor``; it builds the native operator if it
is not cached yet (that is the check), and never raises for a missing piece.
"""

from __future__ import annotations

import platform
from typing import Any


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # a missing or broken package is part of the report
        return f"unavailable ({type(e).__name__})"


def report() -> dict[str, Any]:
    """Versions, CUDA as torch sees it, the native operator's state and the active mixing path
    per device ("native" or "composed: <why>"). On a CUDA machine the GPU backend is run on the
    GPU (:func:`dalikd.native.verify_gpu`): "gpu_backend" is "verified on <GPU>" or "not used:
    <why>"."""
    import nvidia.dali
    import torch

    from dalikd import native
    from dalikd.native.builder import retry_reason

    mode = native.mode()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "dali": nvidia.dali.__version__,
        "dali_cuda": str(getattr(nvidia.dali, "__cuda_version__", "")),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "native_mode": mode,
    }
    if mode == "0":
        info["native"] = None
        info["gpu_backend"] = "not used: DALIKD_NATIVE=0"
        info["mixing"] = {"cpu": "composed: DALIKD_NATIVE=0", "gpu": "composed: DALIKD_NATIVE=0"}
        info["resize"] = _resize_paths()
        return info
    status = native.load()
    build = status.build
    verified, gpu_backend = _gpu_backend(status)
    info["native"] = {
        "cache": str(native.build_root() / native.build_key()),
        "toolchain": build.toolchain if build else "",
        "nvcc": build.nvcc_version if build else "",
        "loaded": status.loaded,
        "cpu": "loaded" if status.cpu else f"unavailable: {status.reason}",
        "gpu": "built and loaded" if status.gpu else status.gpu_reason,
        # a build that failed for a cause that may pass (a full disk, a missing file): retried
        "retry": retry_reason(build),
    }
    info["gpu_backend"] = gpu_backend  # run on this machine's GPU against the composed graph
    fallback = "error (DALIKD_NATIVE=1)" if mode == "1" else "composed"
    info["mixing"] = {
        "cpu": "native" if status.cpu else f"{fallback}: {status.reason}",
        "gpu": "native"
        if verified
        else f"{fallback}: {status.reason or gpu_backend.removeprefix('not used: ')}",
    }
    info["resize"] = _resize_paths()
    return info


def _gpu_backend(status: Any) -> tuple[bool, str]:
    """The mixing operator's GPU backend, run on this machine's GPU against the composed graph
    (:func:`dalikd.native.verify_gpu`, which records a pass): ``(verified, "verified on <GPU>"
    | "not used: <why>")``."""
    from dalikd import native

    verified, detail = native.verify_gpu() if status.gpu else (False, status.gpu_reason)
    return verified, f"verified on {detail}" if verified else f"not used: {detail}"


def _resize_paths() -> dict[str, str]:
    """The antialiased resize per device: dalikd's operator, or DALI's fn.resize and why.
    (--no-antialias always runs DALI's non-antialiased fn.resize.)"""
    from dalikd import native

    paths = {}
    for device in ("cpu", "gpu"):
        reason = native.resize_reason(device)
        paths[device] = "native (fn.dalikd_resize)" if not reason else f"DALI fn.resize: {reason}"
    return paths


def build_native() -> dict[str, Any]:
    """Build the native operators for this DALI and these sources, or confirm the cached build,
    and where a CUDA GPU is visible run the GPU backend there once (``dalikd doctor --build``:
    once, before many ranks start; a verified GPU is recorded beside the library, so later
    processes skip that run). Never raises for a failed compile: ``cpu_library`` is then None
    and ``cpu_error`` says why; ``gpu_backend`` is "verified on <GPU>" or "not used: <why>"."""
    from dataclasses import asdict

    from dalikd import native
    from dalikd.native.builder import retry_reason

    cached = native.is_cached()
    info, folder = native.build()
    built = {"folder": str(folder), "cached": cached, **asdict(info), "retry": retry_reason(info)}
    if native.mode() == "0":
        built["gpu_backend"] = "not used: DALIKD_NATIVE=0"
    elif info.gpu_library is None:
        built["gpu_backend"] = f"not used: {info.gpu_error}"
    else:
        built["gpu_backend"] = _gpu_backend(native.load())[1]
    return built

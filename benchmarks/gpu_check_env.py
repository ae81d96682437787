"""What ``benchmarks/gpu_check.py`` runs with: the pre-flight import of every package it and the
CLI need, and the versions it prints (DALI, nvImageCodec, nvJPEG, the CUDA runtimes, the
driver). Standard library only at import, so the pre-flight can name a missing numpy too."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

# What the check and the CLI import (DALI's own imports included), checked before any case.
PREFLIGHT = ("numpy", "PIL", "torch", "torchvision", "six", "packaging", "optree", "gast",
             "astunparse", "nvidia.dali", "click", "rich", "dalikd")  # fmt: skip


def preflight() -> list[str]:
    """The packages of PREFLIGHT that do not import, each with its error's first line."""
    missing = []
    for name in PREFLIGHT:
        try:
            importlib.import_module(name)
        except Exception as e:  # a broken install is as fatal as a missing one
            first = (str(e).splitlines() or [""])[0][:120]
            missing.append(f"{name} ({type(e).__name__}: {first})")
    return missing


# -- versions ------------------------------------------------------------------------------------


def _nvidia_library(folder: str, pattern: str):
    """A shared library under the ``nvidia`` namespace package (pip's and the bundle's
    layout), loaded; None where there is none."""
    import ctypes

    try:  # its __path__, also where the procedure's sitecustomize.py extended it
        import nvidia
    except ImportError:
        return None
    for base in list(getattr(nvidia, "__path__", [])):
        for path in sorted((Path(base) / folder).glob(pattern)):
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                continue
    return None


def _dotted(version: int, major: int, minor: int) -> str:
    return f"{version // major}.{version % major // minor}"


def library_versions() -> dict[str, str | None]:
    """nvImageCodec's and nvJPEG's versions as the libraries report them (the ones DALI's
    decoders load from the ``nvidia`` package), and the CUDA runtime nvImageCodec was built
    with; None where a library is missing."""
    import ctypes

    info: dict[str, str | None] = {"nvimgcodec": None, "nvimgcodec_cuda": None, "nvjpeg": None}
    codec = _nvidia_library("nvimgcodec", "libnvimgcodec.so*")
    if codec is not None:

        class Properties(ctypes.Structure):  # nvimgcodecProperties_t (nvimgcodec.h)
            _fields_ = [("struct_type", ctypes.c_int), ("struct_size", ctypes.c_size_t),
                        ("struct_next", ctypes.c_void_p), ("version", ctypes.c_uint32),
                        ("cudart_version", ctypes.c_uint32)]  # fmt: skip

        props = Properties(1, ctypes.sizeof(Properties), None, 0, 0)  # type PROPERTIES = 1
        if codec.nvimgcodecGetProperties(ctypes.byref(props)) == 0:
            v = props.version  # major * 1000 + minor * 100 + patch
            info["nvimgcodec"] = f"{v // 1000}.{v % 1000 // 100}.{v % 100}"
            info["nvimgcodec_cuda"] = _dotted(props.cudart_version, 1000, 10)
    nvjpeg = _nvidia_library("nvjpeg/lib", "libnvjpeg.so*")
    if nvjpeg is not None:
        parts = []
        for prop in range(3):  # libraryPropertyType: MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
            value = ctypes.c_int()
            if nvjpeg.nvjpegGetProperty(prop, ctypes.byref(value)) != 0:
                break
            parts.append(str(value.value))
        info["nvjpeg"] = ".".join(parts) if len(parts) == 3 else None
    return info


def driver_versions() -> tuple[str | None, str | None]:
    """The NVIDIA driver's release (nvidia-smi, else /proc) and the CUDA version it supports
    (cuDriverGetVersion); None where unknown."""
    import ctypes

    release = None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
        release = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    if release is None:
        try:
            proc = Path("/proc/driver/nvidia/version").read_text()
            found = re.search(r"Kernel Module\s+(\S+)", proc)
            release = found.group(1) if found else None
        except OSError:
            pass
    cuda = None
    try:
        value = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(value)) == 0:
            cuda = _dotted(value.value, 1000, 10)
    except OSError:
        pass
    return release, cuda


def versions(device: str) -> dict:
    """What the check ran with: the GPU, driver, CUDA (torch's runtime; DALI links its own),
    torch, DALI, nvImageCodec, nvJPEG."""
    import nvidia.dali
    import torch

    cuda = str(getattr(nvidia.dali, "__cuda_version__", ""))
    info = {"gpu": None, "driver": None, "driver_cuda": None, "cuda": torch.version.cuda,
            "torch": torch.__version__, "dali": nvidia.dali.__version__,
            # DALI's CUDA: major * 1000 + minor * 100 + build (12986: 12.9, build 86)
            "dali_cuda": _dotted(int(cuda), 1000, 100) if cuda.isdigit() else None,
            **library_versions()}  # fmt: skip
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["driver"], info["driver_cuda"] = driver_versions()
    return info


def versions_line(info: dict) -> str:
    return (
        f"versions: DALI {info['dali']} (CUDA runtime {info['dali_cuda']}, linked in), "
        f"nvImageCodec {info['nvimgcodec']} (CUDA {info['nvimgcodec_cuda']}), nvJPEG "
        f"{info['nvjpeg']}, torch {info['torch']} (CUDA runtime {info['cuda']}), driver "
        f"{info['driver']} (CUDA {info['driver_cuda']}), GPU {info['gpu']}"
    )

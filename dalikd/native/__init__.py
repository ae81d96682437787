"""dalikd's native DALI operators (``fn.dalikd_mix``, ``fn.dalikd_resize``): load, verify,
choose, fall back.

The C++ sources next to this file (``mix.h``, ``mix_cpu.cc``, ``mix_gpu.cu``, ``resize*``) are
compiled on first use against the installed DALI by :mod:`dalikd.native.builder` (g++ for the
CPU operator, and nvcc, where there is one, for a second library that also has the GPU
operator), cached in ``cache_dir()/native/<DALI version>-<source hash>/``, and loaded here
with ``nvidia.dali.plugin_manager.load_library``.

The mixing path is configuration, ``data.mixing`` (``--mixing``): ``native``, ``composed``, or
``auto``, resolved once per run by :func:`resolve` and saved in config.json and the checkpoint.
``auto`` takes ``DALIKD_NATIVE`` as its default: ``auto`` (default) uses the operator where it loads
and otherwise the composed stock-operator graph of :mod:`dalikd.ops`, with one warning per
process naming the reason; ``1`` makes an unavailable operator an error; ``0`` never builds it.
On the GPU "loads" is not enough: before its first use in a process the GPU backend runs a tiny
pipeline on the GPU itself, in a child process, and must match the composed graph there
(:func:`verify_gpu`; a pass is recorded per GPU and driver beside the library); otherwise the
composed graph is used (or, with ``1``, an error raised).
``DALIKD_CXX`` / ``DALIKD_NVCC`` name the compilers (default ``$CXX`` or g++, and nvcc from
``$CUDA_HOME``, ``PATH`` or /usr/local/cuda), ``DALIKD_CUDA_INCLUDE`` the CUDA headers (DALI's
headers include cuda_runtime.h, so even the CPU operator needs them), ``DALIKD_NATIVE_GPU=0``
skips the CUDA build.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from dalikd.errors import DalikdError
from dalikd.native.builder import (  # the build, re-exported: native.build() etc.
    GPU_UNVERIFIED,
    SMOKE_TIMEOUT_S,
    BuildInfo,
    build,
)
from dalikd.native.builder import RESIZE_SOURCES as RESIZE_SOURCES
from dalikd.native.builder import SOURCES as SOURCES
from dalikd.native.builder import build_key as build_key
from dalikd.native.builder import build_root as build_root
from dalikd.native.builder import find_nvcc as find_nvcc
from dalikd.native.builder import is_cached as is_cached
from dalikd.native.builder import source_hash as source_hash

MODES = ("auto", "0", "1")


@dataclass(frozen=True)
class Status:
    """The operator in this process: what loaded, and why not where it did not."""

    build: BuildInfo | None  # None when the build itself could not run
    loaded: str | None  # the library loaded into DALI, or None
    cpu: bool  # fn.dalikd_mix runs on CPU
    gpu: bool  # ... and has a GPU backend (compiled and loaded; see verify_gpu for running)
    reason: str  # why the CPU operator is unavailable, or ""
    gpu_reason: str  # why there is no GPU backend, or GPU_UNVERIFIED


def mode() -> str:
    value = os.environ.get("DALIKD_NATIVE", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise DalikdError(f"DALIKD_NATIVE={value}; known: {', '.join(MODES)}")
    return value


# -- load ----------------------------------------------------------------------------------------


@functools.cache  # a library loads into DALI once per process; so does this answer
def load() -> Status:
    """Build if needed and load the best library into DALI, whatever DALIKD_NATIVE says (see
    :func:`use_native`). Never raises."""
    try:
        info, folder = build()
    except Exception as e:  # a read-only cache, a full disk: fall back, but say why
        return Status(None, None, False, False, f"build failed: {e}", "build failed")
    from nvidia.dali import plugin_manager

    for library, gpu in ((info.gpu_library, True), (info.cpu_library, False)):
        if library is None:
            continue
        try:
            plugin_manager.load_library(str(folder / library))
        except RuntimeError as e:
            info = BuildInfo(**{**asdict(info), "gpu_error": f"does not load: {e}"})
            continue
        gpu_reason = GPU_UNVERIFIED + _cuda_mismatch(info) if gpu else info.gpu_error
        return Status(info, str(folder / library), True, gpu, "", gpu_reason)
    return Status(info, None, False, False, info.cpu_error, info.gpu_error)


def _cuda_mismatch(info: BuildInfo) -> str:
    """A note when nvcc's CUDA major differs from the one DALI was built with: the kernel then
    needs a driver new enough for nvcc's CUDA, not only for DALI's."""
    nvcc = re.search(r"release (\d+)\.", info.nvcc_version)
    dali = int(info.dali_cuda_version) // 1000 if info.dali_cuda_version.isdigit() else None
    if nvcc is None or dali is None or int(nvcc.group(1)) == dali:
        return ""
    return (
        f"; compiled by nvcc {nvcc.group(1)} for a DALI built with CUDA {dali}: needs a driver "
        f"that supports CUDA {nvcc.group(1)}"
    )


_GPU_SMOKE = r"""
import sys
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, plugin_manager, types
plugin_manager.load_library(sys.argv[1])
from dalikd import ops  # native=False below: the composed graph, no plugin loading
S, B = 16, 5
rng = np.random.default_rng(0)
x = [rng.integers(0, 256, (S, S, 3), np.uint8) for _ in range(B)]
def arg(values, dtype):
    return fn.external_source(source=lambda: [np.array(v, dtype) for v in values], batch=True)
@pipeline_def(batch_size=B, num_threads=1, device_id=int(sys.argv[2]), seed=0)
def pipe():
    images = fn.external_source(source=lambda: x, batch=True, layout="HWC").gpu()
    # the last box is empty (λ = 1) inside the image: the composed GPU paste's edge case
    perm, lam = arg([1, 2, 3, 4, 0], np.int32), arg([0.3, 0.5, 0.75, 0.9, 1.0], np.float32)
    centre = arg([[0, 0], [8, 8], [15, 3], [5, 12], [7, 9]], np.int32)
    cut, cut_lam = fn.dalikd_mix(images, mode="cutmix", perm=perm, lam=lam, centre=centre)
    ref, ref_lam, _ = ops.cutmix(images, S, perm=perm, lam=lam, centre=centre, native=False)
    mix = fn.dalikd_mix(images, mode="mixup", perm=perm, lam=lam)[0]
    mix_ref = ops.mixup(images, perm=perm, lam=lam, native=False)[0]
    return cut, cut_lam, ref, ref_lam.gpu(), mix, mix_ref
p = pipe()
p.build()
out = [o.as_cpu().as_array() for o in p.run()]
for name, a, b in (("cutmix", 0, 2), ("cutmix lambda", 1, 3), ("mixup", 4, 5)):
    assert out[a].shape == out[b].shape and (out[a] == out[b]).all(), f"{name} differs"
print(torch.cuda.get_device_name(int(sys.argv[2])))
"""


@functools.cache  # once per process: the answer does not change while it runs
def verify_gpu() -> tuple[bool, str]:
    """Run the GPU backend on the current CUDA device, in a child process (a crash or hang in
    the operator must not take this one down), against the composed graph on the same inputs.
    ``(True, GPU name)`` when bit-identical, else ``(False, why)``. Never raises.

    A pass is recorded beside the library (``gpu_verified.json``, keyed by the GPU, its compute
    capability, the driver and torch's CUDA), so later processes on the same machine, every
    torchrun rank among them, skip the ~5-10 s child run. A failure is never recorded."""
    status = load()
    if not status.gpu:
        return False, f"no GPU backend: {status.gpu_reason}"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch"
        device = torch.cuda.current_device()
    except Exception as e:  # a broken CUDA install is a reason, not a crash
        return False, f"CUDA: {type(e).__name__}: {e}"
    assert status.loaded is not None  # status.gpu: the GPU library loaded
    record, identity = _verified_record(status.loaded), _gpu_identity(device)
    verified = _read_verified(record)
    if identity and identity in verified:
        return True, verified[identity]
    ok, detail = _gpu_smoke(status.loaded, device)
    if ok and identity:
        _write_verified(record, {**_read_verified(record), identity: detail})
    return ok, detail


def _verified_record(library: str) -> Path:
    return Path(library).parent / "gpu_verified.json"


def _gpu_identity(device: int) -> str:
    """What a recorded pass holds for: GPU, compute capability, driver, torch's CUDA; "" where
    the driver version cannot be read (then nothing is recorded or trusted)."""
    try:
        import torch

        props = torch.cuda.get_device_properties(device)
    except Exception:  # no CUDA: nothing to key a record on
        return ""
    driver = _driver_version()
    if not driver:
        return ""
    return f"{props.name} sm_{props.major}{props.minor} | {driver} | CUDA {torch.version.cuda}"


def _driver_version() -> str:
    """The NVIDIA driver, for the key of a recorded pass: /proc/driver/nvidia/version's first
    line; where a container has no such file, nvidia-smi's driver version, else the CUDA
    version of the driver that torch loaded (libcuda's cuDriverGetVersion); "" when none
    answers."""
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        pass
    return _smi_driver() or _libcuda_driver()


def _smi_driver() -> str:
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"NVIDIA driver {out[0]}" if out else ""


def _libcuda_driver() -> str:
    import ctypes

    version = ctypes.c_int()
    try:
        status = ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
    except (OSError, AttributeError):
        return ""
    if status != 0 or version.value <= 0:
        return ""
    return f"CUDA driver {version.value // 1000}.{version.value % 1000 // 10}"


def _read_verified(record: Path) -> dict[str, str]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_verified(record: Path, verified: dict[str, str]) -> None:
    """Through dalikd.atomic (ranks verify at once), 0644 as the build's other files; a
    read-only folder only costs the next run a check."""
    from dalikd.atomic import write_text_atomic

    with contextlib.suppress(DalikdError):
        write_text_atomic(json.dumps(verified, indent=1) + "\n", record, mode=0o644)


def _gpu_smoke(library: str, device: int) -> tuple[bool, str]:
    try:
        proc = subprocess.run([sys.executable, "-c", _GPU_SMOKE, library, str(device)],
                              capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)  # fmt: skip
    except subprocess.SubprocessError as e:
        return False, f"its test run on the GPU did not finish: {e}"
    if proc.returncode == 0:
        return True, (proc.stdout.strip().splitlines() or ["GPU"])[-1]
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"its test run on the GPU failed: {last}"


def _gpu_reason(status: Status) -> str:
    """Why the GPU backend is not used, or "" when it is loaded and verified on this GPU."""
    if status.reason:
        return status.reason
    if not status.gpu:
        return f"no GPU backend: {status.gpu_reason}"
    ok, detail = verify_gpu()
    return "" if ok else f"GPU backend not used: {detail}"


@functools.cache  # once per process (and message): a fallback is said once, not per pipeline
def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_native(device: str) -> bool:
    """Whether mixing on ``device`` ("cpu" | "gpu") runs through fn.dalikd_mix.

    DALIKD_NATIVE=auto falls back to the composed graph with one warning; =1 raises instead.
    """
    m = mode()
    if m == "0":
        return False
    if m == "1":
        require(device, "asked for (DALIKD_NATIVE=1)")
        return True
    status = load()
    reason = _gpu_reason(status) if device == "gpu" else status.reason
    if not reason:
        return True
    _warn(
        f"dalikd: native mixing operator unavailable ({reason}); using the composed "
        "stock-operator graph (same results, slower). DALIKD_NATIVE=0 silences this."
    )
    return False


def resolve(mixing: str, device: str) -> str:
    """The mixing path of ``mixing`` ("auto" | "native" | "composed", the config's
    ``data.mixing``) on ``device``: "native" (fn.dalikd_mix) or "composed" (stock operators).
    "auto" takes DALIKD_NATIVE as its default (see :func:`use_native`); "native" makes an
    unavailable operator an error. A run resolves it once and saves the answer."""
    if mixing == "composed":
        return "composed"
    if mixing == "native":
        require(device, "asked for (mixing = native)")
        return "native"
    return "native" if use_native(device) else "composed"


def require(device: str, why: str = "asked for") -> None:
    """Load the operator for ``device`` or raise DalikdError saying why it is unavailable."""
    status = load()
    reason = _gpu_reason(status) if device == "gpu" else status.reason
    if reason:
        raise DalikdError(f"the native mixing operator is {why} but unavailable: {reason}")


def reset() -> None:
    """Forget this process's answers (tests): the next use builds/loads and may warn again.
    A library already loaded into DALI stays loaded."""
    load.cache_clear()
    verify_gpu.cache_clear()
    _warn.cache_clear()


# -- the resize operator (fn.dalikd_resize, CPU only) -------------------------------------------


def resize_reason(device: str) -> str:
    """Why fn.dalikd_resize is not used on ``device`` ("" when it is): DALI's fn.resize runs
    instead. GPU always keeps DALI's resize; DALIKD_NATIVE=0 or DALIKD_NATIVE_RESIZE=0 turn the
    native one off; otherwise it is used wherever the CPU library loads."""
    if device != "cpu":
        return "CPU only (the GPU keeps DALI's resize)"
    if mode() == "0":
        return "DALIKD_NATIVE=0"
    if os.environ.get("DALIKD_NATIVE_RESIZE", "1").strip() == "0":
        return "DALIKD_NATIVE_RESIZE=0"
    status = load()
    return "" if status.cpu else status.reason


def use_native_resize(device: str) -> bool:
    """Whether the antialiased resize on ``device`` runs through fn.dalikd_resize. Falls back to
    DALI's fn.resize with one warning (DALIKD_NATIVE=auto) or raises (DALIKD_NATIVE=1) when the
    library does not load; GPU and the off switches fall back silently."""
    reason = resize_reason(device)
    if not reason:
        return True
    if device == "cpu" and reason not in ("DALIKD_NATIVE=0", "DALIKD_NATIVE_RESIZE=0"):
        if mode() == "1":
            raise DalikdError(
                f"the native resize operator is asked for (DALIKD_NATIVE=1) but unavailable: "
                f"{reason}"
            )
        _warn(
            f"dalikd: native resize operator unavailable ({reason}); using DALI's fn.resize "
            "(same filter family, slower on CPU). DALIKD_NATIVE_RESIZE=0 silences this."
        )
    return False


def resolve_resize(resize: str, antialias: bool, device: str) -> str:
    """The resize path of ``resize`` ("auto" | "native" | "dali", the config's ``data.resize``)
    on ``device``: "native" (fn.dalikd_resize) or "dali" (DALI's fn.resize). GPU and
    --no-antialias always take "dali" ("native" there is an error); "auto" takes
    :func:`use_native_resize` (DALIKD_NATIVE / DALIKD_NATIVE_RESIZE) as its default. A run
    resolves it once and saves the answer: the two paths differ by up to 2 grey levels."""
    if resize == "dali":
        return "dali"
    if device != "cpu" or not antialias:
        if resize == "native":
            raise DalikdError(
                "resize = native is CPU-only and antialiased; use --resize dali or auto here"
            )
        return "dali"
    if resize == "native":
        require_resize("asked for (resize = native)")
        return "native"
    return "native" if use_native_resize(device) else "dali"


def require_resize(why: str) -> None:
    """Load fn.dalikd_resize whatever DALIKD_NATIVE / DALIKD_NATIVE_RESIZE say (a checkpoint
    saved with it needs it), or raise DalikdError saying why it is unavailable."""
    status = load()
    if not status.cpu:
        raise DalikdError(f"the native resize operator is {why} but unavailable: {status.reason}")

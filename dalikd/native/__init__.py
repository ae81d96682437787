"""dalikd's native DALI operator for mixing (``fn.dalikd_mix``): build, cache, load, fall back.

The C++ sources next to this file (``mix.h``, ``mix_cpu.cc``, ``mix_gpu.cu``) are compiled on
first use against the installed DALI (``nvidia.dali.sysconfig`` flags): g++ for the CPU
operator, and nvcc, where there is one, for a second library that also has the GPU operator.
The result is cached in ``cache_dir()/native/<DALI version>-<source hash>/`` (built in a
temporary folder, then renamed; a file lock keeps torchrun ranks from building it twice) and
loaded with ``nvidia.dali.plugin_manager.load_library``.

The mixing path is configuration, ``data.mixing`` (``--mixing``): ``native``, ``composed``, or
``auto``, resolved once per run by :func:`resolve` and saved in config.json and the checkpoint.
``auto`` takes ``DALIKD_NATIVE`` as its default: ``auto`` (default) uses the operator where it loads
and otherwise the composed stock-operator graph of :mod:`dalikd.ops`, with one warning per
process naming the reason; ``1`` makes an unavailable operator an error; ``0`` never builds it.
On the GPU "loads" is not enough: before its first use in a process the GPU backend runs a tiny
pipeline on the GPU itself, in a child process, and must match the composed graph there
(:func:`verify_gpu`); otherwise the composed graph is used (or, with ``1``, an error raised).
``DALIKD_CXX`` / ``DALIKD_NVCC`` name the compilers (default ``$CXX`` or g++, and nvcc from
``$CUDA_HOME``, ``PATH`` or /usr/local/cuda), ``DALIKD_CUDA_INCLUDE`` the CUDA headers (DALI's
headers include cuda_runtime.h, so even the CPU operator needs them), ``DALIKD_NATIVE_GPU=0``
skips the CUDA build.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from dalikd.errors import DalikdError

SOURCES = ("mix.h", "mix_cpu.cc", "mix_gpu.h", "mix_gpu.cc", "mix_gpu.cu")
# The CPU resize operator (fn.dalikd_resize) is compiled into both libraries beside the mixing
# operator; :func:`use_native_resize` says whether it is used.
RESIZE_SOURCES = ("resize.h", "resize_cpu.cc")
MODES = ("auto", "0", "1")
# Headers the build needs besides DALI's: cuda_runtime.h pulls in crt/host_config.h, and DALI's
# float16 header includes CCCL's nv/target. pip's CUDA runtime wheels ship only the first.
CUDA_HEADERS = ("cuda_runtime.h", "crt/host_config.h", "nv/target")
# SASS for Turing .. Hopper, PTX for anything newer; one small kernel, so each costs little.
GENCODES = ("sm_75", "sm_80", "sm_86", "sm_90")
GPU_UNVERIFIED = (
    "built and loaded, not yet run on a GPU here (it is run on the GPU and compared with the "
    "composed graph before its first use on --device gpu)"
)
SMOKE_TIMEOUT_S = 120
COMPILE_TIMEOUT_S = 600


@dataclass(frozen=True)
class BuildInfo:
    """What one build produced; saved as build.json in the build folder."""

    key: str  # "<DALI version>-<source hash>"
    toolchain: str  # the compilers and header folder used; a failed build is retried on change
    cpu_library: str | None  # CPU operator only; None when it failed
    cpu_error: str  # why not, or ""
    gpu_library: str | None  # CPU + GPU operators; None when not built
    gpu_error: str  # why not, or ""
    nvcc_version: str  # "" without nvcc
    dali_cuda_version: str  # CUDA version the DALI wheel was built with


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


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + RESIZE_SOURCES:
        digest.update(name.encode() + b"\0" + (source_dir() / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_key() -> str:
    import nvidia.dali

    return f"{nvidia.dali.__version__}-{source_hash()}"


def build_root() -> Path:
    from dalikd.data import cache_dir

    return cache_dir() / "native"


# -- toolchain -----------------------------------------------------------------------------------


def find_cxx() -> str | None:
    name = os.environ.get("DALIKD_CXX") or os.environ.get("CXX") or "g++"
    return shutil.which(name)


def find_nvcc() -> str | None:
    if os.environ.get("DALIKD_NATIVE_GPU", "1") == "0":
        return None
    if os.environ.get("DALIKD_NVCC"):
        return shutil.which(os.environ["DALIKD_NVCC"])
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")


def _header_candidates(nvcc: str | None) -> list[Path]:
    dirs = [os.environ.get("DALIKD_CUDA_INCLUDE"), os.environ.get("CUDA_HOME"),
            os.environ.get("CUDA_PATH")]  # fmt: skip
    found = [Path(d) for d in dirs if d]
    found = [d if d.name == "include" else d / "include" for d in found]
    if nvcc:
        found.append(Path(nvcc).resolve().parent.parent / "include")
    found += [Path("/usr/local/cuda/include"), Path("/opt/cuda/include"), Path("/usr/include")]
    # pip's CUDA wheels: nvidia/<component>/include (CUDA 12) or nvidia/cu13/include (CUDA 13)
    for site in sys.path:
        nvidia = Path(site) / "nvidia"
        if site and nvidia.is_dir():
            found += sorted(p for p in nvidia.glob("*/include") if p.is_dir())
    return list(dict.fromkeys(found))


def find_cuda_include(nvcc: str | None = None) -> tuple[list[str], str]:
    """The folders that hold CUDA_HEADERS (one folder where possible), or ([], what is missing)."""
    candidates = _header_candidates(nvcc)
    for d in candidates:
        if all((d / h).exists() for h in CUDA_HEADERS):
            return [str(d)], ""
    chosen: list[str] = []
    for h in CUDA_HEADERS:
        holder = next((d for d in candidates if (d / h).exists()), None)
        if holder is None:
            return [], (
                f"no CUDA headers: {h} not found (DALI's headers need cuda_runtime.h even for "
                "a CPU operator); install a CUDA toolkit or set DALIKD_CUDA_INCLUDE"
            )
        chosen.append(str(holder))
    return list(dict.fromkeys(chosen)), ""


def _version_line(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    release = [ln for ln in lines if "release" in ln]
    return (release or lines or [""])[0].strip()


def _toolchain(cxx: str | None, nvcc: str | None, include: list[str]) -> str:
    return f"cxx={cxx} nvcc={nvcc} include={':'.join(include)}"


# -- build ---------------------------------------------------------------------------------------


def _reason(cmd: list[str], returncode: int, output: str) -> str:
    errors = [ln for ln in output.splitlines() if "error" in ln.lower()]
    tail = errors[:3] or output.strip().splitlines()[-3:]
    return f"{Path(cmd[0]).name} exited {returncode}: " + " | ".join(tail)


def _run_all(cmds: list[list[str]], cwd: Path) -> list[str]:
    """Run compilers side by side; per command '' on success, else the reason (its first error
    lines)."""
    procs: list[subprocess.Popen | str] = []
    for cmd in cmds:
        try:
            procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
        except OSError as e:
            procs.append(f"{Path(cmd[0]).name}: {e}")
    reasons = []
    for cmd, proc in zip(cmds, procs, strict=True):
        if isinstance(proc, str):
            reasons.append(proc)
            continue
        try:
            out, _ = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        reasons.append("" if proc.returncode == 0 else _reason(cmd, proc.returncode, out))
    return reasons


def _run(cmd: list[str], cwd: Path) -> str:
    return _run_all([cmd], cwd)[0]


_SMOKE = r"""
import sys
import numpy as np
from nvidia.dali import fn, pipeline_def, plugin_manager
plugin_manager.load_library(sys.argv[1])
x = [np.full((4, 4, 3), 10 * (i + 1), np.uint8) for i in range(2)]
def arg(values, dtype):
    return fn.external_source(source=lambda: [np.array(v, dtype) for v in values], batch=True)
@pipeline_def(batch_size=2, num_threads=1, device_id=None)
def pipe():
    images = fn.external_source(source=lambda: x, batch=True, layout="HWC")
    return tuple(fn.dalikd_mix(images, mode="cutmix", perm=arg([1, 0], np.int32),
                               lam=arg([0.75, 0.75], np.float32),  # a 2x2 box at (2, 2)
                               centre=arg([[2, 2], [2, 2]], np.int32)))
p = pipe()
p.build()
out, lam = (o.as_array() for o in p.run())
assert out[0][1:3, 1:3].min() == 20 and out[0][0, 0, 0] == 10 and lam[0] == 0.75, (out, lam)
"""


def _smoke(library: Path) -> str:
    """Load the library and run the operator once, in a child process (a bad library must not
    take this process down); LD_BIND_NOW finds any missing symbol at load. '' when it works."""
    env = {**os.environ, "LD_BIND_NOW": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _SMOKE, str(library)], capture_output=True,
                              text=True, timeout=SMOKE_TIMEOUT_S, env=env)  # fmt: skip
    except subprocess.SubprocessError as e:
        return f"test run of {library.name}: {e}"
    if proc.returncode == 0:
        return ""
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{library.name} does not load and run: {last}"


def _compile(work: Path, key: str) -> BuildInfo:
    """Compile into ``work``: libdalikd_mix_cpu.so (g++), and libdalikd_mix.so (with nvcc's GPU
    object) where nvcc works. Never raises: failures become the reason fields."""
    import nvidia.dali
    import nvidia.dali.sysconfig as sysconfig

    cxx, nvcc = find_cxx(), find_nvcc()
    include, missing = find_cuda_include(nvcc)
    dali_cuda = str(getattr(nvidia.dali, "__cuda_version__", ""))
    nvcc_version = _version_line(nvcc) if nvcc else ""
    info = dict(key=key, toolchain=_toolchain(cxx, nvcc, include), cpu_library=None,
                cpu_error="", gpu_library=None, gpu_error="", nvcc_version=nvcc_version,
                dali_cuda_version=dali_cuda)  # fmt: skip
    if cxx is None:
        name = os.environ.get("DALIKD_CXX") or os.environ.get("CXX") or "g++"
        return BuildInfo(**{**info, "cpu_error": f"no C++ compiler ({name} not found)",
                            "gpu_error": "no C++ compiler"})  # fmt: skip
    if missing:
        return BuildInfo(**{**info, "cpu_error": missing, "gpu_error": missing})
    cflags = list(sysconfig.get_compile_flags())
    lflags = list(sysconfig.get_link_flags()) + [f"-Wl,-rpath,{sysconfig.get_lib_dir()}"]
    src = work / "src"

    # -ffp-contract=off: no fused multiply-add, so MixUp rounds exactly as DALI's arithmetic.
    compile_cc = [cxx, "-std=c++20", "-O3", "-fPIC", "-ffp-contract=off", "-w", *cflags,
                  *[f"-I{d}" for d in include], "-c"]  # fmt: skip
    cmds = [[*compile_cc, str(src / "mix_cpu.cc"), "-o", "mix_cpu.o"],
            [*compile_cc, str(src / "resize_cpu.cc"), "-o", "resize_cpu.o"]]  # fmt: skip
    if nvcc:
        # nvcc compiles only the kernel (no DALI headers: seconds); g++ the operator around it.
        last = GENCODES[-1][3:]
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in GENCODES]
        cmds.append([nvcc, "-ccbin", cxx, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *gencode,
                     f"-gencode=arch=compute_{last},code=compute_{last}",
                     "-c", str(src / "mix_gpu.cu"), "-o", "mix_kernel.o"])  # fmt: skip
        cmds.append([*compile_cc, str(src / "mix_gpu.cc"), "-o", "mix_gpu.o"])
    elif os.environ.get("DALIKD_NATIVE_GPU", "1") == "0":
        info["gpu_error"] = "skipped (DALIKD_NATIVE_GPU=0)"
    else:
        info["gpu_error"] = "no nvcc found (DALIKD_NVCC, CUDA_HOME, PATH, /usr/local/cuda)"
    cpu_error, resize_error, *gpu_errors = _run_all(cmds, work)
    cpu_error = cpu_error or resize_error

    if not cpu_error:
        objects = ["mix_cpu.o", "resize_cpu.o"]
        link = [cxx, "-shared", *objects, "-o", "libdalikd_mix_cpu.so", *lflags]
        cpu_error = _run(link, work) or _smoke(work / "libdalikd_mix_cpu.so")
    if cpu_error:
        info["cpu_error"] = cpu_error
    else:
        info["cpu_library"] = "libdalikd_mix_cpu.so"

    if nvcc:
        gpu_error = next((e for e in gpu_errors if e), "")
        if not gpu_error and cpu_error:
            gpu_error = "the CPU part failed"
        if not gpu_error:
            # nvcc links: it knows its own static CUDA runtime, which keeps the plugin free of a
            # libcudart of another CUDA version than DALI's; --exclude-libs hides its symbols.
            link = [nvcc, "-ccbin", cxx, "-shared", "-cudart", "static", "mix_cpu.o",
                    "resize_cpu.o", "mix_gpu.o", "mix_kernel.o", "-o", "libdalikd_mix.so",
                    "-Xlinker", "--exclude-libs,ALL",
                    *[f for f in lflags if not f.startswith("-Wl,")],
                    "-Xlinker", f"-rpath,{sysconfig.get_lib_dir()}", "-ldali_core"]  # fmt: skip
            gpu_error = _run(link, work) or _smoke(work / "libdalikd_mix.so")
        if gpu_error:
            info["gpu_error"] = gpu_error
        else:
            info["gpu_library"] = "libdalikd_mix.so"
    return BuildInfo(**info)


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else (a build found otherwise is rebuilt)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _read(folder: Path) -> BuildInfo | None:
    try:
        return BuildInfo(**json.loads((folder / "build.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _current_toolchain() -> str:
    nvcc = find_nvcc()
    return _toolchain(find_cxx(), nvcc, find_cuda_include(nvcc)[0])


def _reusable(cached: BuildInfo | None) -> bool:
    """A complete build is kept; an incomplete one only while the toolchain is the same."""
    if cached is None:
        return False
    return bool(cached.cpu_library and cached.gpu_library) or (
        cached.toolchain == _current_toolchain()
    )


def is_cached() -> bool:
    """Whether :func:`build` would reuse a finished build now (and compile nothing)."""
    return _reusable(_read(build_root() / build_key()))


def build(force: bool = False) -> tuple[BuildInfo, Path]:
    """Build (or find cached) libraries for the installed DALI and these sources.

    A failed or CPU-only build is retried only when the toolchain found now differs (a
    compiler, nvcc or the CUDA headers were installed since). Returns the build record and
    its folder.
    """
    from dalikd.datacheck import private_dir

    root = build_root()
    key = build_key()
    final = root / key
    private_dir(root)
    if root.stat().st_uid != os.getuid():  # whoever can write here picks the code we load
        raise DalikdError(
            f"{root} is not owned by you; not loading a native library from there "
            "(set DALIKD_CACHE to a folder of your own)"
        )
    os.chmod(root, 0o700)  # ours: made private (an older dalikd created it umask-wide)
    cached = None if force or not _private(final) else _read(final)
    if _reusable(cached):
        return cached, final
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building this very key
        cached = None if force or not _private(final) else _read(final)
        if _reusable(cached):
            return cached, final
        work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            (work / "src").mkdir()
            for name in SOURCES + RESIZE_SOURCES:
                shutil.copy2(source_dir() / name, work / "src" / name)
            info = _compile(work, key)
            for obj in work.glob("*.o"):
                obj.unlink()
            os.chmod(work, 0o755)  # mkdtemp makes it private; a shared cache should be readable
            (work / "build.json").write_text(json.dumps(asdict(info), indent=1) + "\n")
            if final.exists():  # a stale or failed build under the lock: replace it
                shutil.rmtree(final)
            os.rename(work, final)  # atomic: readers see a whole build or none
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return info, final


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
S, B = 16, 4
rng = np.random.default_rng(0)
x = [rng.integers(0, 256, (S, S, 3), np.uint8) for _ in range(B)]
def arg(values, dtype):
    return fn.external_source(source=lambda: [np.array(v, dtype) for v in values], batch=True)
@pipeline_def(batch_size=B, num_threads=1, device_id=int(sys.argv[2]), seed=0)
def pipe():
    images = fn.external_source(source=lambda: x, batch=True, layout="HWC").gpu()
    perm, lam = arg([1, 2, 3, 0], np.int32), arg([0.3, 0.5, 0.75, 0.9], np.float32)
    centre = arg([[0, 0], [8, 8], [15, 3], [5, 12]], np.int32)
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
    ``(True, GPU name)`` when bit-identical, else ``(False, why)``. Never raises."""
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
    return _gpu_smoke(status.loaded, device)


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


@functools.cache  # once per process (and reason): the fallback is said once, not per pipeline
def _warn(reason: str) -> None:
    warnings.warn(
        f"dalikd: native mixing operator unavailable ({reason}); using the composed "
        "stock-operator graph (same results, slower). DALIKD_NATIVE=0 silences this.",
        RuntimeWarning,
        stacklevel=3,
    )


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
    _warn(reason)
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
    _warn_resize.cache_clear()


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
        _warn_resize(reason)
    return False


@functools.cache
def _warn_resize(reason: str) -> None:
    warnings.warn(
        f"dalikd: native resize operator unavailable ({reason}); using DALI's fn.resize (same "
        "filter family, slower on CPU). DALIKD_NATIVE_RESIZE=0 silences this.",
        RuntimeWarning,
        stacklevel=3,
    )


def require_resize(why: str) -> None:
    """Load fn.dalikd_resize whatever DALIKD_NATIVE / DALIKD_NATIVE_RESIZE say (a checkpoint
    saved with it needs it), or raise DalikdError saying why it is unavailable."""
    status = load()
    if not status.cpu:
        raise DalikdError(f"the native resize operator is {why} but unavailable: {status.reason}")

"""Building dalikd's native operators: compile the C++ (and, with nvcc, CUDA) sources next to
this file against the installed DALI, cache the libraries per DALI version and source hash in
``cache_dir()/native/`` (built in a temporary folder, then renamed; a file lock keeps torchrun
ranks from building twice), and smoke-test each build. :mod:`dalikd.native` loads the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dalikd.cache import cache_dir, private_dir, untrusted
from dalikd.errors import DalikdError

SOURCES = ("mix.h", "mix_cpu.cc", "mix_gpu.h", "mix_gpu.cc", "mix_gpu.cu")
# The CPU resize operator (fn.dalikd_resize) is compiled into both libraries beside the mixing
# operator; :func:`use_native_resize` says whether it is used.
RESIZE_SOURCES = ("resize.h", "resize_cpu.cc")
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
    attempts: int = 1  # builds in a row that failed for a cause that may pass (TRANSIENT)


def source_dir() -> Path:
    return Path(__file__).resolve().parent  # the sources sit beside this file


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + RESIZE_SOURCES:
        digest.update(name.encode() + b"\0" + (source_dir() / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_key() -> str:
    import nvidia.dali

    return f"{nvidia.dali.__version__}-{source_hash()}"


def build_root() -> Path:
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


def _seal(work: Path) -> None:
    """Set every mode of a finished build explicitly, whatever the umask (under umask 000 the
    linker makes 0777 libraries, which the next run would rightly refuse): folders and
    libraries 0755, other files 0644; readable, writable by the user only."""
    for path in (work, *work.rglob("*")):
        executable = path.is_dir() or path.suffix == ".so"
        os.chmod(path, 0o755 if executable else 0o644, follow_symlinks=False)


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


def _untrusted(folder: Path) -> str:
    """Why a build folder is not trusted, or '': the folder, its build.json and libraries must
    be the user's own and writable by no one else (cache.untrusted); else it is rebuilt."""
    if not folder.exists():
        return ""
    names = ["build.json", *(p.name for p in folder.glob("*.so"))]
    for path in (folder, *(folder / name for name in names)):
        why = untrusted(path, build_root()) if path.exists() or path.is_symlink() else ""
        if why:
            return why
    return ""


def _trusted_read(folder: Path, force: bool) -> BuildInfo | None:
    """The cached build in ``folder`` where it may be used (one warning where it may not)."""
    if force:
        return None
    why = _untrusted(folder)
    if why:
        warnings.warn(f"dalikd: native build not trusted, rebuilt: {why}", RuntimeWarning,
                      stacklevel=3)  # fmt: skip
        return None
    return _read(folder)


def _read(folder: Path) -> BuildInfo | None:
    try:
        return BuildInfo(**json.loads((folder / "build.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


# Failure causes that may pass by themselves: a file missing for a moment (a relative or moved
# cache folder, a cleaned /tmp), a full disk or quota, an I/O error, a killed compiler (the
# OOM killer), a timeout. Such a failed build is retried, up to MAX_ATTEMPTS builds in a row.
TRANSIENT = ("No such file or directory", "No space left on device", "Disk quota exceeded",
             "Input/output error", "Cannot allocate memory", "Resource temporarily unavailable",
             "Killed", "exited -9", "timed out", "Timeout")  # fmt: skip
MAX_ATTEMPTS = 3


def transient(info: BuildInfo) -> str:
    """The cause of a failed build that may pass by itself (TRANSIENT), or ''."""
    errors = (info.cpu_error, "" if info.gpu_library else info.gpu_error)
    return next((e for e in errors if any(t in e for t in TRANSIENT)), "")


def retry_reason(info: BuildInfo | None) -> str:
    """Why the cached build will be built again at its next use, or '' (for doctor)."""
    if info is None or not transient(info):
        return ""
    if info.attempts >= MAX_ATTEMPTS:
        return (
            f"failed {info.attempts} times for a cause that may pass ({transient(info)}); "
            "kept until the toolchain changes (or its cache folder is removed)"
        )
    return (f"failed for a cause that may pass ({transient(info)}); retried at the next use "
            f"(attempt {info.attempts + 1} of {MAX_ATTEMPTS})")  # fmt: skip


def _current_toolchain() -> str:
    nvcc = find_nvcc()
    return _toolchain(find_cxx(), nvcc, find_cuda_include(nvcc)[0])


def _reusable(cached: BuildInfo | None) -> bool:
    """A complete build is kept; an incomplete one only while the toolchain is the same."""
    if cached is None:
        return False
    if cached.cpu_library and cached.gpu_library:
        return True
    if transient(cached) and cached.attempts < MAX_ATTEMPTS:
        return False  # e.g. a full disk then: try again
    return cached.toolchain == _current_toolchain()


def is_cached() -> bool:
    """Whether :func:`build` would reuse a finished build now (and compile nothing)."""
    folder = build_root() / build_key()
    return not _untrusted(folder) and _reusable(_read(folder))


def build(force: bool = False) -> tuple[BuildInfo, Path]:
    """Build (or find cached) libraries for the installed DALI and these sources.

    A failed or CPU-only build is retried only when the toolchain found now differs (a
    compiler, nvcc or the CUDA headers were installed since). Returns the build record and
    its folder.
    """
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
    cached = _trusted_read(final, force)
    if _reusable(cached):
        return cached, final
    lock_fd = os.open(root / f".{key}.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(lock_fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building this very key
        cached = None if force else _read(final) if not _untrusted(final) else None
        if _reusable(cached):
            return cached, final
        work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            (work / "src").mkdir(mode=0o700)
            for name in SOURCES + RESIZE_SOURCES:
                shutil.copy2(source_dir() / name, work / "src" / name)
            info = _compile(work, key)
            if transient(info) and cached is not None and transient(cached):
                info = replace(info, attempts=cached.attempts + 1)
            for obj in work.glob("*.o"):
                obj.unlink()
            (work / "build.json").write_text(json.dumps(asdict(info), indent=1) + "\n")
            _seal(work)
            if final.exists():  # a stale or failed build under the lock: replace it
                shutil.rmtree(final)
            os.rename(work, final)  # atomic: readers see a whole build or none
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return info, final

"""The native operator's GPU backend is used only after it ran correctly on the GPU itself
(dalikd.native.verify_gpu, a child process). No GPU here: the smoke result is injected, and the
decision, the one fallback warning and the doctor's text are checked against it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dalikd import native
from dalikd.cli.main import main
from dalikd.doctor import report
from dalikd.errors import DalikdError


@pytest.fixture
def gpu_backend(monkeypatch):
    """A built GPU backend, a CUDA device that torch sees, and a fresh process state."""
    if not native.load().gpu:
        pytest.skip(f"no GPU backend built: {native.load().gpu_reason}")
    native.reset()
    monkeypatch.setenv("DALIKD_NATIVE", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    yield
    native.reset()


def smoke_gives(monkeypatch, ok: bool, detail: str) -> list:
    calls = []

    def fake(library, device):
        calls.append((library, device))
        return ok, detail

    monkeypatch.setattr(native, "_gpu_smoke", fake)
    return calls


def gpu_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "native mixing operator" in str(w.message)]


def test_a_failed_gpu_smoke_test_falls_back_with_one_warning_that_says_why(
    monkeypatch, gpu_backend
):
    calls = smoke_gives(monkeypatch, False, "its test run on the GPU failed: cudaErrorNoKernel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.use_native("gpu") is False
        assert native.use_native("gpu") is False  # a second pipeline: no second warning
        assert native.use_native("cpu") is True  # the CPU operator is unaffected
    assert gpu_warnings(caught) == [
        "dalikd: native mixing operator unavailable (GPU backend not used: its test run on the "
        "GPU failed: cudaErrorNoKernel); using the composed stock-operator graph (same results, "
        "slower). DALIKD_NATIVE=0 silences this."
    ]
    assert calls == [(native.load().loaded, 0)]  # run once, on the current device

    info = report()
    assert info["gpu_backend"] == "not used: its test run on the GPU failed: cudaErrorNoKernel"
    assert info["mixing"] == {
        "cpu": "native",
        "gpu": "composed: its test run on the GPU failed: cudaErrorNoKernel",
    }

    monkeypatch.setenv("DALIKD_NATIVE", "1")
    with pytest.raises(DalikdError, match="unavailable: GPU backend not used: its test run"):
        native.use_native("gpu")


def test_a_passed_gpu_smoke_test_uses_the_operator_and_the_doctor_names_the_gpu(
    monkeypatch, gpu_backend, capsys
):
    smoke_gives(monkeypatch, True, "NVIDIA H200")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.use_native("gpu") is True
    assert gpu_warnings(caught) == []
    native.require("gpu")  # no error
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "GPU backend" in out and "verified on NVIDIA H200" in out
    with pytest.raises(SystemExit):
        main(["doctor", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["gpu_backend"] == "verified on NVIDIA H200"
    assert info["mixing"]["gpu"] == "native"


def test_a_pass_is_recorded_per_gpu_and_driver_and_a_failure_never(
    monkeypatch, gpu_backend, tmp_path
):
    record = tmp_path / "gpu_verified.json"
    monkeypatch.setattr(native, "_verified_record", lambda library: record)
    identity = ["H200 sm_90 | driver 580.1 | CUDA 12.8"]
    monkeypatch.setattr(native, "_gpu_identity", lambda device: identity[0])
    calls = smoke_gives(monkeypatch, True, "NVIDIA H200")
    assert native.verify_gpu() == (True, "NVIDIA H200")
    native.verify_gpu.cache_clear()  # another process, the same machine: no second child run
    assert native.verify_gpu() == (True, "NVIDIA H200") and len(calls) == 1
    assert json.loads(record.read_text()) == {identity[0]: "NVIDIA H200"}

    identity[0] = "H200 sm_90 | driver 590.2 | CUDA 12.8"  # a new driver is checked again
    native.verify_gpu.cache_clear()
    smoke_gives(monkeypatch, False, "its test run on the GPU failed: mixup differs")
    assert native.verify_gpu() == (False, "its test run on the GPU failed: mixup differs")
    assert len(json.loads(record.read_text())) == 1  # the failure is not recorded

    identity[0] = ""  # no driver version to key on: always run, never record
    native.verify_gpu.cache_clear()
    calls = smoke_gives(monkeypatch, True, "NVIDIA H200")
    assert native.verify_gpu() == (True, "NVIDIA H200") and len(calls) == 1
    assert len(json.loads(record.read_text())) == 1


def test_without_cuda_the_gpu_backend_is_not_used_and_the_smoke_test_not_run(monkeypatch):
    if not native.load().gpu:
        pytest.skip(f"no GPU backend built: {native.load().gpu_reason}")
    native.reset()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = smoke_gives(monkeypatch, True, "never asked")
    try:
        assert native.verify_gpu() == (False, "no CUDA GPU visible to torch")
        assert report()["gpu_backend"] == "not used: no CUDA GPU visible to torch"
    finally:
        native.reset()
    assert calls == []


def test_the_smoke_child_reports_its_last_error_line_instead_of_raising():
    # The real child process, on a machine without a GPU: the pipeline cannot be built, and the
    # reason comes back as one line.
    status = native.load()
    if not status.gpu:
        pytest.skip(f"no GPU backend built: {status.gpu_reason}")
    ok, detail = native._gpu_smoke(status.loaded, 0)
    assert ok is False
    assert detail.startswith("its test run on the GPU failed: ") and "\n" not in detail
    assert "CUDA" in detail or "cuda" in detail or "GPU" in detail.split(": ", 1)[1]


def test_doctor_build_confirms_the_cached_build(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--build"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    info, folder = native.build()
    assert f"native operator: cached in {folder}" in out
    assert f"CPU operator: {info.cpu_library}" in out


def test_doctor_build_exits_1_when_the_cpu_operator_cannot_be_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("DALIKD_CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--build"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert "native operator: built in" in captured.out
    assert "CPU operator: not built: no C++ compiler" in captured.out
    assert "could not be built: no C++ compiler" in captured.err


def test_the_smoke_record_key_falls_back_to_nvidia_smi_then_libcuda_without_proc(monkeypatch):
    # Some containers have no /proc/driver/nvidia/version: the key then takes the driver from
    # nvidia-smi, else the CUDA version of the loaded driver, instead of nothing (which made
    # every process and rank run the ~10 s smoke again).
    from pathlib import Path

    real_read = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self).startswith("/proc/driver/nvidia"):
            raise FileNotFoundError(self)
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    monkeypatch.setattr(native, "_smi_driver", lambda: "NVIDIA driver 580.159.04")
    monkeypatch.setattr(native, "_libcuda_driver", lambda: "CUDA driver 13.0")
    assert native._driver_version() == "NVIDIA driver 580.159.04"
    monkeypatch.setattr(native, "_smi_driver", lambda: "")
    assert native._driver_version() == "CUDA driver 13.0"

    class Props:
        name, major, minor = "NVIDIA H100 80GB HBM3", 9, 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    identity = native._gpu_identity(0)
    assert identity == f"NVIDIA H100 80GB HBM3 sm_90 | CUDA driver 13.0 | CUDA {torch.version.cuda}"
    monkeypatch.setattr(native, "_libcuda_driver", lambda: "")
    assert native._gpu_identity(0) == ""  # nothing to key on: never recorded or trusted


def test_the_driver_version_of_this_machine_is_read_or_empty():
    # no GPU here: whatever answers must be a one-line string, and the call must not raise
    driver = native._driver_version()
    assert isinstance(driver, str) and "\n" not in driver


def test_doctor_build_verifies_the_gpu_backend_once_and_records_it(
    monkeypatch, gpu_backend, tmp_path, capsys
):
    # `dalikd doctor --build` before the ranks (or gpu_check) start: the GPU smoke runs there
    # once; a later process on the same GPU and driver finds the pass recorded.
    record = tmp_path / "gpu_verified.json"
    monkeypatch.setattr(native, "_verified_record", lambda library: record)
    monkeypatch.setattr(native, "_gpu_identity", lambda device: "H100 sm_90 | 580 | CUDA 13.0")
    calls = smoke_gives(monkeypatch, True, "NVIDIA H100 80GB HBM3")
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--build", "--json"])
    assert exit_info.value.code == 0
    built = json.loads(capsys.readouterr().out)
    assert built["gpu_backend"] == "verified on NVIDIA H100 80GB HBM3" and len(calls) == 1
    assert json.loads(record.read_text()) == {
        "H100 sm_90 | 580 | CUDA 13.0": "NVIDIA H100 80GB HBM3"
    }
    native.verify_gpu.cache_clear()  # another process: gpu_check's doctor case, a rank
    assert native.verify_gpu() == (True, "NVIDIA H100 80GB HBM3") and len(calls) == 1
    with pytest.raises(SystemExit):
        main(["doctor", "--build"])
    assert "GPU backend: verified on NVIDIA H100 80GB HBM3" in capsys.readouterr().out


def test_doctor_build_says_why_the_gpu_backend_is_not_used_without_cuda(monkeypatch, capsys):
    if not native.load().gpu:
        pytest.skip(f"no GPU backend built: {native.load().gpu_reason}")
    native.reset()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        with pytest.raises(SystemExit):
            main(["doctor", "--build", "--json"])
    finally:
        native.reset()
    assert json.loads(capsys.readouterr().out)["gpu_backend"] == (
        "not used: no CUDA GPU visible to torch"
    )

"""benchmarks/gpu_check.py's logic, on CPU (--device cpu, a dry run with tiny sizes), so that a
Python bug does not spend the minutes of a GPU lease: the cheap cases and recovery end to end,
the time model, the pre-flight, the versions, the recovery case's files; the rest (loader,
profile, train, torchrun, doctor) run in `--device cpu` by hand (GPU_CHECK.md's rehearsal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _import(name: str):
    """A module of benchmarks/ (gpu_check, gpu_check_cases)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_the_synthetic_jpegs_have_every_kind(tmp_path):
    kinds = _import("gpu_check_cases").make_jpegs(tmp_path, classes=2, per_class=7,
                                                  val_per_class=3)  # fmt: skip
    assert kinds == {"rgb": 8, "cmyk": 4, "gray": 4, "progressive": 4}
    modes = {Image.open(p).mode for p in tmp_path.rglob("*.jpg")}
    assert modes == {"RGB", "CMYK", "L"}
    progressive = [p for p in tmp_path.rglob("*.jpg") if Image.open(p).info.get("progressive")]
    assert len(progressive) == 4
    shapes = {Image.open(p).size for p in tmp_path.rglob("*.jpg")}
    assert len(shapes) > 10  # mixed sizes


def test_the_cpu_dry_run_prints_a_line_per_case_and_writes_the_json(tmp_path):
    # same/* and loader/*/native/*: the mixing path is DataConfig.mixing, not DALIKD_NATIVE (which
    # also switches the native resize: flipping it made native and composed images differ)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DALIKD_NATIVE")}
    cases = ("jpegs,checkpoint,exact/cutmix/composed,same/cutmix/sample,"
             "loader/mixup/native/batch,recovery")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path),
         "--cases", cases],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ("ok", "FAIL")]
    names = ["jpegs", "checkpoint", "exact/cutmix/composed", "same/cutmix/sample",
             "loader/mixup/native/batch", "recovery"]  # fmt: skip
    assert [ln.split(" ")[:2] for ln in lines] == [["ok", n] for n in names], lines
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result) >= {"gpu", "driver", "cuda", "torch", "dali", "cases", "efficiency"}
    assert [c["name"] for c in result["cases"]] == names
    assert all(c["ok"] for c in result["cases"])
    assert result["cases"][2]["detail"] == "equal to NumPy on cpu: 8 samples, lam too"
    assert result["cases"][3]["detail"] == "bit-identical (2 batches)"
    assert result["cases"][0]["detail"].startswith("28/28 decoded on cpu, 0 flat")
    recovery = result["cases"][5]["detail"]  # the scan's files never reach training
    assert recovery.startswith("left out by the scan: cut_short.jpg"), recovery
    assert "the epoch done: zero_size.jpg, bad_sos.jpg" in recovery, recovery
    # before the clock: the native build (found cached, or built there: a fresh test cache),
    # the GPU backend's state; then the versions it ran with
    first = proc.stdout.splitlines()[0]
    assert first.startswith("before the clock (") and " native build " in first, first
    assert first.endswith("GPU backend: not used: no CUDA GPU visible to torch"), first
    versions = next(ln for ln in proc.stdout.splitlines() if ln.startswith("versions: "))
    assert f"DALI {result['dali']} " in versions and "nvImageCodec 0." in versions
    assert result["nvjpeg"].startswith("12.") and result["nvimgcodec"].startswith("0.")
    assert set(result["seconds"]) == {"jpegs", "checkpoint", "exact", "same", "loader",
                                      "recovery"}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_without_cuda_the_gpu_check_says_so_in_one_line_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: needs a CUDA GPU (torch sees none); --device cpu is a dry run of its logic"
    ]
    assert not (tmp_path / "gpu_check.json").exists()


def test_a_case_that_hangs_becomes_one_fail_line_and_the_json_keeps_it(tmp_path):
    gpu_check = _import("gpu_check")
    check = gpu_check.Check(tmp_path, "cpu", budget_s=60)
    hang = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    code, _ = check.run("hang", hang, timeout_s=2)
    assert code is None
    cases = json.loads((tmp_path / "gpu_check.json").read_text())["cases"]
    assert cases == [{"name": "hang", "ok": False, "detail": "timed out after 2 s: started"}]
    spent = gpu_check.Check(tmp_path, "cpu", budget_s=0)
    assert spent.run("late", hang, timeout_s=10) == (None, "")
    assert spent.result["cases"][-1]["detail"].startswith("not run: the time budget")


def test_a_case_timeout_leaves_the_cases_after_it_their_reserve(tmp_path):
    gpu_check = _import("gpu_check")
    check = gpu_check.Check(tmp_path, "cpu", 290)
    check.reserve = {"profile": 80, "train": 30, "torchrun": 30}.get  # a GPU-like model
    assert check.timeout(120, left_s=290) == 120  # nothing after it
    check.pending = ["profile", "train", "torchrun"]  # 80 + 30 + 30 reserved
    assert check.timeout(120, left_s=290) == 120
    assert check.timeout(120, left_s=200) == 60
    assert check.timeout(120, left_s=100) == 5  # a floor: the case still gets a try
    assert check.timeout(120, left_s=3) == 3
    assert check.timeout(2, left_s=100) == 2
    assert set(gpu_check.RESERVE) == set(gpu_check.CASES) == set(gpu_check.REHEARSAL_S)


def test_the_time_model_fits_the_budgets_and_derives_from_the_rehearsal(tmp_path):
    gc = _import("gpu_check")
    # the GPU check: every case's reserve is its rehearsal seconds x GPU_FACTOR, and all of
    # them together fit the 240 s the lease plans for
    assert gc.BUDGET_S["gpu"] == 240
    assert sum(gc.RESERVE.values()) <= gc.BUDGET_S["gpu"]
    for case, seconds in gc.REHEARSAL_S.items():
        assert seconds * gc.GPU_FACTOR <= gc.RESERVE[case] < seconds * gc.GPU_FACTOR + 1
        assert seconds * gc.CPU_FACTOR <= gc.CPU_RESERVE[case] < seconds * gc.CPU_FACTOR + 1
    # the CPU dry run's default budget covers its reserves (no case squeezed to the 5 s floor)
    assert sum(gc.CPU_RESERVE.values()) <= gc.BUDGET_S["cpu"]
    for device in ("cpu", "gpu"):
        check = gc.Check(tmp_path, "cpu", None)
        check.device = device  # (a "gpu" Check would ask torch for the GPU's name)
        reserves = gc.RESERVE if device == "gpu" else gc.CPU_RESERVE
        budget = gc.BUDGET_S[device]
        for i, case in enumerate(gc.CASES):  # the first case, with the whole budget left
            check.pending = list(gc.CASES[i + 1 :])
            left = budget - sum(reserves[c] for c in gc.CASES[:i])  # earlier ones took theirs
            assert check.timeout(gc.NOMINAL * reserves[case], left) >= reserves[case], case


def test_a_failed_case_reports_its_error_line_not_a_banner():
    gpu_check = _import("gpu_check")
    torchrun = ["[rank0]: Traceback (most recent call last):", '[rank0]:   File "x.py"',
                "[rank0]: RuntimeError: one of the variables ... inplace operation",
                "E1130 19:27:21 failed (exitcode: 1)", "Traceback (most recent call last):",
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
                "=" * 60, "dalikd FAILED", "=" * 60]  # fmt: skip
    assert gpu_check._last(torchrun) == "RuntimeError: one of the variables ... inplace operation"
    assert gpu_check._last(["data: 4 classes", "error: --batch-size must be > 0", "done"]) == (
        "error: --batch-size must be > 0"
    )
    assert gpu_check._last(["a", "  indented", ""]) == "a"


def test_the_preflight_names_every_missing_package(monkeypatch):
    gc = _import("gpu_check_env")
    assert gc.preflight() == []  # this machine has them all
    needed = (
        "optree",
        "gast",
        "astunparse",
        "six",
        "packaging",
        "nvidia.dali",
        "torch",
        "torchvision",
        "click",
        "rich",
        "numpy",
        "PIL",
    )  # DALI's, the CLI's, the check's
    assert set(needed) <= set(gc.PREFLIGHT)  # fmt: skip
    monkeypatch.setattr(gc, "PREFLIGHT", ("json", "no_such_pkg_a", "numpy", "no_such_pkg_b"))
    missing = gc.preflight()
    assert [m.split(" ")[0] for m in missing] == ["no_such_pkg_a", "no_such_pkg_b"]
    assert "ModuleNotFoundError" in missing[0]


def test_the_recovery_files_are_cut_from_a_ycbcr_jpeg_and_fail_where_they_should(tmp_path):
    # The "decoder" files keep their end-of-image marker last, so the scan passes them (also
    # the rule that looks only at the last bytes) and DALI's decoder must fail them; the
    # "scan" files end inside the entropy-coded data, no marker in their last bytes.
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    from dalikd.datacheck import check_file

    cases = _import("gpu_check_cases")
    cases.make_jpegs(tmp_path, classes=1, per_class=7, val_per_class=1)
    source = cases.ycbcr_jpeg(tmp_path / "train" / "c0")
    with Image.open(source) as image:  # not the set's first file, which is CMYK
        assert image.mode == "RGB" and not image.info.get("progressive")
    assert Image.open(sorted((tmp_path / "train" / "c0").glob("*.jpg"))[0]).mode == "CMYK"
    bad = cases.bad_jpegs(source.read_bytes())
    assert {n: w for n, (_, w) in bad.items()} == {
        "zero_size.jpg": "decoder", "bad_sos.jpg": "decoder", "cut_short.jpg": "scan",
        "cut_after_thumbnail.jpg": "scan or decoder"}  # fmt: skip
    for name, (body, where) in bad.items():
        path = tmp_path / name
        path.write_bytes(body)
        last = body.rstrip(b"\x00\xff")[-32:]  # the scan's tail rule (issue 23)
        assert (b"\xff\xd9" in last) == (where == "decoder"), name
        if where == "decoder":
            assert check_file(str(path)) is None, name
        if name == "cut_short.jpg":
            assert "end-of-image marker" in check_file(str(path))
        assert b"\xff\xd9" in body[-4096:] or name == "cut_short.jpg"

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def decode(body=body):
            data = fn.external_source(source=lambda: [np.frombuffer(body, np.uint8)], batch=True)
            return fn.decoders.image(data, device="cpu", output_type=types.RGB)

        pipe = decode()
        pipe.build()
        with pytest.raises(RuntimeError):
            pipe.run()
    report = f"path\treason\n{tmp_path / 'a.jpg'}\tfailed in training (epoch 1, step 2): x\n"
    report += f"{tmp_path / 'b.jpg'}\tJPEG without an end-of-image marker (truncated?)\n"
    assert cases.left_out(report, tmp_path / "a.jpg") == "decoder"
    assert cases.left_out(report, tmp_path / "b.jpg") == "scan"
    assert cases.left_out(report, tmp_path / "c.jpg") == ""


def test_the_library_versions_come_from_the_libraries_themselves():
    gc = _import("gpu_check_env")
    info = gc.library_versions()
    assert info["nvimgcodec"].count(".") == 2 and info["nvjpeg"].count(".") == 2
    assert info["nvimgcodec_cuda"].startswith("12.")
    line = gc.versions_line(gc.versions("cpu"))
    assert line.startswith("versions: DALI ") and f"nvJPEG {info['nvjpeg']}" in line

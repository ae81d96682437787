"""benchmarks/gpu_check.py's logic, on CPU (--device cpu, a dry run with tiny sizes), so that a
Python bug does not spend the minutes of a GPU lease. The cheap cases only; the rest
(loader, profile, train, torchrun, doctor) run in `--device cpu` by hand."""

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


def test_the_synthetic_jpegs_have_every_kind(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    kinds = gpu_check.make_jpegs(tmp_path, classes=2, per_class=7, val_per_class=3)
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
    cases = "jpegs,checkpoint,exact/cutmix/composed,same/cutmix/sample,loader/mixup/native/batch"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path),
         "--cases", cases],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ("ok", "FAIL")]
    names = ["jpegs", "checkpoint", "exact/cutmix/composed", "same/cutmix/sample",
             "loader/mixup/native/batch"]  # fmt: skip
    assert [ln.split(" ")[:2] for ln in lines] == [["ok", n] for n in names], lines
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result) >= {"gpu", "driver", "cuda", "torch", "dali", "cases", "efficiency"}
    assert [c["name"] for c in result["cases"]] == names
    assert all(c["ok"] for c in result["cases"])
    assert result["cases"][2]["detail"] == "equal to NumPy on cpu: 8 samples, lam too"
    assert result["cases"][3]["detail"] == "bit-identical (2 batches)"
    assert result["cases"][0]["detail"].startswith("28/28 decoded on cpu, 0 flat")


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
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    check = gpu_check.Check(tmp_path, "cpu", budget_s=60)
    check.timeout_scale = 1
    hang = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    code, _ = check.run("hang", hang, timeout_s=2)
    assert code is None
    cases = json.loads((tmp_path / "gpu_check.json").read_text())["cases"]
    assert cases == [{"name": "hang", "ok": False, "detail": "timed out after 2 s: started"}]
    spent = gpu_check.Check(tmp_path, "cpu", budget_s=0)
    assert spent.run("late", hang, timeout_s=10) == (None, "")
    assert spent.result["cases"][-1]["detail"].startswith("not run: the time budget")


def test_a_case_timeout_leaves_the_cases_after_it_their_reserve(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    check = gpu_check.Check(tmp_path, "gpu" if torch.cuda.is_available() else "cpu", 290)
    check.timeout_scale = 1
    assert check.timeout(120, left_s=290) == 120  # nothing after it
    check.pending = ["profile", "train", "torchrun"]  # 80 + 30 + 30 reserved
    assert check.timeout(120, left_s=290) == 120
    assert check.timeout(120, left_s=200) == 60
    assert check.timeout(120, left_s=100) == 5  # a floor: the case still gets a try
    assert check.timeout(120, left_s=3) == 3
    assert check.timeout(2, left_s=100) == 2
    assert sum(gpu_check.RESERVE.values()) < 290  # the default budget covers every reserve
    assert set(gpu_check.RESERVE) == set(gpu_check.CASES)


def test_a_failed_case_reports_its_error_line_not_a_banner():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
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

"""One command that checks dalikd's DALI GPU path on a GPU: ``python benchmarks/gpu_check.py
--out DIR`` (≤ 240 s on one H100 or H200 by the time model below, no network; see
benchmarks/GPU_CHECK.md).

Prints the versions it runs with (DALI, nvImageCodec, nvJPEG, the CUDA runtimes, the driver),
then one line per case as it finishes, ``ok|FAIL <case> <detail>``, and rewrites
``DIR/gpu_check.json`` after every case (a killed run leaves what it had):
``{"gpu", "driver", "cuda", "torch", "dali", ..., "device", "cases": [{"name", "ok", "detail"}],
"efficiency": {aug: fed KD step / KD step on synthetic tensors}, "seconds": {case: s}}``.

Before any case: a pre-flight import of every package the check and the CLI need (one line
naming the missing ones, exit 1), and the native operators' build and GPU verification, which
``dalikd doctor --build`` caches: when they are not cached yet they run here, before the clock.

Cases: ``doctor`` (the native operator, cached, and its GPU backend verified on the GPU);
``jpegs`` (synthetic JPEGs of mixed sizes with CMYK, grayscale and progressive ones, every one
decoded); ``profile`` (``dalikd profile``, R34 -> R18, batch 256, 2 windows of 0.5 s a stage:
data-loading efficiency for KD and KD + CutMixPick); ``train`` (1 epoch of ``dalikd train --aug
cutmixpick``); ``torchrun`` (the same under ``torchrun --nproc_per_node 1``: a process group of
one, NCCL on GPU, DDP; ok only when train says it joined one); ``recovery`` (files cut short
are left out by the scan; two that pass it but fail the GPU's decoder are found in training,
reported, left out, the epoch done); ``checkpoint`` (restore gives the same next batch);
``exact/<op>/<path>`` (MixUp and CutMix, native and composed, on injected draws with halves and
empty, clipped and full boxes, against NumPy); ``same/<aug>/<granularity>`` (native vs
composed: bit-identical, or the largest difference); ``loader/<aug>/<path>/<granularity>``
(train_loader for every built-in recipe, native and composed mixing, chosen by
``DataConfig.mixing``, 3 batches: device, dtype, shape, value range). train, torchrun and
profile run ``--mixing auto`` and say the path they resolved.

Every case but the JPEG set-up runs in a child process with its own timeout (a hang or a crash
in DALI, NCCL or the plugin becomes a FAIL line). The time model: each case has a reserve, the
seconds it took in the CPU rehearsal (``REHEARSAL_S``) times ``GPU_FACTOR`` on a GPU
(``CPU_FACTOR`` in the CPU dry run); the budget (``--budget``, default 240 s on a GPU) covers
every reserve; a case's timeout is ``NOMINAL`` times its reserve, but never more than what
leaves each case still to come its reserve. So a slow case cannot starve the rest, and the
cases run in ``CASES`` order: the data-loading efficiency (``profile``) right after the
set-up, the long ``loader`` matrix last. Each case's seconds go to ``"seconds"`` in the JSON.
Without CUDA, ``--device gpu`` (the default) prints one line and exits 0. ``--device cpu`` is a
dry run of this script's logic on CPU with tiny sizes (its results say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # its modules beside it, also when imported (the tests)
    sys.path.insert(0, str(HERE))

from gpu_check_env import PREFLIGHT, preflight, versions, versions_line  # noqa: E402 (stdlib)

CASES = (
    "doctor",
    "jpegs",
    "profile",
    "train",
    "torchrun",
    "recovery",
    "checkpoint",
    "exact",
    "same",
    "loader",
)
# Seconds each case took in the CPU rehearsal (`gpu_check.py --device cpu` with its default
# budget on the 2-core CI machine, load 4-7 from other jobs; benchmarks/GPU_CHECK.md, "The time
# model"): the largest of four runs, two under Python 3.11 / torch 2.14 and two under the GPU
# machine's Python 3.12 / torch 2.11 with the DALI bundle, rounded up. The same plan as on the
# GPU (the cases, the profile's windows); most of it is fixed cost: process start, imports,
# pipeline builds, model set-up.
REHEARSAL_S = {"doctor": 10, "jpegs": 7, "profile": 38, "train": 17, "torchrun": 20,
               "recovery": 13, "checkpoint": 8, "exact": 2, "same": 10, "loader": 22}  # fmt: skip
# A case on a GPU machine is expected to take at most GPU_FACTOR x its rehearsal seconds: the
# fixed costs run on 16 idle cores there instead of 2 busy ones, each process adds a CUDA
# context and the decoder's nvJPEG handles (1-3 s), the profile's timed windows take the same
# wall time on either, and the GPU's batches (64 px, 32 a batch; the profile's 224 px, 256) cost
# little next to them. A margin, not a measurement: the first GPU run's "seconds" replace it.
GPU_FACTOR = 1.5
# The CPU dry run on the shared 2-core machine: other jobs' load stretched a case up to 2.7x
# (load 13 against 4-5).
CPU_FACTOR = 3.0
RESERVE = {c: math.ceil(s * GPU_FACTOR) for c, s in REHEARSAL_S.items()}  # GPU seconds
CPU_RESERVE = {c: math.ceil(s * CPU_FACTOR) for c, s in REHEARSAL_S.items()}
BUDGET_S = {"gpu": 240, "cpu": math.ceil(sum(CPU_RESERVE.values()) * 1.1)}
NOMINAL = 3  # a case's own timeout, in reserves (the slack of earlier cases, if left)
# The profile's plan, on either device: fewer, shorter windows than `dalikd profile`'s default.
PROFILE_PLAN = ["--aug", "cutmixpick", "--baseline", "none", "--windows", "2",
                "--window-seconds", "0.5", "--warmup", "2"]  # fmt: skip


# -- the parent: runs cases, prints, records -----------------------------------------------------


class Check:
    def __init__(self, out: Path, device: str, budget_s: float | None = None):
        self.out, self.device = out, device
        self.budget_s = BUDGET_S[device] if budget_s is None else budget_s
        self.deadline = time.monotonic() + self.budget_s
        self.result = {**versions(device), "device": device, "budget_s": self.budget_s,
                       "cases": [], "efficiency": {}, "seconds": {}}  # fmt: skip
        self.pending: list[str] = []  # the top-level cases still to come after the current one

    def reserve(self, case: str) -> float:
        """What ``case`` is expected to need at most on this device (the time model)."""
        return (RESERVE if self.device == "gpu" else CPU_RESERVE).get(case, 0)

    def record(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'ok' if ok else 'FAIL'} {name} {detail}", flush=True)
        self.result["cases"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.save()

    def save(self) -> None:
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")

    def timeout(self, nominal_s: float, left_s: float) -> float:
        """A case's timeout: its nominal seconds, but no more than what leaves every case still
        to come its reserve, and never under 5 s (or the nominal, or what is left)."""
        later = sum(self.reserve(c) for c in self.pending)
        return max(min(nominal_s, left_s - later), min(nominal_s, left_s, 5.0))

    def run(self, case: str, cmd: list[str], timeout_s: float | None = None) -> tuple:
        """Run a child; relay its MARK lines as cases. ``timeout_s``: its nominal timeout,
        NOMINAL reserves by default. Returns (returncode or None on timeout, the last lines of
        its output)."""
        from gpu_check_cases import MARK

        left = self.deadline - time.monotonic()
        if left < 5:
            self.record(case, False, "not run: the time budget (--budget) was spent")
            return None, ""
        nominal = NOMINAL * self.reserve(case) if timeout_s is None else timeout_s
        timeout_s = self.timeout(nominal, left)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        tail: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(MARK):
                    c = json.loads(line[len(MARK) :])
                    self.record(c["name"], c["ok"], c["detail"])
                else:
                    tail.append(line.rstrip())
                    del tail[:-200]  # doctor --json is ~30 lines, warnings may come with it

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = None
        reader.join(timeout=5)
        self.result["seconds"][case] = round(time.monotonic() - started, 1)
        self.save()
        if code is None:
            self.record(case, False, f"timed out after {timeout_s:.0f} s: {_last(tail)}")
        return code, "\n".join(tail)

    def child(self, case: str, data: Path, select: list[str]) -> None:
        before = len(self.result["cases"])
        cmd = [sys.executable, __file__, "--child", case, "--data", str(data),
               "--device", self.device, "--select", ",".join(select)]  # fmt: skip
        code, tail = self.run(case, cmd)
        if code not in (0, None) or (code == 0 and len(self.result["cases"]) == before):
            self.record(case, False, f"exited {code}: {_last(tail.splitlines())}")


def _last(lines: list[str]) -> str:
    """The line that says what went wrong: the last error line (``XError: ...`` or dalikd's
    ``error: ...``, torchrun's ``[rank0]:`` prefix dropped), else the last unindented one."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln) for ln in lines]
    errors = [ln for ln in lines if re.match(r"(\w+(Error|Exception)|error):", ln)]
    useful = errors or [ln for ln in lines if ln.strip() and not ln.startswith(" ")]
    return (useful or lines or ["no output"])[-1][:300]


def dalikd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dalikd", *args]


def _json_in(out: str) -> dict | None:
    """The JSON object a command printed on lines of its own (warnings may come around it)."""
    lines = out.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("{"))
        return json.JSONDecoder().raw_decode("\n".join(lines[start:]))[0]
    except (StopIteration, ValueError):
        return None


def before_the_clock() -> tuple[str, dict]:
    """``dalikd doctor --build --json``: the native build, and on a GPU its verification there,
    found cached when the procedure ran it before (else done now), outside the budget so no
    case pays for it. Returns the line to print and what doctor said."""
    started = time.monotonic()
    proc = subprocess.run(dalikd("doctor", "--build", "--json"), capture_output=True, text=True)
    built = _json_in(proc.stdout)
    seconds = time.monotonic() - started
    if built is None:
        lines = (proc.stdout + proc.stderr).splitlines()
        return f"before the clock ({seconds:.0f} s): doctor --build failed: {_last(lines)}", {}
    how = "found cached" if built.get("cached") else "not cached: built now"
    return (f"before the clock ({seconds:.0f} s): native build {how}; GPU backend: "
            f"{built.get('gpu_backend')}"), built  # fmt: skip


def case_doctor(check: Check) -> None:
    code, out = check.run("doctor", dalikd("doctor", "--json"))
    if code is None:
        return
    info = _json_in(out)
    if info is None:
        check.record("doctor", False, f"exited {code}: {_last(out.splitlines())}")
        return
    backend = info.get("gpu_backend", "")
    if check.device == "gpu":
        ok = code == 0 and backend.startswith("verified on")
        check.record(
            "doctor", ok, f"GPU backend: {backend}; mixing on gpu: {info['mixing']['gpu']}"
        )
    else:
        ok = code == 0 and info["mixing"]["cpu"] == "native"
        check.record("doctor", ok, f"mixing on cpu: {info['mixing']['cpu']}")


def case_recovery(check: Check, data: Path, runs: Path) -> None:
    """A run over 2 classes (a few files each) plus the bad files of
    :func:`gpu_check_cases.bad_jpegs`, made from a baseline YCbCr JPEG (nvJPEG's own, on a
    GPU): the ones cut short are left out by the scan, the two that pass it fail the device's
    decoder in training and are found, reported and left out, and the epoch is done."""
    from gpu_check_cases import bad_jpegs, left_out, sizes, ycbcr_jpeg

    root, keep = runs.parent / "bad_data", 12 if check.device == "gpu" else 6
    for split in ("train", "val"):
        for c in ("c0", "c1"):
            (root / split / c).mkdir(parents=True)
            for path in sorted((data / split / c).glob("*.jpg"))[:keep]:
                shutil.copy2(path, root / split / c / path.name)
    good = ycbcr_jpeg(data / "train" / "c0").read_bytes()
    bad = {root / "train" / f"c{i % 2}" / name: (body, where)
           for i, (name, (body, where)) in enumerate(bad_jpegs(good).items())}  # fmt: skip
    for path, (body, _) in bad.items():
        path.write_bytes(body)
    size = sizes(check.device)
    run = runs / "recovery"
    # a batch that divides the files the scan keeps: an epoch then reads every one (dalikd's
    # epoch leaves the few beyond its last whole batch for another epoch)
    from dalikd.data import scan_dataset

    kept = len(scan_dataset(root, cache=False).train)
    most = max(2, size["batch_size"] // 4)
    batch = max((b for b in range(2, most + 1) if kept % b == 0), default=most)
    cmd = dalikd("train", "--data", str(root), "--device", check.device, "--aug", "none",
                 "--student", "resnet18", "--epochs", "1", "--batch-size", str(batch),
                 "--image-size", str(size["image_size"]), "--threads", "2",
                 "--out", str(run))  # fmt: skip
    code, tail = check.run("recovery", cmd)
    if code is None:
        return
    try:
        report = (run / "data_report.tsv").read_text(errors="replace")
    except OSError:
        report = ""
    found = {p.name: left_out(report, p) for p in bad}
    wrong = [f"{p.name} ({found[p.name] or 'not left out'})" for p, (_, where) in bad.items()
             if not found[p.name] or found[p.name] not in where.split(" or ")]  # fmt: skip
    by = {w: [n for n, f in found.items() if f == w] for w in ("scan", "decoder")}
    detail = (f"left out by the scan: {', '.join(by['scan'])}; failed in training, left out, "
              f"the epoch done: {', '.join(by['decoder'])}")  # fmt: skip
    if code != 0:
        detail = f"exited {code}: {_last(tail.splitlines())}; {detail}"
    check.record("recovery", code == 0 and not wrong, f"wrong: {', '.join(wrong)}; {detail}"
                 if wrong else detail)  # fmt: skip


def case_train(check: Check, data: Path, teacher: Path, runs: Path, torchrun: bool) -> None:
    from gpu_check_cases import sizes

    name = "torchrun" if torchrun else "train"
    size = sizes(check.device)
    # --mixing auto: the native operator where it runs (doctor says whether), else composed
    args = ["train", "--data", str(data), "--device", check.device, "--aug", "cutmixpick",
            "--mixing", "auto",
            "--teacher", "resnet18", "--teacher-weights", str(teacher), "--student", "resnet18",
            "--epochs", "1", "--batch-size", str(size["batch_size"]), "--image-size",
            str(size["image_size"]), "--threads", "2", "--out", str(runs / name)]  # fmt: skip
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "1", "-m", "dalikd", *args]  # fmt: skip
    else:
        cmd = dalikd(*args)
    code, tail = check.run(name, cmd)
    if code is None:
        return
    done = code == 0 and (runs / name / "last.pt").exists()
    try:
        mixing = json.loads((runs / name / "config.json").read_text())["data"]["mixing"]
    except (OSError, ValueError, KeyError, TypeError):
        mixing = "?"
    what = f"1 epoch, mixing {mixing}"
    if torchrun:  # the group train joined, as it says: "distributed: 1 rank(s), nccl, DDP"
        backend = "nccl" if check.device == "gpu" else "gloo"
        said = [ln for ln in tail.splitlines() if "distributed:" in ln]
        done = done and any(f", {backend}, DDP" in ln for ln in said)
        what = f"{what}; {said[-1].split('distributed: ')[-1] if said else 'no process group'}"
    check.record(name, done, what if code == 0 else f"exited {code}: {_last(tail.splitlines())}")


def case_profile(check: Check, data: Path) -> None:
    """The data-loading efficiency of KD and KD + CutMixPick (the fed KD step / the same step
    on synthetic tensors), by PROFILE_PLAN: on a GPU at training's sizes, in the dry run at
    tiny ones with the same windows."""
    path = check.out / "profile.json"
    if check.device == "gpu":
        models = ["--teacher", "resnet34", "--student", "resnet18", "--batch-size", "256",
                  "--image-size", "224"]  # fmt: skip
    else:
        models = ["--teacher", "resnet18", "--student", "resnet18", "--batch-size", "4",
                  "--image-size", "32"]  # fmt: skip
    cmd = dalikd("profile", "--data", str(data), "--device", check.device, "--mixing", "auto",
                 *PROFILE_PLAN, *models, "--json", str(path))  # fmt: skip
    code, tail = check.run("profile", cmd)
    if code is None:
        return
    if code != 0 or not path.exists():
        check.record("profile", False, f"exited {code}: {_last(tail.splitlines())}")
        return
    prof = json.loads(path.read_text())
    check.result["efficiency"] = {a: round(v, 4) for a, v in prof["efficiency"].items()}
    check.result["profile_bound"] = prof.get("bound")
    detail = ", ".join(f"{a} {v:.3f}" for a, v in prof["efficiency"].items())
    check.record("profile", {"none", "cutmixpick"} <= set(prof["efficiency"]),
                 f"data-loading efficiency: {detail}; mixing: {prof.get('mixing')}")  # fmt: skip


def save_teacher(path: Path, classes: int) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), path)  # random


def _select(parser: argparse.ArgumentParser, spec: str) -> dict[str, list[str]]:
    """Each top-level case once, in the order given, with its patterns ("loader/cutmix/*")."""
    select: dict[str, list[str]] = {}
    for item in (c.strip() for c in spec.split(",") if c.strip()):
        top = item.split("/")[0]
        select.setdefault(top, []).append(item if "/" in item else f"{top}*")
    unknown = sorted(set(select) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    return select


def make_data(work: Path, device: str) -> Path:
    """The synthetic JPEG set, 4 classes (before the clock). The profile's batches of 256: 4 per
    epoch, so epoch ends are not every other batch."""
    from gpu_check_cases import make_jpegs

    data = work / "data"
    kinds = make_jpegs(data, 4, 256 if device == "gpu" else 6, val_per_class=7)
    print(f"data: {data} ({', '.join(f'{n} {k}' for k, n in kinds.items())})", flush=True)
    return data


def run_cases(check: Check, select: dict[str, list[str]], data: Path) -> None:
    cases, classes = list(select), 4
    work = data.parent
    teacher = work / "teacher.pt"
    for i, case in enumerate(cases):
        check.pending = cases[i + 1 :]
        if case == "doctor":
            case_doctor(check)
        elif case in ("jpegs", "loader", "same", "checkpoint", "exact"):
            check.child(case, data, select[case])
        elif case == "profile":
            case_profile(check, data)
        elif case in ("train", "torchrun"):
            if not teacher.exists():
                save_teacher(teacher, classes)
            case_train(check, data, teacher, work / "runs", torchrun=case == "torchrun")
        elif case == "recovery":
            case_recovery(check, data, work / "runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: a dry run of this script's logic with tiny sizes")  # fmt: skip
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset; loader and same take patterns of their "
                        "cases too, e.g. same/cutmix/*,loader/mixup/native/batch")  # fmt: skip
    parser.add_argument("--budget", type=float, default=None,
                        help=f"s, for all cases together (default: {BUDGET_S['gpu']} on a GPU, "
                        f"{BUDGET_S['cpu']} in the CPU dry run)")  # fmt: skip
    parser.add_argument("--preflight", action="store_true",
                        help="only check that every package imports, then exit")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--select", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from gpu_check_cases import child_main

        child_main(args)
        return
    missing = preflight()
    if missing:
        print(f"gpu_check: cannot start, packages missing: {'; '.join(missing)} (the GPU "
              "machine gets DALI and its wheels from the bundle: benchmarks/GPU_CHECK.md)",
              flush=True)  # fmt: skip
        sys.exit(1)
    if args.preflight:
        print(f"gpu_check: pre-flight ok ({', '.join(PREFLIGHT)} import)", flush=True)
        return
    import torch

    if args.device == "gpu" and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch sees none); --device cpu is a dry run of its "
              "logic", flush=True)  # fmt: skip
        return
    select = _select(parser, args.cases)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    line, built = before_the_clock()
    print(line, flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        data = make_data(work, args.device)
        check = Check(out, args.device, args.budget)  # the clock starts here
        check.result["before_the_clock"] = {k: built.get(k) for k in ("cached", "gpu_backend")}
        print(versions_line(check.result), flush=True)
        check.save()
        run_cases(check, select, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [c["name"] for c in check.result["cases"] if not c["ok"]]
    print(f"{len(check.result['cases']) - len(failed)} ok, {len(failed)} FAIL; "
          f"{out / 'gpu_check.json'}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""`dalikd profile` end to end on small generated data (CPU), and its one-line errors."""

import importlib.util
import json
import math

import pytest
from tests_helpers import run_cli

from dalikd import profile
from dalikd.recipes import builtin_recipes

TINY = "tiny_models:tiny_cnn"
FAST = ["--image-size", 16, "--batch-size", 4, "--threads", 1, "--device", "cpu",
        "--windows", 2, "--window-seconds", 0, "--warmup", 1]  # fmt: skip


def test_profile_writes_every_stage_as_json(solid_dataset, tmp_path, tiny_env, capsys):
    out = tmp_path / "profile.json"
    args = ["profile", "--data", solid_dataset, "--aug", "flip,cutmix,cutmixpick",
            "--teacher", TINY, "--student", TINY, "--mixing", "composed", "--json", out,
            *FAST]  # fmt: skip
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["cpu_count"] >= 1 and report["threads"] == 1
    assert report["mixing"] == "stock operators"  # --mixing composed
    # the data plan of each scheme, resolved once: the paths it ran
    assert report["plans"]["cutmix"]["mixing"] == "composed"
    assert report["plans"]["none"]["resize"] == ("native" if report["resize"].startswith(
        "native") else "dali")  # fmt: skip
    names = [st["name"] for st in report["stages"]]
    assert len(names) == len(set(names))
    assert names[:5] == [
        "read",
        "+ decode, random crop",
        "+ resize 16² (antialias)",
        "+ resize 16², no antialias (option)",
        "+ flip (plain pipeline)",
    ]
    # With the native resize, DALI's own resize is timed beside it, and the plain hand-off
    # against it and timm's loader (where timm is installed), in the same windows.
    native = report["resize"].startswith("native")
    dali = " (DALI's fn.resize)"
    assert names[5:7] == (
        [f"+ resize 16² (antialias){dali}", f"+ flip (plain pipeline){dali}"] if native else []
    )
    assert importlib.util.find_spec("timm") is None or "timm" in report["alternatives"]
    assert ("DALI's fn.resize" in report["alternatives"]) == native
    for alt in report["alternatives"].values():
        assert alt["img_per_s"] > 0 and alt["dalikd_ratio"] > 0 and len(alt["windows"]) == 2
    schemes = ["none", "flip", "cutmix", "cutmixpick"]
    for aug in schemes:
        per_scheme = [n for n, st in zip(names, report["stages"], strict=True) if st["aug"] == aug]
        views = {"none": "B", "cutmixpick": "3B"}.get(aug, "2B")
        expected = [
            f"hand-off to torch, normalize ({aug})",
            f"teacher forward, {views} images ({aug})",
            f"student forward + backward, {'x' if aug == 'none' else 'x and x' + chr(39)} ({aug})",
            f"KD step, synthetic tensors ({aug})",
            f"KD step, fed by the pipeline ({aug})",
        ]
        if aug != "none":
            expected.insert(0, f"+ {aug}" + (" (pool of 2·B)" if aug == "cutmixpick" else ""))
        assert per_scheme == expected
    for st in report["stages"]:
        assert st["img_per_s"] > 0 and math.isfinite(st["img_per_s"])
        assert len(st["windows"]) == 2 and st["kind"] in ("data", "side", "model", "step")
    assert [b["aug"] for b in report["baseline"]] == schemes
    assert all(b["img_per_s"] > 0 for b in report["baseline"])
    assert set(report["ratio"]) == set(schemes) == set(report["bound"]) == set(report["efficiency"])
    assert set(report["cpu_ratio"]) == set(schemes)
    for bound in report["bound"].values():
        assert bound["stage"] in names and bound["own_ms_per_img"] >= 0
    for st in report["stages"]:
        if st["name"].startswith("+ ") and st["aug"]:
            assert st["vs_plain"] > 0 and st["own_ms_per_img"] >= 0
            assert st["vs_plain_cpu"] > 0  # CPU time is measured for DALI pipelines
    assert "bound" in stdout and "torchvision" in stdout


def test_data_path_only_without_models_or_baseline(solid_dataset, tmp_path, capsys):
    out = tmp_path / "p.json"
    code, _, err = run_cli(
        ["profile", "--data", solid_dataset, "--aug", "none", "--baseline", "none",
         "--no-antialias", "--json", out, *FAST], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["antialias"] is False and report["baseline"] == [] and report["ratio"] == {}
    assert [st["name"] for st in report["stages"]] == [
        "read", "+ decode, random crop", "+ resize 16² (NO antialias)",
        "+ flip (plain pipeline)", "hand-off to torch, normalize (none)",
    ]  # fmt: skip
    assert report["efficiency"] == {} and report["bound"]["none"]["stage"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--aug", "flip,nosuch"], "unknown augmentation 'nosuch'"),
        (["--aug", "flip,,cutmix"], "empty item"),
        (["--teacher", TINY], "--teacher needs --student"),
        (["--batch-size", 1000], "no full batch of 1000"),
        (["--pool-size", 0], "--pool-size must be at least 1"),
        (["--batch-size", 0], "--batch-size must be positive, got 0"),  # the flag, not data.*
    ],
)
def test_bad_arguments_are_one_line_errors(solid_dataset, extra, message, capsys):
    code, _, err = run_cli(["profile", "--data", solid_dataset, *FAST, *extra], capsys)
    assert code == 1 and message in err
    assert len(err.strip().splitlines()) == 1


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(["profile", "--data", tmp_path / "nope", *FAST], capsys)
    assert code == 1 and "dataset folder not found" in err
    assert len(err.strip().splitlines()) == 1


def test_all_is_every_built_in_recipe_after_plain_kd():
    names = [s.name for s in profile.resolve_augs("all")]
    assert names[0] == "none" and set(names) == set(builtin_recipes())
    assert [s.name for s in profile.resolve_augs("cutmix,flip,cutmix")] == [
        "none", "cutmix", "flip",
    ]  # fmt: skip


def test_bound_is_the_largest_own_cost():
    stages = [
        {"name": "read", "kind": "data", "img_per_s": 10000.0},  # 0.1 ms
        {"name": "+ decode", "kind": "data", "img_per_s": 2000.0},  # + 0.4 ms
        {"name": "+ resize", "kind": "data", "img_per_s": 800.0},  # + 0.75 ms
        {"name": "hand-off", "kind": "data", "img_per_s": 790.0},  # + ~0.016 ms
        {"name": "teacher", "kind": "model", "img_per_s": 1600.0},  # 0.625 ms alone
    ]
    bound = profile.bound(stages, [st["name"] for st in stages])
    assert bound["stage"] == "+ resize"
    assert bound["own_ms_per_img"] == pytest.approx(1.25 - 0.5)
    assert [round(st["own_ms_per_img"], 3) for st in stages] == [0.1, 0.4, 0.75, 0.016, 0.625]


def test_every_declared_torchvision_equivalent_has_a_baseline():
    """The baseline's names come from the recipe registry (@recipe(torchvision=...))."""
    from dalikd.config import DataConfig
    from dalikd.profile.baseline import torchvision_parts
    from dalikd.recipes import recipe_info

    declared = {n: recipe_info(r).torchvision for n, r in builtin_recipes().items()}
    assert declared["cutmixpick"] == "CutMix pool" and declared["none"] == ""
    assert declared["autoaugment_cifar10"] == "AutoAugment(CIFAR10)"  # each policy its own
    assert declared["autoaugment_svhn"] == "AutoAugment(SVHN)"
    for name, equivalent in declared.items():
        parts = torchvision_parts(equivalent, DataConfig(image_size=32), 10)
        assert (parts is None) == (equivalent == ""), name
        if equivalent.startswith("AutoAugment("):  # the policy named, not another one
            assert parts[0].policy.name == equivalent[len("AutoAugment(") : -1], name


def test_cpu_share_of_the_plain_pipeline_is_the_inverse_ratio_of_cpu_ms():
    from dalikd.profile.config import Timing
    from dalikd.profile.report import cpu_vs_plain

    plain, mixed = Timing(100.0, cpu_ms_per_img=2.0), Timing(120.0, cpu_ms_per_img=2.5)
    assert cpu_vs_plain(mixed, plain) == {"vs_plain_cpu": 0.8}  # 2.0 / 2.5: costlier per image
    assert cpu_vs_plain(mixed, Timing(100.0)) == {}  # not measured: not reported


def test_the_baselines_workers_start_from_a_forkserver_not_a_fork_of_this_process(tmp_path):
    """The profile's process runs DALI's threads: a DataLoader worker forked from it can hang
    on a lock one of them held. The torchvision baseline's workers start from a forkserver and
    deliver batches."""
    import multiprocessing

    import torch
    from conftest import make_dataset

    from dalikd.config import DataConfig
    from dalikd.profile.baseline import BaselineStream, baseline_loader

    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=8, n_val=2)
    data = DataConfig(path=str(root), image_size=16, batch_size=4, threads=2)
    stream = BaselineStream(baseline_loader("cutmix", root, data, 2, 1), torch.device("cpu"))
    try:
        assert stream.loader.multiprocessing_context is multiprocessing.get_context("forkserver")
        for _ in range(5):  # more than an epoch: the persistent workers go on
            stream.step()
        assert len(stream.worker_pids()) == 2
    finally:
        stream.close()

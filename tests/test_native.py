"""The native mixing operator (dalikd.native): it builds here, it is bit-identical to the
composed stock-operator graph through the real training loader, and without a compiler dalikd
falls back to the composed graph with exactly one warning.

The build runs once per test session (conftest points DALIKD_CACHE at a session folder)."""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image
from tests_helpers import run_cli

from dalikd import loaders, native, ops
from dalikd.cli.main import main
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.errors import DalikdError
from dalikd.native import builder
from dalikd.plan import checkpoint_mixing, resolve_plan
from dalikd.recipes import AugContext, Seeds, builtin_recipes

S = 32  # px


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Noise JPEGs of several sizes: the random-resized crop differs per image."""
    root = tmp_path_factory.mktemp("native_jpegs")
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for label in ("a", "b", "c"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                h, w = rng.integers(36, 64, 2)
                pixels = rng.integers(0, 256, (h, w, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg", quality=90)
    return scan_dataset(root)


@pytest.fixture
def fresh_native():
    """Forget the process's build/load answers before and after (the library stays loaded)."""
    native.reset()
    yield
    native.reset()


def batches(dataset, name, granularity, pool_size=2, steps=2):
    data = DataConfig(path=str(dataset.root), image_size=S, batch_size=4, threads=2)
    plan = resolve_plan(data, name, device="cpu", seed=5, granularity=granularity,
                        pool_size=pool_size)  # fmt: skip
    loader = loaders.train_loader(dataset.train, plan)
    return [b for _, b in zip(range(steps), loader, strict=False)]


def schemas(dataset, name, granularity):
    """The operator schemas in the training graph (to see which path was taken)."""
    data = DataConfig(path=str(dataset.root), image_size=S, batch_size=4, threads=1)
    plan = resolve_plan(data, name, device="cpu", granularity=granularity)
    pipe, _ = loaders.build_pipeline(loaders.train_graph, plan, seed=0, split=dataset.train,
                                     shard_id=0, num_shards=1)  # fmt: skip
    pipe._build_graph()  # private: collects the graph's operators without building the backend
    return {getattr(op._op, "schema_name", "") for op in pipe._ops}


def test_the_plugin_builds_loads_and_is_cached_by_dali_version_and_source_hash():
    import nvidia.dali

    status = native.load()
    assert status.cpu, status.reason
    info, folder = native.build()
    assert folder.name == f"{nvidia.dali.__version__}-{native.source_hash()}"
    assert json.loads((folder / "build.json").read_text())["cpu_library"] == info.cpu_library
    assert native.build() == (info, folder)  # cached: no second build
    if native.find_nvcc():  # CI with nvcc: the CUDA operator must compile (never run: no GPU)
        assert status.gpu, status.gpu_reason
        assert status.gpu_reason.startswith(native.GPU_UNVERIFIED)


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("name", ["cutmix", "mixup", "cutmixpick"])
def test_native_is_bit_identical_to_composed_through_the_train_loader(
    jpegs, name, granularity, monkeypatch
):
    monkeypatch.setenv("DALIKD_NATIVE_RESIZE", "0")  # both with DALI's resize: only mixing differs
    monkeypatch.setenv("DALIKD_NATIVE", "0")
    composed = batches(jpegs, name, granularity, pool_size=3)
    assert "DalikdMix" not in schemas(jpegs, name, granularity)
    monkeypatch.setenv("DALIKD_NATIVE", "1")
    fused = batches(jpegs, name, granularity, pool_size=3)
    assert "DalikdMix" in schemas(jpegs, name, granularity)
    assert "MultiPaste" not in schemas(jpegs, name, granularity)
    assert len(composed) == len(fused) == 2
    for c, f in zip(composed, fused, strict=True):
        assert c.pool_size == f.pool_size == (3 if name == "cutmixpick" else 1)
        for field in ("images", "labels", "aug_images", "lam", "perm"):
            torch.testing.assert_close(getattr(f, field), getattr(c, field), rtol=0, atol=0)
        assert not torch.equal(f.aug_images[:4], f.images)  # something was mixed


def test_one_call_writes_k_candidates_exactly_as_k_composed_cutmix_calls():
    # Straight through ops, on known images: every candidate pastes its own box and partner.
    images = np.stack([np.full((S, S, 3), 20 * i + 5, np.uint8) for i in range(6)])
    images[..., 0] = np.arange(S, dtype=np.uint8)[:, None] * 7  # position shows in red

    def graph(native_op):
        def run():
            x = fn.external_source(source=lambda: list(images), batch=True, layout="HWC")
            # the same seeds both ways (a graph builder hands them in, as train_graph does)
            pool = ops.cutmix_pool(x, S, 3, native=native_op, seeds=Seeds(11))
            return tuple(node for candidate in pool for node in candidate)

        pipe = pipeline_def(run)(batch_size=6, num_threads=2, device_id=None, seed=11)
        pipe.build()
        return [[o.as_array() for o in pipe.run()] for _ in range(3)]

    for a, b in zip(graph(False), graph(True), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["cutmix", "mixup"])
def test_injected_edge_draws_mix_the_same_both_ways(mode):
    # The operator computes CutMix's box itself: full box, empty box, clipped at every border.
    s, rng = 16, np.random.default_rng(3)
    images = rng.integers(0, 256, (6, s, s, 3), np.uint8)
    lam = np.array([0.0, 1.0, 0.5, 0.9, 0.3, 0.999], np.float32)
    centres = np.array([(8, 8), (5, 5), (0, 0), (15, 3), (9, 15), (7, 7)], np.int32)
    perm = np.array([3, 2, 4, 5, 1, 0], np.int32)

    def run(native_op):
        def graph():
            def src(v):
                return fn.external_source(source=lambda: list(v), batch=True)

            x = fn.external_source(source=lambda: list(images), batch=True, layout="HWC")
            if mode == "mixup":
                return ops.mixup(x, lam=src(lam), perm=src(perm), native=native_op)
            return ops.cutmix(
                x, s, lam=src(lam), perm=src(perm), centre=src(centres), native=native_op
            )

        pipe = pipeline_def(graph)(batch_size=6, num_threads=1, device_id=None)
        pipe.build()
        return [o.as_array() for o in pipe.run()]

    for a, b in zip(run(False), run(True), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("saved, now", [("0", "1"), ("1", "0")])
def test_a_resumed_loader_keeps_the_mixing_path_of_its_checkpoint(jpegs, saved, now, monkeypatch):
    # The two graphs have different operators, so a DALI checkpoint only restores into its own.
    data = DataConfig(path=str(jpegs.root), image_size=S, batch_size=4, threads=1)

    def loader(checkpoint=None):  # the plan takes the saved state's paths over "auto"
        plan = resolve_plan(data, "cutmixpick", device="cpu", seed=2, dali_state=checkpoint)
        return loaders.train_loader(jpegs.train, plan, checkpoint=checkpoint)

    monkeypatch.setenv("DALIKD_NATIVE", saved)
    first = loader()
    batches = iter(first)
    next(batches)
    checkpoint = first.checkpoint()
    expected = next(batches)
    monkeypatch.setenv("DALIKD_NATIVE", now)
    resumed = next(iter(loader(checkpoint)))
    for field in ("images", "aug_images", "lam", "perm"):
        assert torch.equal(getattr(resumed, field), getattr(expected, field)), field


@pytest.mark.parametrize("path", ["native", "composed"])
def test_the_configured_mixing_path_wins_over_the_environment(jpegs, path, monkeypatch):
    """data.mixing picks the graph; DALIKD_NATIVE is only auto's default."""
    monkeypatch.setenv("DALIKD_NATIVE", "0" if path == "native" else "1")
    data = DataConfig(path=str(jpegs.root), image_size=S, batch_size=4, threads=1, mixing=path)
    plan = resolve_plan(data, "cutmix", device="cpu")
    pipe, _ = loaders.build_pipeline(loaders.train_graph, plan, seed=0, split=jpegs.train,
                                     shard_id=0, num_shards=1)  # fmt: skip
    pipe._build_graph()
    found = {getattr(op._op, "schema_name", "") for op in pipe._ops}
    assert ("DalikdMix" in found) == (path == "native")
    assert ("MultiPaste" in found) == (path == "composed")


def test_a_checkpoint_restores_only_into_its_own_mixing_path(jpegs):
    data = DataConfig(path=str(jpegs.root), image_size=S, batch_size=4, threads=1,
                      mixing="composed")  # fmt: skip
    first = loaders.train_loader(jpegs.train, resolve_plan(data, "mixup", device="cpu"))
    next(iter(first))
    checkpoint = first.checkpoint()
    assert checkpoint_mixing(checkpoint) == "composed"
    native_plan = resolve_plan(replace(data, mixing="native"), "mixup", device="cpu")
    with pytest.raises(DalikdError, match="saved with the composed mixing path"):
        loaders.train_loader(jpegs.train, native_plan, checkpoint=checkpoint)
    with pytest.raises(DalikdError, match="saved with the composed mixing path"):
        resolve_plan(replace(data, mixing="native"), "mixup", device="cpu", dali_state=checkpoint)


def test_a_run_saves_its_resolved_mixing_path_and_resumes_on_it(
    jpegs, tmp_path, tiny_env, monkeypatch, capsys
):
    """auto is resolved once (here by DALIKD_NATIVE=0), written to config.json and the
    checkpoint; a resume keeps it, and a contradicting --mixing is one line."""
    monkeypatch.setenv("DALIKD_NATIVE", "0")
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train", "--data", jpegs.root, "--student", "tiny_models:tiny_cnn", "--aug", "mixup",
         "--mixed-label-ce", 1, "--epochs", 1, "--image-size", 16, "--batch-size", 4,
         "--threads", 1, "--device", "cpu", "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"]["mixing"] == "composed"
    saved = torch.load(out / "last.pt", weights_only=True)["config"]["data"]["mixing"]
    assert saved == "composed"
    code, _, err = run_cli(["train", "--resume", out, "--epochs", 2, "--mixing", "native"], capsys)
    assert code == 1 and "data.mixing composed -> native" in err
    assert len(err.strip().splitlines()) == 1
    # a run dir saved before data.mixing existed: its DALI state names the graph
    saved = json.loads((out / "config.json").read_text())
    del saved["data"]["mixing"]
    (out / "config.json").write_text(json.dumps(saved))
    monkeypatch.setenv("DALIKD_NATIVE", "1")  # auto would now pick native: ignored on resume
    code, _, err = run_cli(["train", "--resume", out, "--epochs", 2], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"]["mixing"] == "composed"


def test_without_a_compiler_dalikd_falls_back_with_exactly_one_warning(
    jpegs, tmp_path, monkeypatch, fresh_native
):
    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("DALIKD_CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("DALIKD_NATIVE", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed = batches(jpegs, "cutmix", "sample") + batches(jpegs, "cutmixpick", "batch")
    ours = [w for w in caught if "native mixing operator unavailable" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler" in str(ours[0].message)
    assert all(b.aug_images is not None for b in mixed)
    assert "DalikdMix" not in schemas(jpegs, "cutmix", "sample")
    info, _ = native.build()  # the failure is cached until the toolchain changes
    assert info.cpu_library is None and "no C++ compiler" in info.cpu_error

    monkeypatch.setenv("DALIKD_NATIVE", "1")
    with pytest.raises(DalikdError, match="DALIKD_NATIVE=1.*unavailable: no C\\+\\+ compiler"):
        batches(jpegs, "mixup", "sample")


def test_native_0_never_builds(tmp_path, monkeypatch, fresh_native):
    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path))
    monkeypatch.setenv("DALIKD_NATIVE", "0")
    assert native.use_native("cpu") is False
    assert not (tmp_path / "native").exists()


def test_two_builders_at_once_compile_once(tmp_path, monkeypatch):
    # torchrun ranks start together: the file lock lets one compile, the others reuse it.
    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path))
    calls = []

    def slow_fake(work, key):  # stands in for the ~30 s compile
        calls.append(key)
        threading.Event().wait(0.3)
        (work / "libdalikd_mix_cpu.so").write_bytes(b"")
        return native.BuildInfo(key, "fake", "libdalikd_mix_cpu.so", "", None, "n/a", "", "")

    monkeypatch.setattr(builder, "_compile", slow_fake)
    monkeypatch.setattr(builder, "_current_toolchain", lambda: "fake")
    results = []
    threads = [threading.Thread(target=lambda: results.append(native.build())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert len({folder for _, folder in results}) == 1
    assert not [p for p in (tmp_path / "native").iterdir() if p.is_dir() and p.name[0] == "."]


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("name", ["cutmix", "mixup", "cutmixpick"])
def test_the_gpu_graph_with_the_native_operator_can_be_defined(name, granularity, monkeypatch):
    if not native.load().gpu:
        pytest.skip(f"no GPU backend built: {native.load().gpu_reason}")
    monkeypatch.setattr(native, "verify_gpu", lambda: (True, "a test GPU"))  # no GPU here
    nodes = []

    def graph():
        x = fn.external_source(source=lambda: [np.zeros((S, S, 3), np.uint8)] * 4, batch=True)
        # as train_graph hands it over for a plan whose mixing is native
        ctx = AugContext(S, "gpu", (0.0, 0.0, 0.0), granularity, native=True)
        out = builtin_recipes()[name](x.gpu(), ctx)
        views = getattr(out, "views", (out,))
        nodes.extend(views)
        return tuple(n for v in views for n in (v.images, v.lam, v.perm))

    pipeline_def(graph)(batch_size=4, num_threads=1, device_id=None, seed=0)  # build(): GPU
    assert nodes
    for view in nodes:
        assert view.images.device == "gpu" and view.images.source._op.schema_name == "DalikdMix"
        assert view.lam.device == "gpu" and view.perm.device == "cpu"  # the operator's λ
        assert view.lam.source is view.images.source


def test_doctor_reports_the_active_mixing_path(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--json"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    info = json.loads(out)
    assert info["mixing"]["cpu"] == "native"
    assert info["native"]["cpu"] == "loaded"
    assert info["resize"] == {
        "cpu": "native (fn.dalikd_resize)",
        "gpu": "DALI fn.resize: CPU only (the GPU keeps DALI's resize)",
    }
    assert info["dali"] and info["torch"] and "cuda_available" in info
    monkeypatch.setenv("DALIKD_NATIVE", "0")
    with pytest.raises(SystemExit):
        main(["doctor"])
    out = capsys.readouterr().out
    assert "composed: DALIKD_NATIVE=0" in out and "DALI fn.resize: DALIKD_NATIVE=0" in out

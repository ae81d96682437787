"""The GPU graphs, traced on CPU (DALI defines a GPU graph with device_id=None; only build()
needs a GPU), checked for what would fail only on the GPU:

- no pipeline output may be a CPU node that is also copied to the GPU. Such a node is allocated
  in pinned host memory, DALI exports it over DLPack as kDLCUDAHost, and torch's from_dlpack
  rejects that device type (DALI_NOTES.md, GPU facts);
- every operator has a backend for the device it was placed on. DALI's Python layer does not
  check this when it traces a graph; build() does, and only on a GPU ("not registered for GPU").

Checked for every built-in recipe x both mixing paths x both granularities, the validation and
profile graphs, and the "mixed" decoder's settings.
"""

from __future__ import annotations

import pytest

from dalikd import loaders, native
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.plan import resolve_plan
from dalikd.recipes import builtin_recipes

S = 16  # px


def traced_gpu_train_graph(monkeypatch, root, aug: str, granularity: str, native_path: bool):
    """The pipeline train_loader(device="gpu") would build, traced but not built: the DALI
    device id is None (no GPU here). Returns ``{name: output node}`` and the pipeline."""
    monkeypatch.setattr(loaders, "_dali_device_id", lambda device: None)
    data = DataConfig(path=str(root), image_size=S, batch_size=4, threads=1,
                      mixing="native" if native_path else "composed")  # fmt: skip
    plan = resolve_plan(data, aug, device="gpu", granularity=granularity)
    pipe, names = loaders.build_pipeline(
        loaders.train_graph, plan, seed=0, split=scan_dataset(root).train, shard_id=0,
        num_shards=1,
    )  # fmt: skip
    pipe._build_graph()  # private: collects the operators without building the backend
    return dict(zip(names, pipe._graph_outputs, strict=True)), pipe


def unregistered_ops(pipe) -> list[str]:
    """``"Schema (device)"`` for every traced operator that DALI (with dalikd's plugin loaded)
    has no backend for on the device it was placed on."""
    import nvidia.dali.backend as b

    native.load()  # the plugin's operators are registered when its library loads
    registered = {"cpu": b.RegisteredCPUOps(True), "gpu": b.RegisteredGPUOps(True),
                  "mixed": b.RegisteredMixedOps(True)}  # fmt: skip
    return sorted({f"{op._op.schema_name} ({op._op.device})" for op in pipe._ops
                   if op._op.schema_name not in registered[op._op.device]})  # fmt: skip


def pinned_outputs(outputs: dict, pipe) -> list[str]:
    """Names of outputs that are CPU nodes some operator (or another output) also takes on the
    GPU. A ``.gpu()`` copy is a node with the same source and index on device "gpu"."""
    devices: dict[tuple[int, int], set[str]] = {}
    nodes = [n for op in pipe._ops for n in op.inputs] + list(outputs.values())
    for node in nodes:
        devices.setdefault((id(node.source), node.index), set()).add(node.device)
    return [
        name
        for name, node in outputs.items()
        if node.device == "cpu" and "gpu" in devices[(id(node.source), node.index)]
    ]


@pytest.fixture
def gpu_backend_verified(monkeypatch):
    """Pretend the GPU smoke test passed (there is no GPU here to run it on)."""
    if not native.load().gpu:
        pytest.skip(f"no GPU backend built: {native.load().gpu_reason}")
    monkeypatch.setattr(native, "verify_gpu", lambda: (True, "a test GPU"))


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("aug", sorted(builtin_recipes()))
def test_no_output_of_the_composed_gpu_graph_is_a_pinned_cpu_node(
    solid_dataset, monkeypatch, aug, granularity
):
    outputs, pipe = traced_gpu_train_graph(monkeypatch, solid_dataset, aug, granularity, False)
    assert outputs["images"].device == "gpu"
    assert pinned_outputs(outputs, pipe) == []
    assert unregistered_ops(pipe) == []
    mixing = [name for name in outputs if name.startswith("lam_")]
    assert bool(mixing) == (aug in ("mixup", "cutmix", "cutmixpick"))
    for name in mixing:  # λ and perm leave the pipeline on the GPU
        assert outputs[name].device == "gpu"
        assert outputs[name.replace("lam", "perm")].device == "gpu"


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("aug", ["mixup", "cutmix", "cutmixpick"])
def test_no_output_of_the_native_gpu_graph_is_a_pinned_cpu_node(
    solid_dataset, monkeypatch, gpu_backend_verified, aug, granularity
):
    outputs, pipe = traced_gpu_train_graph(monkeypatch, solid_dataset, aug, granularity, True)
    schemas = {getattr(op._op, "schema_name", "") for op in pipe._ops}
    assert "DalikdMix" in schemas and "MultiPaste" not in schemas
    assert pinned_outputs(outputs, pipe) == []
    assert unregistered_ops(pipe) == []
    lams = [name for name in outputs if name.startswith("lam_")]
    assert len(lams) == (2 if aug == "cutmixpick" else 1)
    for name in lams:  # the operator's own λ output, on the GPU (no CPU recomputation)
        assert outputs[name].device == "gpu"
        assert outputs[name].source._op.schema_name == "DalikdMix"


def test_the_check_finds_a_cpu_output_that_feeds_gpu_arithmetic(solid_dataset, monkeypatch):
    # The graph before the fix: composed MixUp's λ was both `images * lam` (copied to the GPU)
    # and a pipeline output.
    monkeypatch.setattr(loaders, "_dali_device_id", lambda device: None)
    from nvidia.dali import fn

    from dalikd import ops

    def graph(plan, seeds, split):
        jpegs, labels = loaders.read(split, shuffle=True, shard_id=0, num_shards=1)
        images = loaders.random_resized_crop(jpegs, plan, seeds)
        mixed, lam, perm = ops.mixup(images, native=False, seeds=seeds)
        return {"images": mixed, "labels": labels, "lam_0": lam, "perm_0": perm,
                "coin": fn.random.coin_flip()}  # fmt: skip

    data = DataConfig(path=str(solid_dataset), image_size=S, batch_size=4, threads=1)
    pipe, names = loaders.build_pipeline(
        graph, resolve_plan(data, device="gpu"), seed=0, split=scan_dataset(solid_dataset).train
    )
    pipe._build_graph()
    outputs = dict(zip(names, pipe._graph_outputs, strict=True))
    assert pinned_outputs(outputs, pipe) == ["lam_0"]


@pytest.mark.parametrize("graph", ["val", "read", "decode", "resize"])
def test_the_validation_and_profile_graphs_have_a_gpu_backend_for_every_operator(
    solid_dataset, monkeypatch, graph
):
    from dalikd.profile import stages

    monkeypatch.setattr(loaders, "_dali_device_id", lambda device: None)
    data = DataConfig(path=str(solid_dataset), image_size=S, batch_size=4, threads=1)
    split = scan_dataset(solid_dataset)
    plan = resolve_plan(data, device="gpu")
    if graph == "val":
        kw = dict(split=split.val, shard_id=0, num_shards=1)
        pipe, _ = loaders.build_pipeline(loaders.val_graph, plan, seed=0, **kw)
    else:
        fn = getattr(stages, f"{graph}_graph")
        pipe, _ = loaders.build_pipeline(fn, plan, seed=0, split=split.train)
    pipe._build_graph()
    assert unregistered_ops(pipe) == []


def test_the_backend_check_finds_a_cpu_only_operator_placed_on_the_gpu(monkeypatch):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def graph():  # batch_permutation has a CPU backend only; DALI traces this without a word
        return fn.batch_permutation(device="gpu"), fn.random.coin_flip()

    pipe = graph()
    pipe._build_graph()
    assert unregistered_ops(pipe) == ["BatchPermutation (gpu)"]


def test_the_mixed_decoder_gets_the_throughput_settings_only_on_gpu(solid_dataset, monkeypatch):
    outputs, pipe = traced_gpu_train_graph(monkeypatch, solid_dataset, "none", "sample", False)
    decoder = next(op for op in pipe._ops if op._op.schema_name.startswith("decoders__"))
    data = DataConfig()
    for name in ("hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint",
                 "device_memory_padding", "host_memory_padding"):  # fmt: skip
        assert decoder._op._init_args[name] == getattr(data, name), name
    assert loaders.decoder_args(data, "gpu")["device"] == "mixed"
    assert loaders.decoder_args(data, "cpu") == {"device": "cpu"}

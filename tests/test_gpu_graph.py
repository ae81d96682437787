"""The GPU graphs, traced on CPU (DALI defines a GPU graph with device_id=None; only build()
needs a GPU), checked for what would fail only on the GPU:

- no pipeline output may be a CPU buffer that DALI's executor allocates in pinned host memory:
  DALI exports it over DLPack as kDLCUDAHost, and torch's from_dlpack rejects that device type
  (DALI_NOTES.md, GPU facts). :func:`pinned_outputs` applies DALI 2.4's own rule;
- every operator has a backend for the device it was placed on. DALI's Python layer does not
  check this when it traces a graph; build() does, and only on a GPU ("not registered for GPU").

Checked for every built-in recipe x both mixing paths x both granularities, the validation and
profile graphs, and the "mixed" decoder's settings.
"""

from __future__ import annotations

import dataclasses

import pytest

from dalikd import loaders, native
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.plan import resolve_plan
from dalikd.recipes import builtin_recipes

S = 16  # px


def traced_gpu_train_graph(
    monkeypatch, root, aug: str, granularity: str, native_path: bool, preallocate: bool = False
):
    """The pipeline train_loader(device="gpu") would build, traced but not built: the DALI
    device id is None (no GPU here). Returns ``{name: output node}`` and the pipeline.
    ``preallocate``: the training loader's decoder (its plan's ``preallocate``, set by
    recovery.TrainData)."""
    monkeypatch.setattr(loaders, "_dali_device_id", lambda device: None)
    data = DataConfig(path=str(root), image_size=S, batch_size=4, threads=1,
                      mixing="native" if native_path else "composed")  # fmt: skip
    plan = resolve_plan(data, aug, device="gpu", granularity=granularity)
    plan = dataclasses.replace(plan, preallocate=preallocate)
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


# CPU operators whose outputs share their inputs' buffers: the DALI 2.4 schemas that declare
# PassThrough({{0, 0}}) (Reshape, Reinterpret, ExpandDims, Squeeze, PerFrame, SubscriptDimCheck)
# or SamplewisePassThrough (the conditionals' Split and Merge: any regular input to any output).
PASS_THROUGH_FIRST = {"Reshape", "Reinterpret", "ExpandDims", "Squeeze", "PerFrame",
                      "SubscriptDimCheck"}  # fmt: skip
PASS_THROUGH_ANY = {"_conditional__Split", "_conditional__Merge"}


def _regular_inputs(op) -> list:
    """An operator's regular inputs: DALI lists them first, then its argument inputs."""
    assert len(op.inputs) == op.spec.NumInput()
    return list(op.inputs[: op.spec.NumRegularInput()])


def _pass_through_inputs(op) -> list:
    """The regular inputs whose buffers a CPU operator's outputs share."""
    name = getattr(op._op, "schema_name", "")
    if op._op.device != "cpu" or name not in PASS_THROUGH_FIRST | PASS_THROUGH_ANY:
        return []
    regular = _regular_inputs(op)
    return regular[:1] if name in PASS_THROUGH_FIRST else regular


def pinned_outputs(outputs: dict, pipe) -> list[str]:
    """Names of the CPU outputs whose buffers DALI 2.4's executor allocates in pinned host
    memory, by its own rule (exec2's ``ExecGraph::Analyzer::FindPinnedBuffers``, DALI's
    default executor): in a graph with any GPU data, every CPU buffer that an operator on a
    non-CPU device ("gpu", or "mixed": a decoder, or the copy that a ``.gpu()`` node is) takes
    through a *regular* input is pinned (argument inputs are not); and, from the outputs
    back to the inputs, a CPU pass-through operator's input whose output is pinned. An output
    is exported pinned when its buffer is: its own, or one it shares through pass-through
    operators."""
    ops = list(pipe._ops)
    if all(op._op.device == "cpu" for op in ops) and all(
        n.device == "cpu" for n in outputs.values()
    ):
        return []  # DALI pins nothing without GPU data

    def key(node) -> tuple[int, int]:
        return id(node.source), node.index

    def on_cpu(node) -> bool:  # produced on the CPU (a .gpu() copy of it included)
        return node.source._op.device == "cpu"

    pinned = {key(n) for op in ops if op._op.device != "cpu" for n in _regular_inputs(op)
              if on_cpu(n)}  # fmt: skip
    pinned |= {key(n) for n in outputs.values() if n.device == "gpu" and on_cpu(n)}
    changed = True
    while changed:  # backwards through pass-through operators, to a fixed point
        changed = False
        for op in ops:
            if any((id(op), j) in pinned for j in range(len(op.outputs))):
                for n in _pass_through_inputs(op):
                    if on_cpu(n) and key(n) not in pinned:
                        pinned.add(key(n))
                        changed = True

    def shares_pinned(node) -> bool:
        return key(node) in pinned or any(
            shares_pinned(n) for n in _pass_through_inputs(node.source)
        )

    return [name for name, node in outputs.items() if node.device == "cpu" and shares_pinned(node)]


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
        jpegs, labels, _ = loaders.read(split, shuffle=True, shard_id=0, num_shards=1)
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


def traced(graph):
    """``({name: output node}, pipeline)`` of a graph function returning a dict, traced on CPU
    as a GPU graph would be (device_id None)."""
    from nvidia.dali import pipeline_def

    names: list[str] = []

    def graph_fn():
        outputs = graph()
        names.extend(outputs)
        return tuple(outputs.values())

    pipe = pipeline_def(graph_fn, batch_size=2, num_threads=1, device_id=None,
                        enable_conditionals=True)()  # fmt: skip
    pipe._build_graph()
    return dict(zip(names, pipe._graph_outputs, strict=True)), pipe


def _images():
    import numpy as np
    from nvidia.dali import fn

    x = [np.zeros((8, 8, 3), np.uint8)] * 2
    return fn.external_source(source=lambda: x, batch=True, layout="HWC").gpu()


def test_the_check_follows_dalis_rule_regular_inputs_of_gpu_operators_are_pinned():
    # fn.slice on the GPU takes its anchor and shape as regular CPU inputs: DALI pins them,
    # and a narrower rule (only CPU nodes copied by .gpu()) misses it. An argument input of a
    # GPU operator (rotate's angle) is not pinned.
    from nvidia.dali import fn

    def graph():
        anchor = fn.random.uniform(range=[0, 2], shape=[2])
        angle = fn.random.uniform(range=[-10, 10])
        crop = fn.slice(_images(), anchor, [4, 4], axes=[0, 1])
        return {"crop": crop, "anchor": anchor, "angle": angle,
                "rotated": fn.rotate(crop, angle=angle)}  # fmt: skip

    outputs, pipe = traced(graph)
    assert pinned_outputs(outputs, pipe) == ["anchor"]


def test_the_check_follows_pass_through_operators_both_ways():
    # lam -> reshape -> GPU arithmetic: DALI pins the reshape's buffer and, backwards through
    # the pass-through, lam's; an output that shares a pinned buffer through one (a squeeze of
    # lam) is exported pinned as well. A cast copies: its output is not pinned.
    from nvidia.dali import fn, types

    def graph():
        lam = fn.random.uniform(range=[0, 1], shape=[1])
        mixed = _images() * fn.reshape(lam, shape=[1, 1, 1])
        return {"images": mixed, "lam": lam, "lam_squeezed": fn.squeeze(lam, axes=[0]),
                "lam_copy": fn.cast(lam, dtype=types.FLOAT16)}  # fmt: skip

    outputs, pipe = traced(graph)
    assert pinned_outputs(outputs, pipe) == ["lam", "lam_squeezed"]


def test_the_check_follows_the_conditionals_samplewise_pass_through():
    # `if` in a graph: lam reaches the GPU through the conditionals' Split and Merge, which
    # pass samples through; DALI pins lam's buffer
    outputs, pipe = traced(_conditional_graph)
    assert pinned_outputs(outputs, pipe) == ["lam"]


def _conditional_graph():
    from nvidia.dali import fn

    lam = fn.random.uniform(range=[0, 1], shape=[1])
    if fn.random.coin_flip():  # noqa: SIM108 (a DALI conditional: Split, then Merge)
        picked = lam
    else:
        picked = lam * 0.5
    return {"images": _images() * picked, "lam": lam}


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


PREALLOCATION = ("preallocate_width_hint", "preallocate_height_hint", "device_memory_padding",
                 "host_memory_padding")  # fmt: skip


def decoder_of(pipe):
    return next(op for op in pipe._ops if op._op.schema_name.startswith("decoders__"))


def test_the_mixed_decoder_gets_the_throughput_settings_only_on_gpu(solid_dataset, monkeypatch):
    outputs, pipe = traced_gpu_train_graph(
        monkeypatch, solid_dataset, "none", "sample", False, preallocate=True
    )
    decoder = decoder_of(pipe)
    data = DataConfig()
    for name in ("hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint",
                 "device_memory_padding", "host_memory_padding"):  # fmt: skip
        assert decoder._op._init_args[name] == getattr(data, name), name
    assert loaders.decoder_args(data, "gpu")["device"] == "mixed"
    assert loaders.decoder_args(data, "cpu") == {"device": "cpu"}
    assert loaders.decoder_args(data, "cpu", preallocate=True) == {"device": "cpu"}


@pytest.mark.parametrize("graph", ["train", "val", "decode", "recovery"])
def test_tooling_decoders_keep_the_engine_share_but_preallocate_nothing(
    solid_dataset, monkeypatch, graph
):
    # Only training's loader preallocates: validation, the profile's stages, recovery's
    # re-decode and gpu_check's loaders run with DALI's defaults (docs/training.md).
    from nvidia.dali import fn as dali_fn

    from dalikd import recovery
    from dalikd.profile import stages

    monkeypatch.setattr(loaders, "_dali_device_id", lambda device: None)
    data = DataConfig(path=str(solid_dataset), image_size=S, batch_size=4, threads=1)
    plan = resolve_plan(data, device="gpu")
    split = scan_dataset(solid_dataset)
    if graph == "train":
        _, pipe = traced_gpu_train_graph(monkeypatch, solid_dataset, "cutmix", "sample", False)
    elif graph == "val":
        kw = dict(split=split.val, shard_id=0, num_shards=1)
        pipe, _ = loaders.build_pipeline(loaders.val_graph, plan, seed=0, **kw)
    elif graph == "decode":
        pipe, _ = loaders.build_pipeline(stages.decode_graph, plan, seed=0, split=split.train)
    else:  # recovery's re-decode: record the decoder's arguments where it builds its graph
        seen = []
        real = dali_fn.decoders.image

        def recording(*args, **kw):
            seen.append(kw)
            return real(*args, **kw)

        monkeypatch.setattr(dali_fn.decoders, "image", recording)
        recovery.first_failure(list(split.train.files[:2]), plan)
        assert seen and seen[0]["device"] == "mixed"
        assert not set(PREALLOCATION) & set(seen[0])
        return
    pipe._build_graph()
    args = decoder_of(pipe)._op._init_args
    assert decoder_of(pipe)._op.device == "mixed"
    assert args["hw_decoder_load"] == data.hw_decoder_load
    assert not set(PREALLOCATION) & set(args), sorted(set(PREALLOCATION) & set(args))


def test_only_the_training_loader_asks_for_the_preallocation(solid_dataset, monkeypatch, tmp_path):
    from dalikd import recovery

    asked = []

    def recording(*args, **kw):
        asked.append(args[1].preallocate)  # train_loader(split, plan, ...)
        raise RuntimeError("recorded")

    monkeypatch.setattr(loaders, "train_loader", recording)
    data = DataConfig(path=str(solid_dataset), image_size=S, batch_size=2, threads=1)
    with pytest.raises(RuntimeError, match="recorded"):
        source = recovery.FileSource(scan_dataset(solid_dataset).train)
        next(iter(recovery.TrainData(source, resolve_plan(data, device="cpu"), epoch=0)))
    assert asked == [True]

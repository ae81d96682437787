"""Issue 21's data setting on the data plan: pad_crop + flip as x, validation without a transform,
the data's normalization, and the raw ``.hwc`` folders `dalikd data import` writes (scanned by
size, reshaped in the graph), on CPU, and the same graphs traced for the GPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fake_archives import make_cifar100
from test_gpu_graph import pinned_outputs, unregistered_ops

from dalikd import loaders
from dalikd.batch import IMAGENET_NORM, InputNorm, data_norm
from dalikd.config import DataConfig, build_config
from dalikd.data import class_names, scan_dataset
from dalikd.dataimport import import_dataset
from dalikd.errors import DalikdError
from dalikd.manifest import RAW_EXTENSION, manifest_path, read_manifest
from dalikd.plan import resolve_plan
from dalikd.recipes import builtin_recipes
from dalikd.settings import command_config, dataset_defaults

CIFAR_MEAN = (129.3105, 124.1085, 112.404)  # the reference's CIFAR-100 mean x 255
CIFAR_STD = (68.2125, 65.4075, 70.4055)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    """An imported CIFAR-100-layout folder: 4 classes, 8 train and 3 val images each."""
    tmp = tmp_path_factory.mktemp("cifar")
    archive, _ = make_cifar100(tmp / "c.tar.gz", train_per_class=8, test_per_class=3)
    import_dataset("cifar100", archive, tmp / "out")
    return tmp / "out"


def stored(path: str) -> np.ndarray:
    return np.fromfile(path, np.uint8).reshape(32, 32, 3)


def plan_for(root: Path, aug="none", device="cpu", granularity="sample", **data):
    cfg = command_config(overrides={"data.path": str(root), "data.threads": 1,
                                    **{f"data.{k}": v for k, v in data.items()}})  # fmt: skip
    norm = data_norm(cfg.data.mean, cfg.data.std)
    return resolve_plan(cfg.data, aug, device=device, granularity=granularity, norm=norm,
                        raw_shape=scan_dataset(root).raw_shape)  # fmt: skip


def pad_crop_views(image: np.ndarray, pad: int, size: int):
    """Every window of RandomCrop(size, padding=pad) of ``image``, and its mirror."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy : dy + size, dx : dx + size]
            yield (dy, dx, False), window
            yield (dy, dx, True), window[:, ::-1]


# -- the scan -----------------------------------------------------------------------------------


def test_an_imported_folder_lists_its_raw_files_in_the_manifests_class_order(cifar):
    ds = scan_dataset(cifar)
    manifest = read_manifest(cifar)
    assert ds.classes == manifest.classes == class_names(cifar)
    assert ds.raw_shape == (32, 32, 3)
    assert len(ds.train) == 32 and len(ds.val) == 12 and ds.skipped == ()
    assert all(f.endswith(RAW_EXTENSION) for f in ds.train.files + ds.val.files)
    for path, label in zip(ds.train.files, ds.train.labels, strict=True):
        assert Path(path).parent.name == ds.classes[label]


def test_class_folders_out_of_label_order_keep_the_manifests_labels(tmp_path):
    # an edited meta file: class names that do not sort into label order become NNN_name
    # folders; label k must still be class k of the manifest
    classes = ("zebra", "apple", "mango")
    archive, source = make_cifar100(tmp_path / "c.tar.gz", classes=classes, train_per_class=2)
    import_dataset("cifar100", archive, tmp_path / "out")
    ds = scan_dataset(tmp_path / "out")
    assert ds.classes == classes
    pixels, labels = source["train"]
    for path, label in zip(ds.train.files, ds.train.labels, strict=True):
        row = int(Path(path).stem)
        assert label == labels[row] and np.array_equal(stored(path), pixels[row])
        assert Path(path).parent.name.endswith(classes[label])


def test_a_raw_file_of_the_wrong_size_is_left_out_with_its_reason(tmp_path):
    archive, _ = make_cifar100(tmp_path / "c.tar.gz", train_per_class=2)
    root = tmp_path / "out"
    import_dataset("cifar100", archive, root)
    files = sorted((root / "train").rglob(f"*{RAW_EXTENSION}"))
    files[0].write_bytes(files[0].read_bytes()[:1000])  # truncated
    files[1].write_bytes(b"")  # empty
    (files[2].parent / "extra.png").write_bytes(b"\x89PNG")  # not a raw image: by extension
    ds = scan_dataset(root)
    reasons = dict(ds.skipped)
    assert reasons[str(files[0])].startswith("raw image of 1,000 bytes")
    assert "32x32x3 = 3,072 bytes" in reasons[str(files[0])]
    assert reasons[str(files[1])] == "empty file"
    assert reasons[str(files[2].parent / "extra.png")] == "not an image (file extension)"
    assert len(ds.train) == 8 - 2


# -- the settings: the dataset's own, under a config and flags ----------------------------------


def test_the_datasets_own_settings_sit_between_the_defaults_and_a_config(cifar, tmp_path):
    assert dataset_defaults(cifar)["base_view"] == "pad_crop"
    d = command_config(overrides={"data.path": str(cifar)}).data
    assert (d.image_size, d.base_view, d.pad, d.val_transform) == (32, "pad_crop", 4, "none")
    assert (d.mean, d.std) == (CIFAR_MEAN, CIFAR_STD)
    assert d.batch_size == DataConfig().batch_size  # not a dataset setting: the default
    file_values = {"data": {"path": str(cifar), "pad": 2, "image_size": 40}}
    d = command_config(file_values, {"data.image_size": 36}).data
    assert (d.pad, d.image_size, d.base_view) == (2, 36, "pad_crop")  # config < flag
    plain = command_config(overrides={"data.path": str(tmp_path)}).data  # no dataset.json
    assert plain == replace(DataConfig(), path=str(tmp_path))


def test_a_datasets_unknown_setting_is_one_line_naming_its_file(tmp_path):
    archive, _ = make_cifar100(tmp_path / "c.tar.gz", train_per_class=1)
    import_dataset("cifar100", archive, tmp_path / "out")
    path = manifest_path(tmp_path / "out")
    raw = json.loads(path.read_text())
    raw["data_defaults"]["fancy"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(DalikdError, match=r"dataset.json: data_defaults: unknown config key"):
        command_config(overrides={"data.path": str(tmp_path / "out")})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}, "on the 0-255 scale"),
        ({"mean": (1.0, 2.0, 3.0), "std": ()}, "3 values each"),
        ({"mean": (1.0, 2.0, 3.0), "std": (1.0, 0.0, 1.0)}, "data.std must be positive"),
        ({"pad": -1}, "data.pad must be in"),
        ({"base_view": "zoom"}, "'data.base_view' must be one of random_resized_crop, pad_crop"),
    ],
)
def test_view_settings_out_of_range_are_one_line(data, message):
    with pytest.raises(DalikdError, match=message):
        build_config({"data": data})


def test_images_used_as_stored_must_be_the_image_size(cifar):
    with pytest.raises(DalikdError, match="images are 32x32 px .* --image-size is 64"):
        plan_for(cifar, image_size=64)
    plan_for(cifar, image_size=64, val_transform="center_crop")  # resized: any size


# -- the graphs on CPU ---------------------------------------------------------------------------


def test_pad_crop_is_the_references_random_crop_and_flip(cifar):
    plan = plan_for(cifar, batch_size=8)
    ds = scan_dataset(cifar)
    seen = set()
    for batch in loaders.train_loader(ds.train, plan, indexed=True):
        for x, i in zip(batch.images.numpy(), batch.index.tolist(), strict=True):
            found = [how for how, view in pad_crop_views(stored(ds.train.files[i]), 4, 32)
                     if np.array_equal(view, x)]  # fmt: skip
            assert found, f"x of {ds.train.files[i]} is no pad-4 crop (+ flip) of it"
            seen.add(found[0])
    assert len(seen) > 4  # the offsets and coins vary


def test_validation_without_a_transform_gives_the_stored_images(cifar):
    plan = plan_for(cifar, batch_size=5)
    ds = scan_dataset(cifar)
    images = np.concatenate([b.images.numpy() for b in loaders.val_loader(ds.val, plan)])
    labels = [lab for b in loaders.val_loader(ds.val, plan) for lab in b.labels.tolist()]
    assert labels == list(ds.val.labels)
    assert np.array_equal(images, np.stack([stored(f) for f in ds.val.files]))


@pytest.mark.parametrize("view", ["center_crop", "random_resized_crop"])
def test_raw_images_resize_where_the_settings_ask(cifar, view):
    settings = {"val_transform": "center_crop", "image_size": 24, "batch_size": 4}
    if view == "random_resized_crop":
        settings["base_view"] = view
    plan = plan_for(cifar, "flip", **settings)
    ds = scan_dataset(cifar)
    batch = next(iter(loaders.train_loader(ds.train, plan)))
    assert tuple(batch.images.shape) == tuple(batch.aug_images.shape) == (4, 24, 24, 3)
    val = next(iter(loaders.val_loader(ds.val, plan)))
    assert tuple(val.images.shape) == (4, 24, 24, 3)


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("aug", sorted(builtin_recipes()))
def test_every_recipe_runs_on_top_of_pad_crop(cifar, aug, granularity):
    plan = plan_for(cifar, aug, batch_size=8, granularity=granularity)
    ds = scan_dataset(cifar)
    batch = next(iter(loaders.train_loader(ds.train, plan)))
    assert tuple(batch.images.shape) == (8, 32, 32, 3)
    if aug == "none":
        assert batch.aug_images is None
        return
    assert batch.aug_images.dtype == batch.images.dtype
    assert tuple(batch.aug_images.shape) == (8 * plan.pool_size, 32, 32, 3)
    assert (batch.lam is None) == (aug not in ("mixup", "cutmix", "cutmixpick"))


def test_cutouts_fill_is_the_datas_mean_the_students_normalization(cifar):
    plan = plan_for(cifar, "cutout", batch_size=8)
    assert plan.norm == InputNorm(CIFAR_MEAN, CIFAR_STD)
    fill = np.round(CIFAR_MEAN).astype(np.uint8)
    batch = next(iter(loaders.train_loader(scan_dataset(cifar).train, plan)))
    for x, xa in zip(batch.images.numpy(), batch.aug_images.numpy(), strict=True):
        changed = np.argwhere((x != xa).any(axis=-1))
        assert (xa[tuple(changed.T)] == fill).all()
        if len(changed):  # one hole of side 8 (32 / 4), clipped at the borders
            assert (changed.max(axis=0) - changed.min(axis=0) < 8).all()


def test_two_shards_read_every_raw_image_once(cifar):
    plan = plan_for(cifar, batch_size=4)
    ds = scan_dataset(cifar)
    seen = []
    for shard in range(2):
        loader = loaders.train_loader(ds.train, plan, shard_id=shard, num_shards=2, indexed=True)
        seen += [i for b in loader for i in b.index.tolist()]
    assert sorted(seen) == list(range(len(ds.train)))


def test_a_raw_file_that_changes_after_the_scan_is_recovered_in_training(tmp_path):
    from dalikd import recovery

    archive, _ = make_cifar100(tmp_path / "c.tar.gz", train_per_class=4)
    root = tmp_path / "out"
    import_dataset("cifar100", archive, root)
    ds = scan_dataset(root)
    bad = ds.train.files[5]
    Path(bad).write_bytes(b"\0" * 100)  # replaced after the scan: the reshape fails on it

    found: dict[str, str] = {}
    source = recovery.source_of(ds.train)
    data = recovery.TrainData(source, plan_for(root, batch_size=4), epoch=0,
                              on_failure=lambda named, where: found.update(named))  # fmt: skip
    steps = sum(1 for _ in data)
    assert steps == 4 and list(found) == [bad] and found[bad]  # named, with DALI's reason


# -- the normalization: the student's, a teacher's own, the bridge ------------------------------


def test_the_student_gets_the_datas_normalization_a_teacher_its_own(tiny_env):
    import torch
    from tiny_models import tiny_cnn

    from dalikd.models import AdaptInput, adapt_input, build_model, input_norm, student_norm

    cifar_norm = InputNorm(CIFAR_MEAN, CIFAR_STD)
    zoo, torchvision_like = build_model("cifar:resnet8", 10), tiny_cnn(10)
    assert student_norm(zoo, cifar_norm) == student_norm(torchvision_like, cifar_norm) == cifar_norm
    assert student_norm(zoo, None) == student_norm(torchvision_like, None) == IMAGENET_NORM
    assert input_norm(zoo, cifar_norm) == cifar_norm  # a teacher without its own: the data's
    assert input_norm(torchvision_like, cifar_norm) == IMAGENET_NORM  # pretrained: its own
    assert adapt_input(zoo, cifar_norm, cifar_norm) is zoo  # nothing to bridge
    bridged = adapt_input(torchvision_like.eval(), cifar_norm, cifar_norm)
    assert isinstance(bridged, AdaptInput)
    u = torch.randint(0, 256, (2, 3, 8, 8)).float()
    mean, std = (torch.tensor(n).view(1, 3, 1, 1) for n in cifar_norm)
    own_mean, own_std = (torch.tensor(n).view(1, 3, 1, 1) for n in IMAGENET_NORM)
    want = torchvision_like((u - own_mean) / own_std)
    torch.testing.assert_close(bridged((u - mean) / std), want, rtol=1e-4, atol=1e-5)


# -- the GPU graphs, traced on CPU (tests/test_gpu_graph.py's checks) ---------------------------


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("aug", sorted(builtin_recipes()))
def test_the_gpu_graph_of_every_recipe_on_raw_pad_crop(cifar, monkeypatch, aug, granularity):
    monkeypatch.setattr(loaders, "_dali_device_id", lambda device: None)
    plan = plan_for(cifar, aug, "gpu", granularity, batch_size=4, mixing="composed")
    plan = replace(plan, preallocate=True)
    pipe, names = loaders.build_pipeline(loaders.train_graph, plan, seed=0,
                                         split=scan_dataset(cifar).train, shard_id=0,
                                         num_shards=1)  # fmt: skip
    pipe._build_graph()
    outputs = dict(zip(names, pipe._graph_outputs, strict=True))
    assert outputs["images"].device == "gpu"
    assert pinned_outputs(outputs, pipe) == []
    assert unregistered_ops(pipe) == []
    schemas = {op._op.schema_name for op in pipe._ops}
    assert "Reshape" in schemas and not any(s.startswith("decoders") for s in schemas)


@pytest.mark.parametrize("transform", ["none", "center_crop"])
def test_the_gpu_validation_graph_of_raw_images(cifar, monkeypatch, transform):
    from dalikd.profile import stages

    monkeypatch.setattr(loaders, "_dali_device_id", lambda device: None)
    plan = plan_for(cifar, device="gpu", batch_size=4, val_transform=transform)
    split = scan_dataset(cifar)
    for graph, kw in ((loaders.val_graph, dict(split=split.val, shard_id=0, num_shards=1)),
                      (stages.pixels_graph, dict(split=split.train))):  # fmt: skip
        pipe, names = loaders.build_pipeline(graph, plan, seed=0, **kw)
        pipe._build_graph()
        outputs = dict(zip(names, pipe._graph_outputs, strict=True))
        assert outputs["images"].device == "gpu"
        assert pinned_outputs(outputs, pipe) == [] and unregistered_ops(pipe) == []


def test_train_flags_set_the_view_over_the_datasets_own(cifar):
    from dalikd.cli.main import cli, flags_of, overrides_from

    args = ["--data", str(cifar), "--base-view", "random_resized_crop", "--pad", "2",
            "--val-transform", "center_crop", "--image-size", "24"]  # fmt: skip
    params = cli.commands["train"].make_context("train", args).params
    own = ("config_file", "resume_dir", "epochs_factor")  # the command's, not config keys
    overrides = overrides_from({k: v for k, v in params.items() if k not in own})
    d = command_config(None, overrides, flags=flags_of(overrides)).data
    assert (d.base_view, d.pad, d.val_transform, d.image_size) == (
        "random_resized_crop", 2, "center_crop", 24,
    )  # fmt: skip
    assert d.mean == CIFAR_MEAN  # not given: the dataset's own
    with pytest.raises(DalikdError, match="--pad must be in"):
        command_config(None, {**overrides, "data.pad": -1}, flags=flags_of(overrides))

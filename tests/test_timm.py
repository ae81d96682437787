"""timm models by name (`timm:NAME`), each with its own input normalization; tiny timm test
models with random weights, nothing downloaded."""

import json
import sys

import pytest
import torch
from tests_helpers import run_cli
from tiny_models import tiny_cnn

from dalikd.batch import IMAGENET_NORM, Batch, InputNorm, normalize
from dalikd.config import build_config
from dalikd.data import scan_dataset
from dalikd.errors import DalikdError
from dalikd.models import AdaptInput, adapt_input, build_model, classifier_size, input_norm
from dalikd.step import Distiller, make_optimizer

timm = pytest.importorskip("timm")  # the optional extra: pip install 'dalikd[timm]'

HALF = InputNorm((127.5,) * 3, (127.5,) * 3)  # timm's test_resnet: mean = std = 0.5


def test_timm_name_builds_with_the_dataset_classes_and_its_own_normalization():
    model = build_model("timm:test_resnet", 3)
    assert classifier_size(model)[1] == 3
    assert model.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    assert input_norm(model) == HALF
    assert input_norm(build_model("timm:test_efficientnet", 3)) == IMAGENET_NORM
    assert input_norm(tiny_cnn(3)) == IMAGENET_NORM  # not timm: torchvision's ImageNet mean/std
    wrapper = torch.nn.Module()  # what DDP looks like: the model as .module
    wrapper.module = model
    assert input_norm(wrapper) == HALF


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(DalikdError, match="unknown timm model 'test_resnt'; did you mean "):
        build_model("timm:test_resnt", 3)


def test_without_timm_the_error_is_one_line(monkeypatch, solid_dataset, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(DalikdError, match=r"pip install 'dalikd\[timm\]'"):
        build_model("timm:test_resnet", 3)
    code, _, err = run_cli(["train", "--data", solid_dataset, "--student", "timm:test_resnet",
                            "--out", tmp_path / "r", "--device", "cpu"], capsys)  # fmt: skip
    assert code == 1
    assert err.strip() == "error: timm: models need timm: pip install 'dalikd[timm]'"


def test_a_tag_means_pretrained_weights(monkeypatch):
    # a teacher needs the dataset's classes: refused from the local pretrained config, before
    # any download
    with pytest.raises(DalikdError, match="resnet10t.c3_in1k predicts 1000 classes but the "):
        build_model("timm:resnet10t.c3_in1k", 3, role="teacher")
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append((a, k)) or tiny_cnn(3))
    build_model("timm:resnet10t.c3_in1k", 3, role="student")  # new classifier: fine-tuning
    build_model("timm:resnet10t", 3)
    assert calls == [(("resnet10t.c3_in1k",), {"pretrained": True, "num_classes": 3}),
                     (("resnet10t",), {"pretrained": False, "num_classes": 3})]  # fmt: skip
    # a tagged teacher needs no --teacher-weights; an untagged one does
    build_config(overrides={"model.teacher": "timm:resnet10t.c3_in1k"})
    with pytest.raises(DalikdError, match="--teacher needs --teacher-weights"):
        build_config(overrides={"model.teacher": "timm:resnet10t"})


def test_adapt_input_maps_one_normalization_to_another():
    images = torch.randint(0, 256, (4, 6, 5, 3), dtype=torch.uint8)
    seen = []
    model = torch.nn.Identity()
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    adapted = adapt_input(model, IMAGENET_NORM)
    assert isinstance(adapted, AdaptInput) and input_norm(adapted) == IMAGENET_NORM
    adapted(normalize(images))
    torch.testing.assert_close(seen[0], normalize(images, norm=HALF), rtol=0, atol=2e-6)
    assert adapt_input(model, HALF) is model  # its own normalization: nothing to adapt


def test_timm_teacher_and_torchvision_student_each_see_their_own_inputs(solid_dataset, tiny_env):
    """One training step: the student gets ImageNet-normalized x and x', the timm teacher
    (mean = std = 0.5) the same uint8 images normalized its own way."""
    teacher_file = solid_dataset.parent / "timm_teacher.pt"
    torch.save(build_model("timm:test_resnet", 3).state_dict(), teacher_file)
    cfg = build_config(overrides={
        "model.student": "tiny_models:tiny_cnn", "model.teacher": "timm:test_resnet",
        "model.teacher_weights": str(teacher_file), "kd.aug": "flip", "device": "cpu",
    })  # fmt: skip
    models = Distiller.build(cfg.model, cfg.kd, scan_dataset(solid_dataset).num_classes, "cpu")
    teacher = models.teacher.module()  # the network behind the live teacher source
    assert isinstance(teacher, AdaptInput) and not teacher.model.training
    seen = {"student": [], "teacher": []}
    models.student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0]))
    teacher.model.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0]))
    gen = torch.Generator().manual_seed(0)
    x, x_aug = (torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=gen)
                for _ in range(2))  # fmt: skip
    batch = Batch(x, torch.tensor([0, 1, 2, 0]), aug_images=x_aug)
    optimizer = make_optimizer(models.student, cfg.optim)
    scaler = torch.amp.GradScaler(enabled=False)
    models.train().step(batch, optimizer, scaler)
    assert [t.shape[0] for t in seen["student"]] == [4, 4] and len(seen["teacher"]) == 1
    assert torch.equal(seen["student"][0], normalize(x))
    assert torch.equal(seen["student"][1], normalize(x_aug))
    own = normalize(torch.cat([x, x_aug]), norm=HALF)
    torch.testing.assert_close(seen["teacher"][0], own, rtol=0, atol=2e-6)


def test_train_end_to_end_with_timm_models(solid_dataset, tmp_path, tiny_env, capsys):
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("timm:test_resnet", 3).state_dict(), teacher)
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["train", "--data", solid_dataset, "--student", "timm:test_efficientnet",
         "--teacher", "timm:test_resnet", "--teacher-weights", teacher, "--epochs", 1,
         "--out", run, "--eval-teacher", "--image-size", 16, "--batch-size", 4, "--threads", 1,
         "--device", "cpu"], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "teacher timm:test_resnet: val top-1" in out
    [record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= record["val_agree_top1"] <= 100 and record["val_kl_ts"] >= 0
    student = build_model("timm:test_efficientnet", 3, str(run / "best.pt"))  # reloads
    assert classifier_size(student)[1] == 3

"""The CIFAR zoo (cifar:NAME) against the reference's models, measured once into
tests/fixtures/cifar_zoo.json (its "about" says how): parameter counts, state_dict keys and
shapes, and logits on fixed weights, so that a CRD checkpoint loads and computes the same."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_dataset
from tests_helpers import run_cli

from dalikd import cifar_models
from dalikd.batch import IMAGENET_NORM, InputNorm
from dalikd.errors import DalikdError
from dalikd.models import (
    AdaptInput,
    adapt_input,
    build_model,
    check_classes,
    checkpoint_classes,
    classifier_size,
    input_norm,
    own_norm,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "cifar_zoo.json").read_text())
REFERENCE = FIXTURE["models"]
CIFAR100_NORM = InputNorm((129.3, 124.1, 112.4), (68.2, 65.4, 70.4))  # CIFAR-100's, in 0-255


def fill_(model: torch.nn.Module) -> torch.nn.Module:
    """Fixed weights, as the fixture's logits were made: a sine wave over each state_dict
    tensor (repeating every 997 values), its phase the tensor's index; positive running
    variances; BN scales near 1."""
    with torch.no_grad():
        for i, (key, t) in enumerate(model.state_dict().items()):
            if not t.is_floating_point():
                t.zero_()
                continue
            period = torch.sin(torch.arange(997, dtype=torch.float64) * 0.7 + i).float()
            wave = period.repeat(t.numel() // 997 + 1)[: t.numel()].view(t.shape)
            if key.endswith("running_var"):
                t.copy_(1 + 0.5 * wave.abs())
            elif t.dim() > 1:
                t.copy_(wave * math.sqrt(3.0 / t[0].numel()))
            elif key.endswith("weight"):
                t.copy_(1 + 0.2 * wave)
            else:
                t.copy_(0.1 * wave)
    return model


def images(size: int) -> torch.Tensor:
    """Two fixed images, a sine ramp over every value (float32 NCHW)."""
    n = 2 * 3 * size * size
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.013).float().view(2, 3, size, size)


def on_meta(name: str, num_classes: int = 100) -> torch.nn.Module:
    with torch.device("meta"):
        return cifar_models.build(name, num_classes)


def key_lines(model: torch.nn.Module) -> list[str]:
    return [f"{k} {','.join(map(str, v.shape))}" for k, v in model.state_dict().items()]


def test_the_zoo_is_the_references_list():
    assert sorted(cifar_models.catalogue()) == sorted(REFERENCE)
    for teacher, student in cifar_models.PAPER_PAIRS:
        assert teacher in REFERENCE and student in REFERENCE


def test_parameter_counts_at_100_classes():
    assert cifar_models.parameter_count("resnet56") == 861_620
    assert cifar_models.parameter_count("cifar:resnet8x4") == 1_233_540
    assert cifar_models.parameter_count("wrn_40_2") == 2_255_156
    for name, ref in REFERENCE.items():
        assert cifar_models.parameter_count(name) == ref["params"], name


def test_state_dict_keys_and_shapes_are_the_references():
    for name, ref in REFERENCE.items():
        lines = key_lines(on_meta(name))
        assert len(lines) == ref["n_keys"], name
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        assert digest == ref["sha256"], f"{name}: keys or shapes differ from the reference's"
    for name, keys in FIXTURE["keys"].items():  # in full where listed: the first difference
        expected = [f"{k} {shape}" for k, shape in keys.items()]
        got = key_lines(on_meta(name))
        pairs = zip(expected, got, strict=False)  # a list that ends early: the length below
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        assert first is None, f"{name}: expected {expected[first]}, found {got[first]}"
        assert len(got) == len(expected), name


@pytest.mark.parametrize("name", list(REFERENCE))
def test_forward_computes_the_references_logits(name):
    """Fixed weights, batch statistics (train mode): the reference's first six logits of two
    images, at 32 px (and 64 px where recorded); 100 finite logits per image."""
    model = on_meta(name).to_empty(device="cpu")
    fill_(model).train()
    for size in (32, 64):
        if f"logits{size}" not in REFERENCE[name]:
            continue
        with torch.no_grad():
            logits = model(images(size))
        assert logits.shape == (2, 100) and torch.isfinite(logits).all()
        expected = torch.tensor(REFERENCE[name][f"logits{size}"])
        torch.testing.assert_close(logits[:, :6], expected, rtol=1e-4, atol=1e-5)


def test_init_follows_the_reference():
    torch.manual_seed(0)
    resnet = cifar_models.build("resnet56", 100)
    assert torch.equal(resnet.bn1.weight, torch.ones(16)) and not resnet.bn1.bias.any()
    w = resnet.layer3[0].conv1.weight  # Kaiming normal, fan out: std sqrt(2 / (9 * 64))
    assert abs(w.std().item() / math.sqrt(2 / (9 * 64)) - 1) < 0.05
    vgg = cifar_models.build("vgg8", 100)
    assert abs(vgg.classifier.weight.std().item() / 0.01 - 1) < 0.05
    assert not vgg.classifier.bias.any() and not vgg.block0[0].bias.any()
    wrn = cifar_models.build("wrn_16_2", 100)
    assert not wrn.fc.bias.any()
    w = wrn.block3.layer[0].conv2.weight  # N(0, 2 / (k·k·out))
    assert abs(w.std().item() / math.sqrt(2 / (9 * 128)) - 1) < 0.05


def test_num_classes_and_the_classifier_check():
    heads = {"resnet20": "fc", "ResNet18": "linear", "wrn_16_1": "fc", "vgg8": "classifier",
             "MobileNetV2": "classifier.0", "ShuffleV1": "linear",
             "ShuffleV2": "linear"}  # fmt: skip
    for name, head in heads.items():
        model = on_meta(name, num_classes=7)
        assert classifier_size(model) == (f"{head}.weight", 7)
    model = build_model("cifar:resnet8", 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _crd_checkpoint(path: Path, name: str, num_classes: int = 100, **save) -> dict:
    """A randomly initialised model saved as the CRD release saves its teachers."""
    model = cifar_models.build(name, num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # stats a loader must not lose
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(72.34),
             "optimizer": optimizer.state_dict()}  # fmt: skip
    torch.save(state, path, **save)
    return model.state_dict()


def test_a_crd_checkpoint_loads_as_it_is(tmp_path):
    saved = _crd_checkpoint(tmp_path / "ckpt_epoch_240.pth", "resnet56")
    model = build_model("cifar:resnet56", 100, str(tmp_path / "ckpt_epoch_240.pth"), "teacher")
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    reference = cifar_models.build("resnet56", 100)
    reference.load_state_dict(saved)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), reference.eval()(x))
    # no class names in it: the class checks have nothing to refuse
    assert checkpoint_classes(tmp_path / "ckpt_epoch_240.pth") is None
    check_classes(checkpoint_classes(tmp_path / "ckpt_epoch_240.pth"), ("a", "b"), "teacher")


def test_old_format_and_dataparallel_checkpoints_load(tmp_path):
    """The CRD teachers were saved by 2019's torch: the pre-zip format (no memory map)."""
    path = tmp_path / "old.pth"
    saved = _crd_checkpoint(path, "wrn_16_1", _use_new_zipfile_serialization=False)
    model = build_model("cifar:wrn_16_1", 100, str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert checkpoint_classes(path) is None
    wrapped = {f"module.{k}": v for k, v in saved.items()}  # nn.DataParallel's keys
    torch.save({"model": wrapped, "epoch": 240}, tmp_path / "dp.pth")
    model = build_model("cifar:wrn_16_1", 100, str(tmp_path / "dp.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    torch.save(saved, tmp_path / "plain.pt")  # a plain state_dict as well
    model = build_model("cifar:wrn_16_1", 100, str(tmp_path / "plain.pt"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    older = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": older}, tmp_path / "torch040.pth")  # BN before torch 0.4.1 had none
    model = build_model("cifar:wrn_16_1", 100, str(tmp_path / "torch040.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in older.items())


def test_a_mismatch_is_one_line_naming_the_first_key(tmp_path):
    _crd_checkpoint(tmp_path / "r20.pth", "resnet20")
    with pytest.raises(DalikdError) as e:
        build_model("cifar:resnet56", 100, str(tmp_path / "r20.pth"), role="teacher")
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        f"teacher weights {tmp_path / 'r20.pth'} do not fit cifar:resnet56: 180 missing keys "
        "(e.g. layer1.3.conv1.weight); the file's keys and shapes are cifar:resnet20's"
    )
    _crd_checkpoint(tmp_path / "r8x4.pth", "resnet8x4")
    with pytest.raises(DalikdError) as e:
        build_model("cifar:resnet8", 100, str(tmp_path / "r8x4.pth"))
    assert str(e.value).endswith(
        "do not fit cifar:resnet8: conv1.weight has shape (32, 3, 3, 3) in the file, "
        "(16, 3, 3, 3) in the model; the file's keys and shapes are cifar:resnet8x4's"
    )
    state = cifar_models.build("vgg8", 100).state_dict()
    state["classifier.extra"] = torch.zeros(1)  # no zoo model's: no hint
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(DalikdError) as e:
        build_model("cifar:vgg8", 100, str(tmp_path / "extra.pth"))
    assert str(e.value).endswith("do not fit cifar:vgg8: 1 unexpected key (e.g. classifier.extra)")
    _crd_checkpoint(tmp_path / "c10.pth", "vgg8", num_classes=10)
    with pytest.raises(DalikdError, match="predict 10 classes but the dataset has 100"):
        build_model("cifar:vgg8", 100, str(tmp_path / "c10.pth"), role="teacher")


def test_eval_reads_a_crd_checkpoint_and_names_the_model_it_fits(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", classes=("a", "b"), n_train=1, n_val=2)
    path = tmp_path / "ckpt_epoch_240.pth"
    _crd_checkpoint(path, "resnet8", num_classes=2, _use_new_zipfile_serialization=False)
    base = ["eval", "--data", data, "--weights", path, "--image-size", "32", "--batch-size", "2",
            "--threads", "1", "--device", "cpu"]  # fmt: skip
    code, out, err = run_cli([*base, "--model", "cifar:resnet8"], capsys)
    assert code == 0 and "cifar:resnet8" in out and "top-1 %" in out, err
    code, out, err = run_cli([*base, "--model", "cifar:resnet14"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "do not fit cifar:resnet14: 30 missing keys (e.g. layer1.1.conv1.weight)" in err
    assert err.strip().endswith("the file's keys and shapes are cifar:resnet8's")


def test_unknown_names_and_aliases():
    with pytest.raises(DalikdError, match=r"unknown CIFAR model 'cifar:resnet57'; did you mean "
                                          r"cifar:resnet56"):  # fmt: skip
        build_model("cifar:resnet57", 100)
    with pytest.raises(DalikdError, match="did you mean cifar:ResNet50"):  # case only
        build_model("cifar:resnet50", 100)
    with pytest.raises(DalikdError, match="known: cifar:resnet8, cifar:resnet14, .*ShuffleV2_0_3"):
        build_model("cifar:zzz", 100)
    assert key_lines(build_model("cifar:vgg13_bn", 100)) == key_lines(on_meta("vgg13"))
    assert key_lines(build_model("cifar:mobile_half", 100)) == key_lines(on_meta("MobileNetV2"))


def test_cifar_models_take_the_datas_normalization():
    model = build_model("cifar:resnet8", 100)
    assert own_norm(model) is None
    assert input_norm(model) == IMAGENET_NORM  # until the dataset's mean/std is passed in
    assert input_norm(model, CIFAR100_NORM) == CIFAR100_NORM
    assert own_norm(build_model("resnet18", 3)) == IMAGENET_NORM  # torchvision's: its own
    assert input_norm(build_model("resnet18", 3), CIFAR100_NORM) == IMAGENET_NORM
    # a CIFAR teacher takes the student's inputs as they come where both use the data's
    assert adapt_input(model, CIFAR100_NORM, CIFAR100_NORM) is model
    adapted = adapt_input(model, IMAGENET_NORM, CIFAR100_NORM)  # a torchvision student's
    assert isinstance(adapted, AdaptInput) and input_norm(adapted) == IMAGENET_NORM


def test_shufflev1_refuses_other_sizes_in_one_line():
    model = build_model("cifar:ShuffleV1", 100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(DalikdError, match="ShuffleV1 takes 32×32 images.* 8×8 for 64×64 images"):
        model(torch.zeros(2, 3, 64, 64))


def test_models_command_lists_names_sizes_and_pairs(capsys):
    code, out, err = run_cli(["models"], capsys)
    assert code == 0, err
    assert "cifar:resnet56" in out and "861,620" in out and "cifar:ShuffleV2_0_3" in out
    assert "teacher of cifar:resnet20, cifar:ShuffleV2" in out
    code, out, err = run_cli(["models", "--json"], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert list(rows) == [f"cifar:{n}" for n in cifar_models.catalogue()]
    assert {n: r["params"] for n, r in rows.items()} == {
        f"cifar:{n}": ref["params"] for n, ref in REFERENCE.items()
    }
    assert rows["cifar:vgg8"]["student_of"] == ["cifar:vgg13", "cifar:wrn_40_2", "cifar:ResNet50"]
    assert rows["cifar:wrn_40_2"]["teacher_of"] == ["cifar:wrn_16_2", "cifar:vgg8"]
    assert rows["cifar:ResNet50"]["source"] == "models/resnetv2.py"

import pytest
import torch
from tiny_models import tiny_cnn

from dalikd.errors import DalikdError
from dalikd.models import build_model, classifier_size


def test_torchvision_name_with_dataset_classes():
    model = build_model("resnet18", 7)
    assert classifier_size(model) == ("fc.weight", 7)


def test_unknown_name_suggests_close_ones():
    with pytest.raises(DalikdError, match="did you mean resnet18"):
        build_model("resnet81", 10)


def test_module_function_models(tiny_env):
    model = build_model("tiny_models:tiny_cnn", 4)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(DalikdError, match="has no function nope"):
        build_model("tiny_models:nope", 4)
    with pytest.raises(DalikdError, match="cannot import"):
        build_model("no_such_module_xyz:f", 4)


def test_weights_from_state_dict_and_checkpoint(tmp_path, tiny_env):
    source = tiny_cnn(3)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    # a DDP-wrapped model saved inside a dalikd checkpoint
    ddp_state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": ddp_state, "epoch": 3, "config": {"seed": 0}}, tmp_path / "ckpt.pt")
    x = torch.randn(2, 3, 8, 8)
    expected = source.eval()(x)
    for name in ("plain.pt", "ckpt.pt"):
        model = build_model("tiny_models:tiny_cnn", 3, str(tmp_path / name)).eval()
        assert torch.equal(model(x), expected)


def test_class_count_mismatch_is_refused(tmp_path, tiny_env):
    torch.save(tiny_cnn(1000).state_dict(), tmp_path / "w.pt")
    with pytest.raises(DalikdError, match="predict 1000 classes but the dataset has 10"):
        build_model("tiny_models:tiny_cnn", 10, str(tmp_path / "w.pt"), role="teacher")


def test_torchvision_weights_name_checks_classes_before_download():
    with pytest.raises(DalikdError, match="predicts 1000 classes but the dataset has 10"):
        build_model("resnet18", 10, "IMAGENET1K_V1")
    with pytest.raises(DalikdError, match="not a file, nor a torchvision weights name"):
        build_model("resnet18", 1000, "IMAGENET9K_V9")


def test_missing_unreadable_or_foreign_weights(tmp_path, tiny_env):
    with pytest.raises(DalikdError, match="weights file not found"):
        build_model("tiny_models:tiny_cnn", 3, str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DalikdError, match="is not a weights file torch can load safely"):
        build_model("tiny_models:tiny_cnn", 3, str(tmp_path / "junk.pt"))
    torch.save(build_model("resnet18", 3).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(DalikdError, match="do not fit"):
        build_model("tiny_models:tiny_cnn", 3, str(tmp_path / "resnet.pt"))

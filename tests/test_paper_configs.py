"""configs/: the paper's ImageNet runs load as written and hold the paper's settings."""

from pathlib import Path

import pytest
import torch
from torch import nn

from dalikd.config import OptimConfig, build_config, read_config_file
from dalikd.train import make_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# file -> (kd.aug, epochs, milestones, the published student top-1 its comment quotes)
EXPECTED = {
    "imagenet_r34_r18_kd.toml": ("none", 100, (30, 60, 90), "70.66"),
    "imagenet_r34_r18_kd_cutmix.toml": ("cutmix", 100, (30, 60, 90), "71.05"),
    "imagenet_r34_r18_kd_cutmixpick.toml": ("cutmixpick", 100, (30, 60, 90), "70.78"),
    "imagenet_r34_r18_kd_cutmixpick_200ep.toml": ("cutmixpick", 200, (60, 120, 180), "71.76"),
}


def test_every_config_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_the_paper_settings(name):
    path = CONFIGS / name
    cfg = build_config(read_config_file(path), {"data.path": "x"})
    aug, epochs, milestones, published = EXPECTED[name]
    assert (cfg.model.teacher, cfg.model.teacher_weights, cfg.model.student) == (
        "resnet34", "IMAGENET1K_V1", "resnet18",
    )  # fmt: skip
    assert (cfg.data.batch_size, cfg.data.image_size) == (256, 224)
    o = cfg.optim
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.gamma) == (0.1, 0.9, 1e-4, "step", 0.1)
    assert (o.epochs, o.milestones, o.warmup_epochs) == (epochs, milestones, 0.0)
    # the reference's optimizer: SGD over every parameter, no Nesterov (train_student.py)
    assert o.decay_norm_and_bias and not o.nesterov
    text = path.read_text()
    for key in ("batch_size", "epochs", "lr", "momentum", "weight_decay", "decay_norm_and_bias"):
        line = next(t for t in text.splitlines() if t.startswith(f"{key} ="))
        assert "paper" in line or "reference" in line or "our choice" in line, line
    k = cfg.kd
    assert (k.aug, k.temperature, k.ce_weight, k.kd_weight, k.mixed_label_ce) == (
        aug, 4.0, 0.1, 0.9, 0.0,
    )  # fmt: skip
    if aug == "cutmixpick":
        assert (k.pool_size, k.pick_fraction, k.pick_criterion) == (2, 0.5, "teacher_entropy")
    # data.path stays for --data: without it the run asks for it
    assert build_config(read_config_file(path)).data.path == ""
    assert published in path.read_text()


def test_decay_norm_and_bias_puts_every_parameter_under_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))  # materializes the lazy layer
    n = len(list(model.parameters()))
    everything = make_optimizer(model, OptimConfig(weight_decay=1e-4, decay_norm_and_bias=True))
    assert [len(g["params"]) for g in everything.param_groups if g["weight_decay"]] == [n]
    default = make_optimizer(model, OptimConfig(weight_decay=1e-4))
    decayed = [p for g in default.param_groups if g["weight_decay"] for p in g["params"]]
    assert all(p.ndim > 1 for p in decayed) and len(decayed) == 2  # conv and linear weights

"""configs/: the paper's ImageNet runs, and its CIFAR-100 and Tiny-ImageNet pairs as the
reference code runs them (configs/paper/), load as written and hold the paper's settings."""

import re
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


# -- configs/paper/: CIFAR-100 and Tiny-ImageNet as the reference code runs them (issue 21) ----

PAPER = CONFIGS / "paper"
# the CIFAR-100 student top-1 (KD, KD+CutMix, KD+CutMixPick) PAPER.md holds, per pair
PUBLISHED = {
    ("wrn_40_2", "wrn_16_2"): ("74.92", "75.34", "75.59"),
    ("resnet56", "resnet20"): ("70.66", "70.77", "70.99"),
    ("resnet32x4", "resnet8x4"): ("73.33", "74.91", "74.78"),
    ("vgg13", "vgg8"): ("72.98", "74.16", "74.43"),
    ("vgg13", "MobileNetV2"): ("67.37", "68.79", "69.49"),
    ("ResNet50", "vgg8"): ("73.81", "74.85", "74.95"),
    ("resnet32x4", "ShuffleV2"): ("74.45", "76.61", "76.90"),
}
# dataset -> (image side px, pad px, the dataset's name for dalikd data import, AutoAugment recipe)
PAPER_DATA = {"cifar100": (32, 4, "cifar100", "autoaugment_cifar10"),
              "tinyimagenet": (64, 8, "tiny-imagenet", "autoaugment")}  # fmt: skip


def _paper_files():
    from dalikd.cifar_models import PAPER_PAIRS

    return [(ds, t, s) for ds in PAPER_DATA for t, s in PAPER_PAIRS]


def test_every_paper_pair_has_a_config_and_nothing_else_is_there():
    expected = sorted(f"{ds}_{t}_{s}.toml" for ds, t, s in _paper_files())
    assert len(expected) == 18
    assert sorted(p.name for p in PAPER.glob("*")) == expected


@pytest.mark.parametrize(("dataset", "teacher", "student"), _paper_files(), ids=str)
def test_paper_config_holds_the_reference_settings(dataset, teacher, student):
    from dalikd import cifar_models
    from dalikd.config import PAPER_AUGS
    from dalikd.dataimport import data_defaults
    from dalikd.settings import scale_epochs

    path = PAPER / f"{dataset}_{teacher}_{student}.toml"
    values = read_config_file(path)
    cfg = build_config(values, {"data.path": "x", "model.teacher_weights": "t.pth"})
    size, pad, name, autoaugment = PAPER_DATA[dataset]
    m = cfg.model
    assert (m.teacher, m.student) == (f"cifar:{teacher}", f"cifar:{student}")
    cifar_models.lookup(m.teacher), cifar_models.lookup(m.student)  # names the zoo builds
    d = cfg.data
    assert (d.image_size, d.batch_size, d.base_view, d.pad, d.val_transform) == (
        size, 64, "pad_crop", pad, "none",
    )  # fmt: skip
    # the same data settings as the dataset folder `dalikd data import` writes
    own = data_defaults(name, (size, size, 3))
    assert {k: v for k, v in values["data"].items() if k in own} == own
    o = cfg.optim
    lr = 0.01 if student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05
    assert (o.epochs, o.lr, o.momentum, o.weight_decay, o.schedule, o.gamma) == (
        240, lr, 0.9, 5e-4, "step", 0.1,
    )  # fmt: skip
    assert (o.milestones, o.warmup_epochs, o.nesterov, o.decay_norm_and_bias) == (
        (150, 180, 210), 0.0, False, True,
    )  # fmt: skip
    k = cfg.kd
    assert (k.aug, k.granularity, k.temperature, k.ce_weight, k.kd_weight) == (
        "cutmixpick", "batch", 4.0, 0.1, 0.9,
    )  # fmt: skip
    assert (k.pool_size, k.pick_fraction, k.pick_criterion, k.mixed_label_ce) == (
        2, 0.5, "teacher_entropy", 0.0,
    )  # fmt: skip
    assert cfg.precision == "fp32"  # the reference trains in fp32 (dalikd's GPU default: bf16)
    p = cfg.probe  # dalikd tstddev --config: the reference's probe
    assert (p.epochs, p.group_steps) == (10, 5)
    assert p.augs == tuple(autoaugment if a == "autoaugment" else a for a in PAPER_AUGS)
    # the 480 / 960-epoch runs: the reference's --epoch_factor
    assert scale_epochs(cfg, 2).optim.epochs == 480
    assert scale_epochs(cfg, 2).optim.milestones == (300, 360, 420)
    assert scale_epochs(cfg, 4).optim.milestones == (600, 720, 840)
    text = path.read_text()
    for line in text.splitlines():  # every value says where it comes from
        if re.match(r"^[a-z_]+ = ", line):
            assert "paper" in line or "reference" in line or "our choice" in line, line
    # data.path and the teacher's weights stay for --data and --teacher-weights
    assert build_config(values, {"model.teacher_weights": "t.pth"}).data.path == ""
    assert not values["model"].get("teacher_weights")
    if dataset == "cifar100" and (teacher, student) in PUBLISHED:
        for number in PUBLISHED[(teacher, student)]:
            assert number in text

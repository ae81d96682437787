"""configs/: the paper's ImageNet runs load as written and hold the paper's settings."""

from pathlib import Path

import pytest

from dalikd.config import build_config, read_config_file

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
    k = cfg.kd
    assert (k.aug, k.temperature, k.ce_weight, k.kd_weight, k.mixed_label_ce) == (
        aug, 4.0, 0.1, 0.9, 0.0,
    )  # fmt: skip
    if aug == "cutmixpick":
        assert (k.pool_size, k.pick_fraction, k.pick_criterion) == (2, 0.5, "teacher_entropy")
    # data.path stays for --data: without it the run asks for it
    assert build_config(read_config_file(path)).data.path == ""
    assert published in path.read_text()

import math

import pytest

from dalikd.config import OptimConfig, TrainConfig, build_config, read_config_file
from dalikd.errors import DalikdError
from dalikd.train import lr_at


def test_defaults_are_the_papers_imagenet_setting():
    cfg = build_config()
    assert (cfg.optim.lr, cfg.optim.milestones, cfg.optim.gamma) == (0.1, (30, 60, 90), 0.1)
    assert (cfg.kd.ce_weight, cfg.kd.kd_weight, cfg.kd.temperature) == (0.1, 0.9, 4.0)
    assert (cfg.data.batch_size, cfg.data.image_size) == (256, 224)


def test_flags_override_the_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('seed = 5\n[optim]\nlr = 0.2\nmilestones = [10, 20]\n[kd]\naug = "flip"\n')
    cfg = build_config(
        read_config_file(f), {"optim.lr": 0.05, "model.teacher": "t", "model.teacher_weights": "w"}
    )
    assert cfg.optim.lr == 0.05 and cfg.optim.milestones == (10, 20)
    assert cfg.seed == 5 and cfg.kd.aug == "flip"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[optim]\nlearning_rate = 0.1\n", "unknown config key 'optim.learning_rate'"),
        ("sed = 1\n", "unknown config key 'sed'"),
        ("[optimizer]\nlr = 1\n", "unknown config key 'optimizer'"),
        ("[optim]\nepochs = 'ten'\n", "'optim.epochs' must be an integer"),
        ("[optim]\nschedule = 'linear'\n", "'optim.schedule' must be one of step, cosine"),
        ("[data]\ncrop_scale = [0.5]\n", "must have 2 values"),
        ("[optim\n", "cannot parse"),
    ],
)
def test_bad_files_fail_loudly(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(DalikdError, match=message):
        build_config(read_config_file(f))


def test_aug_without_teacher_and_teacher_without_weights_are_refused():
    with pytest.raises(DalikdError, match="without --teacher"):
        build_config(overrides={"kd.aug": "flip"})
    with pytest.raises(DalikdError, match="needs --teacher-weights"):
        build_config(overrides={"model.teacher": "resnet34"})


def test_saved_config_round_trips():
    cfg = build_config(overrides={"optim.milestones": [3, 4], "data.crop_scale": [0.2, 1]})
    assert build_config(cfg.to_dict()) == cfg
    assert isinstance(build_config(cfg.to_dict()), TrainConfig)


def test_step_schedule_with_warmup():
    o = OptimConfig(lr=0.1, epochs=10, milestones=(3, 6), gamma=0.1, warmup_epochs=1)
    steps = 4
    assert [lr_at(s, steps, o) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lr_at(4, steps, o) == pytest.approx(0.1)
    assert lr_at(3 * steps, steps, o) == pytest.approx(0.01)
    assert lr_at(6 * steps + 1, steps, o) == pytest.approx(0.001)


def test_cosine_schedule_ends_at_zero():
    o = OptimConfig(lr=0.2, epochs=5, schedule="cosine")
    total = 5 * 10
    assert lr_at(0, 10, o) == pytest.approx(0.2)
    assert lr_at(total // 2, 10, o) == pytest.approx(0.1)
    assert lr_at(total, 10, o) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(s, 10, o) >= lr_at(s + 1, 10, o) for s in range(total))
    assert math.isclose(lr_at(10, 10, o), 0.2 * 0.5 * (1 + math.cos(math.pi * 0.2)))

"""`dalikd tstddev`: the probe's numbers equal T. stddev of the same rows computed by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests_helpers import run_cli
from tiny_models import tiny_cnn

from dalikd import loaders, recovery
from dalikd.batch import normalize
from dalikd.config import DataConfig, KDConfig, build_config
from dalikd.data import scan_dataset
from dalikd.metrics import t_stddev
from dalikd.pick import pick, pick_count, scores
from dalikd.plan import resolve_plan
from dalikd.probe import group_rows
from dalikd.step import Distiller


def kd_step(student, teacher, batch, cfg):
    """The losses of one training step (dalikd.step.Distiller), as training computes them."""
    return Distiller(student, teacher, cfg.kd)(batch)


TINY = "tiny_models:tiny_cnn"
SIZE, BATCH, GROUP = 16, 4, 8  # px, images per step, teacher rows per group with x' (1 step)
SAMPLES = 48  # 12 steps: 2 epochs of 24 images; 12 groups (of 4 rows for none, 8 with x')
SMALL = ["--image-size", SIZE, "--batch-size", BATCH, "--group-steps", 1, "--threads", 1,
         "--device", "cpu"]  # fmt: skip


def make_noise_dataset(root: Path, classes=("ant", "bee", "cat"), n=8) -> Path:
    """Random-noise PNGs (a per-class tint): every crop, flip and box changes the pixels."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n if split == "train" else 2):
                pixels = rng.integers(0, 256, (24, 28, 3))
                pixels[..., label] = pixels[..., label] // 2 + 128
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def noise(tmp_path_factory) -> Path:
    return make_noise_dataset(tmp_path_factory.mktemp("noise"))


@pytest.fixture
def teacher_file(tmp_path, tiny_env) -> Path:
    torch.manual_seed(0)
    teacher = tiny_cnn(3)
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        teacher[1].running_mean.uniform_(-0.5, 0.5)
        teacher[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    return path


def rows_by_hand(data_dir: Path, teacher_file: Path, aug: str, steps: int) -> torch.Tensor:
    """Softmax rows of the teacher, x then x' per step, from the library's training data
    directly (recovery.TrainData, what `dalikd train` reads); a pool is cut with the pick's
    primitives (not dalikd.pick.select)."""
    dataset = scan_dataset(data_dir)
    data = DataConfig(path=str(data_dir), image_size=SIZE, batch_size=BATCH, threads=1)
    loader = recovery.TrainData(recovery.FileSource(dataset.train),
                                resolve_plan(data, aug, device="cpu"), epoch=0)  # fmt: skip
    teacher = tiny_cnn(3)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    teacher.eval()
    rows = []
    while len(rows) < steps:
        for b in loader:
            with torch.no_grad():
                logits = teacher(normalize(torch.cat([b.images, b.aug_images])))
            x, aug_rows = logits[:BATCH], logits[BATCH:]
            if b.pool_size > 1:
                kept = pick(scores("teacher_entropy", aug_rows, None, 4.0), pick_count(8, 0, 0.5))
                aug_rows = aug_rows[kept]
            rows.append(torch.cat([x, aug_rows]).softmax(dim=1))
            if len(rows) == steps:
                break
    return torch.cat(rows)


def test_probe_end_to_end_equals_t_stddev_of_the_same_rows(noise, teacher_file, tmp_path, capsys):
    # missing folders of the outputs are made (checked before the probe runs)
    out_json, out_png = tmp_path / "new" / "tstd.json", tmp_path / "new" / "plots" / "tstd.png"
    args = ["tstddev", "--data", noise, "--teacher", TINY, "--teacher-weights", teacher_file,
            "--aug", "none,flip,cutmix,cutmixpick", "--samples", SAMPLES, *SMALL,
            "--json", out_json, "--plot", out_png]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "T. stddev" in out and "cutmixpick" in out
    results = json.loads(out_json.read_text())["results"]
    assert {r["aug"] for r in results} == {"none", "flip", "cutmix", "cutmixpick"}
    values = [r["t_stddev"] for r in results]
    assert values == sorted(values) and all(v > 0 for v in values)  # ranked, best first
    by_aug = {r["aug"]: r for r in results}
    assert all(r["samples"] == SAMPLES for r in results)
    # none: a group spans the same steps as with x' (the reference's 5 steps), half the rows
    assert (by_aug["none"]["rows"], by_aug["none"]["group_rows"]) == (SAMPLES, GROUP // 2)
    assert by_aug["flip"]["group_rows"] == by_aug["cutmixpick"]["group_rows"] == GROUP
    assert by_aug["none"]["groups"] == by_aug["flip"]["groups"] == SAMPLES // BATCH
    assert by_aug["cutmixpick"]["rows"] == 2 * SAMPLES  # B of x + the B kept of 2B candidates
    # each scheme names the data plan it ran: its paths resolved, its pool
    plans = {aug: r["plan"] for aug, r in by_aug.items()}
    assert plans["cutmix"]["mixing"] in ("native", "composed") and plans["flip"]["mixing"] == "none"
    assert {p["resize"] for p in plans.values()} <= {"native", "dali"}
    assert [plans[a]["pool_size"] for a in ("none", "flip", "cutmixpick")] == [0, 1, 2]
    with Image.open(out_png) as png:
        assert png.format == "PNG" and png.width > 100
    assert not list(tmp_path.glob("*.tmp"))

    steps = SAMPLES // BATCH
    for aug in ("cutmix", "cutmixpick"):
        probs = rows_by_hand(noise, teacher_file, aug, steps)
        assert probs.shape[0] == by_aug[aug]["rows"]
        assert by_aug[aug]["t_stddev"] == pytest.approx(t_stddev(probs, GROUP), rel=1e-9)
        entropy = -(probs.double() * probs.double().log()).sum(1).mean().item()
        assert by_aug[aug]["mean_entropy"] == pytest.approx(entropy, rel=1e-6)


def test_identity_equals_none_and_epochs_count_passes(noise, teacher_file, tmp_path, capsys):
    """Groups of whole steps (16 rows = 2 steps with x', 8 rows of x alone): identity (x' = x)
    repeats each row of x, so its group means and T. stddev are those of none."""
    args = ["tstddev", "--data", noise, "--teacher", TINY, "--teacher-weights", teacher_file,
            "--aug", "none,identity", "--epochs", 2, *SMALL, "--group-steps", 2,
            "--json", tmp_path / "r.json"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    by_aug = {r["aug"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert by_aug["none"]["samples"] == by_aug["identity"]["samples"] == 2 * 24
    assert (by_aug["none"]["rows"], by_aug["identity"]["rows"]) == (2 * 24, 2 * 2 * 24)
    assert by_aug["none"]["groups"] == by_aug["identity"]["groups"] == 6
    assert by_aug["identity"]["t_stddev"] == pytest.approx(by_aug["none"]["t_stddev"], rel=1e-9)


@pytest.mark.parametrize(
    "extra, message",
    [
        # groups of 1 step: 2 groups need 2 steps, 8 samples
        (["--aug", "flip,none", "--samples", 4], "need 8 samples (2 steps); this probe has 4"),
        (["--aug", "flip,fancy", "--samples", 48], "unknown augmentation 'fancy'; known: "),
        (["--samples", 48, "--epochs", 2], "give --epochs or --samples, not both"),
        (["--samples", 0], "--samples must be > 0, got 0"),
        (["--samples", 48, "--crop-scale", "0,1"], "--crop-scale must satisfy 0 < min"),
        (["--samples", 48, "--plot", "t.jpg"], "--plot t.jpg: this output is written as *.png"),
        (
            ["--aug", "cutmixpick", "--samples", 48, "--pick-criterion", "student_entropy"],
            "pass --student",
        ),  # fmt: skip
    ],
)
def test_mistakes_are_one_line(extra, message, noise, teacher_file, capsys):
    args = ["tstddev", "--data", noise, "--teacher", TINY, "--teacher-weights", teacher_file,
            *SMALL, *extra]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("criterion", ["teacher_entropy", "student_entropy", "kld"])
def test_probe_counts_the_rows_training_counts(criterion):
    """The probe's rows (Distiller.teacher_outputs, eval) = StepOutput.teacher_logits of a
    training step."""
    torch.manual_seed(0)
    b, k = 4, 2
    batch = loaders.Batch(
        images=torch.randn(b, 3, 8, 8), labels=torch.arange(b) % 3,
        aug_images=torch.randn(k * b, 3, 8, 8), lam=torch.rand(k * b),
        perm=torch.cat([torch.roll(torch.arange(b), j + 1) for j in range(k)]), pool_size=k,
    )  # fmt: skip
    student, teacher = tiny_cnn(3).eval(), tiny_cnn(3).eval().requires_grad_(False)
    cfg = build_config(overrides={"kd.pick_criterion": criterion})
    training = kd_step(student, teacher, batch, cfg).teacher_logits
    probe = Distiller(student, teacher, KDConfig(pick_criterion=criterion)).eval()
    probe = probe.teacher_outputs(batch).rows()
    torch.testing.assert_close(probe, training, rtol=0, atol=0)


def test_group_is_five_steps_whatever_the_batch(noise, teacher_file, tmp_path, capsys):
    """The reference's groups: 5 steps of x and x', 5 x (32 + 32) = 320 rows at batch 32."""
    args = ["tstddev", "--data", noise, "--teacher", TINY, "--teacher-weights", teacher_file,
            "--aug", "flip,none", "--batch-size", 4, "--samples", 40, "--image-size", SIZE,
            "--threads", 1, "--device", "cpu", "--json", tmp_path / "r.json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    by_aug = {r["aug"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert by_aug["flip"]["group_rows"] == 5 * (4 + 4) and by_aug["none"]["group_rows"] == 5 * 4
    assert by_aug["flip"]["groups"] == by_aug["none"]["groups"] == 2
    assert group_rows(5, 32, 1, KDConfig()) == 320 and group_rows(5, 64, 1, KDConfig()) == 640

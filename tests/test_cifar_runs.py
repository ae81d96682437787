"""Issue 21 end to end: `dalikd data import cifar100` -> `dalikd train --config
configs/paper/...` with a CRD-format teacher -> `dalikd tstddev --config` (the reference's probe);
`dalikd eval` of a CRD checkpoint with no other flag gives the reference's test loss; a run on
a raw dataset resumes bit-identically, with the settings it started with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_archives import make_cifar100
from tests_helpers import run_cli

from dalikd.data import scan_dataset
from dalikd.dataimport import import_dataset
from dalikd.evaluate import evaluate_model
from dalikd.manifest import manifest_path
from dalikd.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"
# the reference's CIFAR-100 normalization, 0-1 scale (dataset/cifar100.py:220-221)
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def crd_checkpoint(path: Path, name: str, classes: int, seed: int = 0) -> Path:
    """A randomly initialised zoo model saved as CRD's release saves its teachers: a dict whose
    "model" is the state_dict, beside the epoch, accuracy and optimizer. Its BatchNorm
    statistics come from a few batches of noise, so its outputs are not degenerate."""
    torch.manual_seed(seed)
    model = build_model(f"cifar:{name}", classes).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": 70.0,
                "optimizer": optimizer.state_dict()}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """`dalikd data import cifar100` of a small made-up archive (4 classes, 8 + 3 each) and a
    CRD-format resnet56 teacher."""
    tmp = tmp_path_factory.mktemp("e2e")
    archive, _ = make_cifar100(tmp / "cifar-100-python.tar.gz", train_per_class=8,
                               test_per_class=3)  # fmt: skip
    teacher = crd_checkpoint(tmp / "ckpt_epoch_240.pth", "resnet56", 4)
    return tmp, archive, teacher


def test_import_train_with_the_paper_config_then_the_references_probe(imported, capsys):
    tmp, archive, teacher = imported
    data, run = tmp / "cifar100", tmp / "run"
    code, out, err = run_cli(["data", "import", "cifar100", archive, data], capsys)
    assert code == 0, err
    config = CONFIGS / "cifar100_resnet56_resnet20.toml"
    code, out, err = run_cli(["train", "--config", config, "--data", data, "--teacher-weights",
                              teacher, "--epochs", 1, "--batch-size", 8, "--threads", 1,
                              "--device", "cpu", "--out", run], capsys)  # fmt: skip
    assert code == 0, err
    assert "teacher cifar:resnet56: val top-1" in out  # the CRD checkpoint loaded as it is
    saved = json.loads((run / "config.json").read_text())
    d = saved["data"]  # the dataset's own settings, resolved and recorded
    assert (d["image_size"], d["base_view"], d["pad"], d["val_transform"]) == (
        32, "pad_crop", 4, "none",
    )  # fmt: skip
    assert saved["plan"]["norm"] == {"mean": d["mean"], "std": d["std"]}
    assert saved["plan"]["raw_shape"] == [32, 32, 3]
    assert (saved["kd"]["aug"], saved["kd"]["granularity"], saved["precision"]) == (
        "cutmixpick", "batch", "fp32",
    )  # fmt: skip
    (record,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and np.isfinite(record["val_loss"]) and record["t_stddev"] is None

    probe = tmp / "probe.json"  # the config's probe, shortened to 10 steps (2 groups of 5)
    code, out, err = run_cli(["tstddev", "--config", config, "--data", data, "--teacher-weights",
                              teacher, "--samples", 10 * 4, "--batch-size", 4, "--threads", 1,
                              "--device", "cpu", "--json", probe], capsys)  # fmt: skip
    assert code == 0, err
    result = json.loads(probe.read_text())
    assert result["group_steps"] == 5 and result["batch_size"] == 4
    assert sorted(r["aug"] for r in result["results"]) == sorted(
        ["identity", "flip", "crop_flip", "cutout", "autoaugment_cifar10", "mixup", "cutmix",
         "cutmixpick"])  # fmt: skip
    for r in result["results"]:
        assert r["groups"] == 2 and r["t_stddev"] > 0, r
        assert (r["plan"]["granularity"], r["plan"]["data"]["base_view"]) == ("batch", "pad_crop")


def test_eval_of_a_crd_checkpoint_gives_the_references_test_loss(imported, capsys):
    tmp, archive, _ = imported
    data = tmp / "eval-data"
    import_dataset("cifar100", archive, data)
    weights = crd_checkpoint(tmp / "resnet8.pth", "resnet8", 4, seed=3)
    result = evaluate_model(str(data), "cifar:resnet8", str(weights), device="cpu")
    # the reference: ToTensor + Normalize(MEAN, STD) of the stored test images, no resize
    ds = scan_dataset(data)
    pixels = np.stack([np.fromfile(f, np.uint8).reshape(32, 32, 3) for f in ds.val.files])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    model = build_model("cifar:resnet8", 4, str(weights)).eval()
    with torch.no_grad():
        logits = model(x)
    labels = torch.tensor(ds.val.labels)
    assert result["count"] == len(ds.val) == 12
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean())
    code, out, err = run_cli(["eval", "--data", data, "--model", "cifar:resnet8", "--weights",
                              weights, "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0, err
    assert f"{result['loss']:.4f}" in out


def _weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_a_raw_dataset_run_resumes_bit_identically_with_its_saved_settings(
    tmp_path, tiny_env, capsys, monkeypatch
):
    archive, _ = make_cifar100(tmp_path / "c.tar.gz", train_per_class=6, test_per_class=2)
    data = tmp_path / "data"
    import_dataset("cifar100", archive, data)  # 24 train images: 6 steps of 4
    teacher = tmp_path / "teacher.pt"
    from tiny_models import tiny_cnn

    torch.manual_seed(1)
    torch.save(tiny_cnn(4).state_dict(), teacher)

    def args(out):
        return ["train", "--data", data, "--student", "tiny_models:stopping_cnn", "--teacher",
                "tiny_models:tiny_cnn", "--teacher-weights", teacher, "--aug", "cutmix",
                "--aug-granularity", "batch", "--epochs", 2, "--batch-size", 4, "--threads", 1,
                "--device", "cpu", "--lr", 0.05, "--ckpt-every", 2, "--out", out]  # fmt: skip

    ref, run = tmp_path / "ref", tmp_path / "run"
    code, _, err = run_cli(args(ref), capsys)
    assert code == 0, err
    monkeypatch.setenv("TINY_STOP_AT", str(2 * (6 + 4)))  # epoch 2, step 4 (2 forwards a step)
    code, _, err = run_cli(args(run), capsys)
    assert code != 0 and "stopped by SIGUSR1 at epoch 2, step 4" in err
    monkeypatch.delenv("TINY_STOP_AT")
    # the dataset's own settings change meanwhile: the run keeps the ones it started with
    path = manifest_path(data)
    manifest = json.loads(path.read_text())
    manifest["data_defaults"]["pad"] = 2
    path.write_text(json.dumps(manifest))
    code, _, err = run_cli(["train", "--resume", run], capsys)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["data"]["pad"] == 4
    want, got = _weights(ref), _weights(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

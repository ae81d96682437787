"""The CIFAR-100 / Tiny-ImageNet setting as a user meets it on the command line (issue 21's
QA pass): user mistakes are one line, --help says what the commands do."""

from fake_archives import make_cifar10, make_cifar100
from tests_helpers import run_cli


def test_import_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "c10"  # OUT's parent is a file: the temporary folder cannot be made
    code, _, err = run_cli(["data", "import", "cifar10", archive, out], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: cannot write") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz", "file"]


def test_import_of_a_folder_says_it_is_a_folder(tmp_path, capsys):
    code, _, err = run_cli(["data", "import", "cifar10", tmp_path, tmp_path / "out"], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert "is a folder; give the archive file (cifar-10-python.tar.gz)" in err
    assert not (tmp_path / "out").exists()


def test_a_corrupt_tar_gz_is_refused_not_imported(tmp_path, capsys):
    """Random pixels deflate to stored blocks: bytes changed there decode without a zlib error,
    and only the gzip trailer's CRC-32 tells. The import must check it."""
    archive, _ = make_cifar100(tmp_path / "cifar-100-python.tar.gz", train_per_class=40)
    data = bytearray(archive.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x55
    archive.write_bytes(bytes(data))
    out = tmp_path / "c100"
    code, _, err = run_cli(["data", "import", "cifar100", archive, out], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert "is damaged or truncated: CRC check failed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python.tar.gz"]


_TERM_MID_IMPORT = """
import os, signal, sys
from dalikd.dataimport import import_dataset

class TermWhileWriting:
    def progress(self, phase, done, total):
        if phase == "writing train":
            os.kill(os.getpid(), signal.SIGTERM)

    def message(self, text):
        pass

import_dataset("cifar10", sys.argv[1], sys.argv[2], TermWhileWriting())
"""


def test_sigterm_mid_import_leaves_no_temporary_folder(tmp_path):
    """``kill`` / ``timeout`` / a scheduler's SIGTERM cleans up as Ctrl-C does: no hidden
    half dataset is left beside OUT."""
    import subprocess
    import sys

    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "c10"
    done = subprocess.run([sys.executable, "-c", _TERM_MID_IMPORT, str(archive), str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr, done.stderr[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


def test_train_help_names_the_cifar_models_and_the_dataset_defaults(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for flag in ("--teacher TEXT", "--student TEXT"):
        assert f"{flag} {flag[2:-5]} model (torchvision name, timm:NAME, cifar:NAME" in text
    for flag in ("--base-view", "--pad INTEGER", "--val-transform"):
        assert "or the dataset's" in text.split(flag, 1)[1].split("[default:", 1)[0], flag


def _imported_cifar10(tmp_path):
    from dalikd.dataimport import import_dataset

    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz", batch_per_class=2)
    import_dataset("cifar10", archive, tmp_path / "c10")
    return tmp_path / "c10"


def test_a_view_at_another_size_is_refused_only_where_validation_is_built(tmp_path, capsys):
    """Preview reads train/ alone: x at 40 px of 32-px images is drawn (train with
    --val-transform center_crop sees the same); a plan with validation keeps validation as
    stored and says how to change it."""
    from dataclasses import replace

    import pytest
    from PIL import Image

    from dalikd.config import DataConfig
    from dalikd.errors import DalikdError
    from dalikd.plan import resolve_plan

    data = _imported_cifar10(tmp_path)
    png = tmp_path / "p.png"
    args = ["preview", "--data", data, "--aug", "flip", "--out", png, "--batch-size", "1"]
    code, out, err = run_cli([*args, "--image-size", "40"], capsys)
    assert code == 0, err
    assert Image.open(png).height > 2 * 40
    cfg = DataConfig(path=str(data), image_size=40, base_view="pad_crop", val_transform="none")
    with pytest.raises(DalikdError) as e:
        resolve_plan(cfg, device="cpu", raw_shape=(32, 32, 3))
    assert "give --image-size 32, or validate at 40 px with --val-transform center_crop" in str(
        e.value
    )
    assert resolve_plan(cfg, device="cpu", raw_shape=(32, 32, 3), validates=False)
    assert resolve_plan(replace(cfg, val_transform="center_crop"), device="cpu",
                        raw_shape=(32, 32, 3))  # fmt: skip


def test_eval_help_says_an_imported_dataset_is_used_as_stored(capsys):
    code, out, _ = run_cli(["eval", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0
    assert "an imported dataset's images are used as stored: only their own size fits" in text


def test_import_into_the_current_folder_keeps_that_folder(tmp_path, monkeypatch, capsys):
    """`cd data/c10 && dalikd data import cifar10 ARCHIVE .`: the shell stands in OUT, so OUT
    must stay the same folder (not be replaced by a renamed one the shell cannot see)."""
    from dalikd.manifest import read_manifest

    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "c10"
    out.mkdir()
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    code, _, err = run_cli(["data", "import", "cifar10", archive, "."], capsys)
    assert code == 0, err
    assert out.stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train", "val"]
    assert read_manifest(out).splits["train"].samples == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c10", "cifar-10-python.tar.gz"]


def test_profile_help_names_the_cifar_models(capsys):
    code, out, _ = run_cli(["profile", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0
    for role in ("teacher", "student"):
        assert f"{role} model (torchvision name, timm:NAME, cifar:NAME (dalikd models)" in text


def test_a_config_for_another_dataset_is_named_as_the_mistake(tmp_path):
    """A Tiny-ImageNet paper config (64 px) on an imported CIFAR folder: the line says the
    config is for another dataset; --image-size 32 or a CIFAR config goes on."""
    import pytest

    from dalikd.errors import DalikdError
    from dalikd.settings import command_config

    data = str(_imported_cifar10(tmp_path))
    tiny = {"data": {"image_size": 64, "pad": 8, "val_transform": "none"}}
    with pytest.raises(
        DalikdError,
        match="the config file is for 64-px images, but .* holds "
        "cifar10's 32-px images, used as stored: take the config of cifar10",
    ):
        command_config(tiny, {"data.path": data})
    assert command_config(tiny, {"data.path": data, "data.image_size": 32}).data.image_size == 32
    cifar = {"data": {"image_size": 32, "pad": 4}}
    assert command_config(cifar, {"data.path": data}).data.base_view == "pad_crop"
    crop = {"data": {"image_size": 64, "val_transform": "center_crop"}}
    assert command_config(crop, {"data.path": data}).data.image_size == 64
    # a glob of a shard set's tars reads its set's manifest: the line names the dataset too
    with pytest.raises(DalikdError, match="holds cifar10's 32-px images"):
        command_config(tiny, {"data.path": f"{data}/train-0000[0-1].tar"})


def test_import_into_a_symbolic_link_names_it_and_its_target(tmp_path, capsys):
    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    target = tmp_path / "scratch"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    code, _, err = run_cli(["data", "import", "cifar10", archive, tmp_path / "link"], capsys)
    assert code == 1 and err.count("\n") == 1, err
    text = " ".join(err.split())
    assert "link is a symbolic link; give a new or empty folder to import into" in text
    assert f"(e.g. the link's target, {target})" in text
    code, _, err = run_cli(["data", "import", "cifar10", archive, target], capsys)
    assert code == 0, err

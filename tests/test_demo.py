import numpy as np
from PIL import Image

from dalikd.data import scan_dataset
from dalikd.demo import build_digits


def test_digits_dataset_is_built_once_in_imagenet_layout(tmp_path):
    root = build_digits(tmp_path / "cache" / "digits")
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700  # a cache root it creates
    ds = scan_dataset(root)
    assert ds.classes == tuple(str(d) for d in range(10))
    assert len(ds.train) + len(ds.val) == 1797  # every scikit-learn digit, once
    assert 0.18 < len(ds.val) / 1797 < 0.22
    assert not set(ds.train.files) & set(ds.val.files)
    image = np.asarray(Image.open(ds.val.files[0]))
    assert image.shape == (32, 32, 3)
    stamp = (root / "train" / "0" / "0000.JPEG").stat().st_mtime_ns
    assert build_digits(root) == root  # cached: nothing rewritten
    assert (root / "train" / "0" / "0000.JPEG").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "cache").glob(".build-*"))


def test_demo_command_runs_all_three_trainings(tmp_path, monkeypatch, capsys):
    import pytest

    from dalikd.cli.main import main

    monkeypatch.setenv("DALIKD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "1", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for role in ("teacher", "student alone", "KD student (aug flip)", "cutmixpick"):
        assert role in out
    for run in ("teacher", "student", "kd", "kd_cutmixpick"):
        assert (tmp_path / "demo" / run / "best.pt").is_file()
    # captured (not a terminal): one whole line per run, the run directory untruncated
    assert "shufflenet_v2_x0_5  KD student (aug flip): val top-1 " in out
    assert f"{tmp_path / 'demo' / 'kd_cutmixpick'}\n" in out
    curves = tmp_path / "demo" / "curves.png"
    assert curves.is_file() and f"curves of the four runs: {curves}" in out

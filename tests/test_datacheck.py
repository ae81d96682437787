"""The data scan: bad files are left out before DALI sees them, and a run survives them."""

import io
import os

import numpy as np
import pytest
from conftest import make_dataset
from PIL import Image

from dalikd import loaders
from dalikd.cli.main import main
from dalikd.config import DataConfig
from dalikd.data import scan_dataset
from dalikd.datacheck import check_file, check_files
from dalikd.plan import resolve_plan


def jpeg_bytes(size=(20, 24), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 120, np.uint8)).convert(mode).save(buf, "JPEG", **save)
    return buf.getvalue()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


BAD = {
    "empty.JPEG": (b"", "empty file"),
    "truncated.JPEG": (jpeg_bytes()[:-300], "truncated JPEG"),
    "text.JPEG": (b"hello, not an image at all", "not an image"),
    "truncated.png": (png_bytes()[:-20], "truncated PNG"),
}
GOOD = {
    "gray.JPEG": jpeg_bytes(mode="L"),
    "cmyk.JPEG": jpeg_bytes(mode="CMYK"),
    "progressive.JPEG": jpeg_bytes(progressive=True),
    "png_named.JPEG": png_bytes(),
}


@pytest.fixture
def dirty_dataset(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=4, n_val=2, ext=".JPEG")
    for name, (data, _) in BAD.items():
        (root / "train" / "ant" / name).write_bytes(data)
    for name, data in GOOD.items():
        (root / "train" / "bee" / name).write_bytes(data)
    (root / "val" / "cat" / "README.txt").write_text("notes")
    return root


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_file_is_named_with_its_reason(tmp_path, name):
    data, reason = BAD[name]
    path = tmp_path / name
    path.write_bytes(data)
    assert reason in check_file(str(path))


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decodable_oddities_are_kept(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(GOOD[name])
    assert check_file(str(path)) is None
    assert check_file(str(path), decode=True) is None


def test_decode_mode_finds_corruption_inside_the_file(tmp_path):
    data = bytearray(jpeg_bytes(size=(64, 64)))
    data[200:-10] = b"\x00" * (len(data) - 210)  # scan data wiped, end marker intact
    path = tmp_path / "wiped.JPEG"
    path.write_bytes(bytes(data))
    assert check_file(str(path)) is None  # the fast check cannot see this
    assert check_file(str(path), decode=True).startswith("undecodable")


def test_scan_leaves_bad_files_out_and_dali_runs_an_epoch(dirty_dataset):
    ds = scan_dataset(dirty_dataset)
    reasons = {os.path.basename(p): r for p, r in ds.skipped}
    assert set(reasons) == {*BAD, "README.txt"}
    assert len(ds.train) == 3 * 4 + len(GOOD)
    assert not any(os.path.basename(f) in BAD for f in ds.train.files)
    # Every remaining file decodes: two epochs through the real pipeline.
    cfg = DataConfig(path=str(dirty_dataset), image_size=16, batch_size=4, threads=1)
    loader = loaders.train_loader(ds.train, resolve_plan(cfg, device="cpu"))
    assert sum(len(b) for _ in range(2) for b in loader) == 2 * (len(ds.train) // 4) * 4


def test_cache_reuses_verdicts_and_sees_changed_files(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    good = root / "a.JPEG"
    good.write_bytes(jpeg_bytes())
    cache = tmp_path / "cache"
    calls = []
    files = [str(good)]
    check_files(files, root=root, cache_root=cache, progress=lambda d, t: calls.append(t))
    assert calls == [1]
    calls.clear()
    assert (
        check_files(files, root=root, cache_root=cache, progress=lambda d, t: calls.append(t)) == {}
    )
    assert calls == []  # nothing re-checked
    good.write_bytes(jpeg_bytes()[:-100])  # truncated in place: size changes
    bad = check_files(files, root=root, cache_root=cache)
    assert "truncated JPEG" in bad[str(good)]


def test_check_data_command(dirty_dataset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", str(dirty_dataset)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name in BAD:
        assert name in out
    assert "5 files left out" in out


def test_check_data_fails_only_for_an_unusable_split(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", n_train=2, n_val=1, ext=".JPEG")
    for f in (root / "val").rglob("*.JPEG"):
        f.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", str(root)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "val holds no usable images; 3 left out" in err


def test_concurrent_scans_share_the_cache_safely(tmp_path):
    # torchrun ranks scan the same folder at once: every writer must finish, the cache stays whole.
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "d"
    root.mkdir()
    files = []
    for i in range(20):
        (root / f"{i}.JPEG").write_bytes(jpeg_bytes())
        files.append(str(root / f"{i}.JPEG"))
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: check_files(files, root=root, cache_root=cache), range(8))
        )
    assert results == [{}] * 8
    assert not list((cache / "scans").glob("*.tmp"))
    assert check_files(files, root=root, cache_root=cache, progress=lambda d, t: 1 / 0) == {}

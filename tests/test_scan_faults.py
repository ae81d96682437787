"""The scan against hostile files (issues 23 and 24): JPEGs cut short, decompression bombs,
FIFOs and devices, control characters in names, run folders and empty folders in the data."""

import os
import socket
import threading

import numpy as np
import pytest
from conftest import make_dataset
from PIL import Image
from test_robustness import (
    _jpeg,
    _one_line,
    bad_scan_header,
    cut_before_its_scan,
    truncated_with_thumbnail,
)
from tests_helpers import run_cli

from dalikd import recovery
from dalikd.data import scan_dataset
from dalikd.datacheck import check_file, check_files

# -- issue 23 item 3: a JPEG must end with its end-of-image marker -------------------------------


def _noise_jpeg(size=(96, 128)) -> bytes:
    return _jpeg(size, noise=True)  # ~30 KB: a cut lands inside its entropy-coded data


@pytest.mark.parametrize(
    ("name", "data", "left_out"),
    [
        ("whole", _noise_jpeg(), False),
        ("zero padding", _noise_jpeg() + bytes(100), False),
        ("0xFF padding", _noise_jpeg() + b"\xff" * 40 + bytes(9), False),
        ("padding longer than the tail read", _noise_jpeg() + bytes(5000), False),
        ("cut in its entropy-coded data", _noise_jpeg()[:-3000], True),
        ("cut, thumbnail's FF D9 in the last 4 KiB", truncated_with_thumbnail(), True),
        ("cut, FF D9 33 bytes before the end", _noise_jpeg()[:-2] + b"\xff\xd9" + b"\x01" * 31,
         True),
        ("cut, FF D9 31 bytes before the end", _noise_jpeg()[:-2] + b"\xff\xd9" + b"\x01" * 29,
         False),
        # what the scan cannot catch: cut, then an end marker appended; DALI's CPU decoder and
        # nvJPEG decode it as a partly grey image (docs/reliability.md)
        ("cut in its scan, FF D9 appended", _noise_jpeg()[:-3000] + b"\xff\xd9", False),
    ],
)  # fmt: skip
def test_a_jpeg_is_left_out_unless_its_last_32_bytes_hold_the_end_marker(
    tmp_path, name, data, left_out
):
    path = tmp_path / "x.JPEG"
    path.write_bytes(data)
    reason = check_file(str(path))
    if left_out:
        assert reason == "truncated JPEG? no end-of-image marker (FF D9) at its end", name
    else:
        assert reason is None, (name, reason)


def _with_app_segment(jpeg: bytes, n: int) -> bytes:
    """``jpeg`` with an APP2 segment of ``n`` bytes after its start marker (ICC profiles, EXIF
    thumbnails: a header that reaches past the scan's first read)."""
    return jpeg[:2] + b"\xff\xe2" + (n + 2).to_bytes(2, "big") + bytes(n) + jpeg[2:]


@pytest.mark.parametrize(
    ("name", "data", "left_out"),
    [
        ("cut before its scan, FF D9 appended", cut_before_its_scan(), True),
        ("the same behind a 60 KB APP segment", _with_app_segment(cut_before_its_scan(), 60_000),
         True),
        ("only its start marker and an end marker", b"\xff\xd8\xff\xd9", True),
        ("whole, behind a 60 KB APP segment", _with_app_segment(_noise_jpeg(), 60_000), False),
        ("whole, fill bytes between segments", _noise_jpeg()[:2] + b"\xff" * 5
         + _noise_jpeg()[2:], False),
        ("a scan header naming no frame component (DALI raises on it)", bad_scan_header(),
         False),
    ],
)  # fmt: skip
def test_a_jpeg_whose_header_ends_before_any_scan_is_left_out(tmp_path, name, data, left_out):
    """Such a file can crash DALI 2.4's decoder (SIGSEGV) in a batch of ~50 or more instead of
    raising, so recovery cannot catch it: the scan must (one walk of the header's segments)."""
    path = tmp_path / "x.JPEG"
    path.write_bytes(data)
    reason = check_file(str(path))
    if left_out:
        assert reason == "truncated JPEG: its header ends before any image data (no start-of-scan)"
    else:
        assert reason is None, (name, reason)


def test_a_progressive_jpeg_and_photographs_pass_the_header_walk(tmp_path):
    """No false alarm: a progressive JPEG and every JPEG PIL writes with EXIF pass."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "x" * 9000  # ImageDescription: a large APP1
    for i, kw in enumerate(({"progressive": True}, {"exif": exif}, {"quality": 5},
                            {"subsampling": 0, "optimize": True})):  # fmt: skip
        path = tmp_path / f"{i}.jpg"
        image.save(path, "JPEG", **kw)
        assert check_file(str(path)) is None, kw


def test_a_truncated_jpeg_reaches_data_report_tsv(tmp_path, capsys, tiny_env):
    # 3 x 5 + 1 = 4 full batches: the file that fails in DALI is never in a dropped tail
    root = make_dataset(tmp_path / "d", classes=("a", "b", "c"), n_train=5, n_val=1)
    (root / "train/a/thumb.jpg").write_bytes(truncated_with_thumbnail())
    (root / "train/b/cut.jpg").write_bytes(bad_scan_header())  # passes; DALI fails on it
    run = tmp_path / "run"
    args = ["train", "--data", root, "--student", "tiny_models:tiny_cnn", "--epochs", "1",
            "--image-size", "16", "--batch-size", "4", "--threads", "1", "--device", "cpu",
            "--out", run]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    rows = dict(
        line.split("\t", 1) for line in (run / "data_report.tsv").read_text().splitlines()[1:]
    )
    assert rows[str(root / "train/a/thumb.jpg")].startswith("truncated JPEG? no end-of-image")
    assert rows[str(root / "train/b/cut.jpg")].startswith("failed in training")


# -- issue 24 item 4: decompression bombs ---------------------------------------------------------


def bomb(width=20000, height=20000) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(_jpeg((16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


SAVE = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
        "PPM": ".ppm", "JPEG2000": ".jp2"}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(SAVE))
@pytest.mark.parametrize("extra", [{}, {"exif": True}])
def test_the_header_size_is_the_image_size_in_every_format(tmp_path, fmt, extra):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    kwargs = {}
    if extra and fmt in ("JPEG", "WEBP", "PNG", "TIFF"):  # metadata ahead of the frame header
        exif = Image.Exif()
        exif[0x010E] = "x" * 6000  # ImageDescription: pushes a JPEG's SOF past the first 4 KiB
        kwargs["exif"] = exif.tobytes()
    from dalikd.datacheck import _inspect

    path = tmp_path / f"a{SAVE[fmt]}"
    image.save(path, fmt, **kwargs)
    assert _inspect(str(path), False) == (None, 53, 37)
    with Image.open(path) as reopened:
        assert reopened.size == (53, 37)


def test_more_header_variants_give_their_sizes(tmp_path):
    from dalikd.datacheck import _File, _inspect, image_size, sniff

    image = Image.fromarray(np.full((19, 23, 3), 7, np.uint8))
    cases = {
        "lossy.webp": dict(format="WEBP", quality=80),
        "lossless.webp": dict(format="WEBP", lossless=True),
        "gray.pgm": dict(format="PPM"),
        "code.j2k": dict(format="JPEG2000"),
        "deflate.tif": dict(format="TIFF", compression="tiff_deflate"),
        "prog.jpg": dict(format="JPEG", progressive=True),
    }
    for name, kwargs in cases.items():
        path = tmp_path / name
        (image.convert("L") if name.endswith(".pgm") else image).save(path, **kwargs)
        assert _inspect(str(path), False) == (None, 23, 19), name
    header = (b"BM" + bytes(12) + (40).to_bytes(4, "little") + (70000).to_bytes(4, "little")
              + (-9000).to_bytes(4, "little", signed=True))  # fmt: skip
    (tmp_path / "big.bmp").write_bytes(header + bytes(40))
    fd = os.open(tmp_path / "big.bmp", os.O_RDONLY)
    try:
        head = os.pread(fd, 4096, 0)
        assert sniff(head) == "bmp"
        assert image_size("bmp", _File(fd, len(head), head)) == (70000, 9000)  # top-down rows
    finally:
        os.close(fd)


def test_a_decompression_bomb_is_left_out_at_the_scan_by_a_data_setting(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=2, n_val=1)
    (root / "train/a/bomb.jpg").write_bytes(bomb())
    (root / "train/b/big_but_fine.jpg").write_bytes(bomb(9000, 9000))  # 81 Mpx < PIL's 89.5
    reason = check_file(str(root / "train/a/bomb.jpg"))
    assert reason.startswith("image header claims 20000x20000 (400 Mpx), above the limit of 89.5")
    ds = scan_dataset(root)
    assert dict(ds.skipped) == {str(root / "train/a/bomb.jpg"): reason}
    assert str(root / "train/b/big_but_fine.jpg") in ds.train.files
    # the limit is applied after the cache: another limit re-checks no file
    calls = []
    ds = scan_dataset(root, max_pixels=50_000_000, progress=lambda d, t: calls.append(d))
    assert calls == [] and len(ds.skipped) == 2
    ds = scan_dataset(root, max_pixels=0, progress=lambda d, t: calls.append(d))
    assert calls == [] and ds.skipped == ()
    code, out, err = run_cli(["check-data", root], capsys)
    assert code == 0 and "bomb.jpg  (image header claims 20000x20000" in out
    code, out, err = run_cli(["check-data", root, "--max-pixels", "0"], capsys)
    assert code == 0 and "0 files left out" in out
    files = [str(p) for p in (root / "train").rglob("*.jpg")]
    assert check_files(files, root=root, cache_root=None, max_pixels=400_000_000) == {}


# -- issue 24 item 5: FIFOs, sockets and devices are reported, never opened ----------------------


def test_a_fifo_socket_or_device_in_the_data_is_a_reported_bad_file(tmp_path, capsys, monkeypatch):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=2, n_val=1)
    os.mkfifo(root / "train/a/fifo.JPEG")
    os.mkfifo(root / "train/a/named.txt")
    (root / "train/b/zero.png").symlink_to("/dev/zero")
    (root / "val/a/link_to_fifo.jpg").symlink_to(root / "train/a/fifo.JPEG")
    sock = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(root / "train/b")
    sock.bind("sock.jpg")  # relative: an AF_UNIX path holds 108 bytes at most
    result = {}
    scan = threading.Thread(target=lambda: result.update(ds=scan_dataset(root)), daemon=True)
    scan.start()
    scan.join(60)
    sock.close()
    assert not scan.is_alive(), "the scan hangs on a FIFO"
    reasons = {os.path.basename(p): r for p, r in result["ds"].skipped}
    assert reasons == {
        "fifo.JPEG": "not a regular file (a FIFO)",
        "named.txt": "not a regular file (a FIFO)",
        "zero.png": "not a regular file (a character device)",
        "sock.jpg": "not a regular file (a socket)",
        "link_to_fifo.jpg": "not a regular file (a FIFO)",
    }
    assert len(result["ds"].train) == 4 and len(result["ds"].val) == 2
    # a file checked directly (one swapped for a FIFO after the listing): never blocks
    assert check_file(str(root / "train/a/fifo.JPEG")) == "not a regular file (a FIFO)"
    assert check_files([str(root / "train/a/fifo.JPEG")], root=root, cache_root=None) == {
        str(root / "train/a/fifo.JPEG"): "not a regular file (a FIFO)"
    }
    code, out, err = run_cli(["check-data", root], capsys)
    assert code == 0 and "fifo.JPEG  (not a regular file (a FIFO))" in out


# -- issue 24: control characters in names, empty val classes, a run folder in train/ -------------

NAMES = ["tab\there.png", "new\nline.png", "esc\x1b[31mred.png", "back\\slash.png",
         "cr\rx.png", "sep\u2028x.png", os.fsdecode(b"latin\xe9.png")]  # fmt: skip


def test_escaping_round_trips_every_name():
    from dalikd.errors import escape_text, unescape_text

    for name in [*NAMES, "plain.png", "\\x41", "\\\\n", "a\\", "\x85\x1c\x7f"]:
        escaped = escape_text(name, backslash=True)
        assert escaped.isprintable() and len(escaped.splitlines()) == 1, escaped
        assert unescape_text(escaped) == name
    assert escape_text("tab\there") == "tab\\there" and escape_text("a\\n") == "a\\n"
    assert escape_text(os.fsdecode(b"\xe9")) == "\\xe9" and escape_text("\x1b") == "\\u001b"


def test_control_characters_in_names_never_split_a_report_row(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=2, n_val=1)
    for name in NAMES:
        (root / "train/a" / name).write_bytes(b"")  # empty: left out, so named in the report
    ds = scan_dataset(root)
    run = tmp_path / "run"
    run.mkdir()
    failed = {str(root / "train/b" / n): f"failed in training (epoch 1, step 1): {n}"
              for n in NAMES}  # fmt: skip
    recovery.write_report(run, ds.skipped + tuple(failed.items()))
    lines = (run / "data_report.tsv").read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 2 + len(ds.skipped) + len(failed)
    assert all(line.count("\t") == 1 for line in lines[:-1])
    assert recovery.read_report(run) == failed  # exactly the paths written
    # check-data and error lines: escaped, one line each, no terminal escape
    code, out, err = run_cli(["check-data", root], capsys)
    assert code == 0 and "\x1b" not in out and "new\\nline.png  (empty file)" in out
    assert "tab\\there.png  (empty file)" in out and "latin\ufffd.png  (file name is not" in out
    code, out, err = run_cli(["check-data", tmp_path / "no\nsuch\x1b[2J"], capsys)
    _one_line(code, out, err, "no\\nsuch\\u001b[2J")


def test_empty_val_class_folders_are_not_files_left_out(tmp_path, capsys, tiny_env):
    root = make_dataset(tmp_path / "d", classes=("a", "b", "c"), n_train=4, n_val=1)
    for f in (root / "val/c").iterdir():
        f.unlink()
    ds = scan_dataset(root)
    assert ds.skipped == () and ds.empty_val == (str(root / "val/c"),)
    code, out, err = run_cli(["check-data", root], capsys)
    assert code == 0 and "0 files left out" in out
    assert (
        f"1 val class folder(s) hold no image, so those classes are not validated: {root}/val/c"
        in out
    )
    code, out, err = run_cli(["train", "--data", root, "--student", "tiny_models:tiny_cnn",
                              "--epochs", "1", "--image-size", "16", "--batch-size", "4",
                              "--threads", "1", "--device", "cpu", "--out", tmp_path / "r"],
                             capsys)  # fmt: skip
    assert code == 0, err
    assert "left out" not in out + err


def test_out_inside_train_is_refused_as_what_it_is(tmp_path, capsys, tiny_env):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), n_train=4, n_val=1)
    train = ["train", "--student", "tiny_models:tiny_cnn", "--image-size", "16", "--batch-size",
             "4", "--threads", "1", "--device", "cpu", "--data", root]  # fmt: skip
    for inside in (root / "train/run", root / "val/run", root / "train/a/run"):
        _one_line(
            *run_cli([*train, "--out", inside], capsys),
            f"--out {inside} is inside the dataset's",
            "put the run outside the dataset",
        )
        assert not inside.exists()
    # a run folder left there (by an older dalikd, or moved in): named as such by the scan
    (root / "train/old_run").mkdir()
    (root / "train/old_run/config.json").write_text("{}")
    _one_line(
        *run_cli([*train, "--out", tmp_path / "r"], capsys),
        f"{root}/train/old_run is a dalikd run folder inside the dataset's train/",
    )

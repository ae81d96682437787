"""`dalikd data import`: the official archives (small fakes of their layouts) into raw folders,
pixel- and label-exact, atomic, with one-line errors for wrong or damaged archives."""

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from fake_archives import make_cifar10, make_cifar100, make_tiny, py2_pickle
from PIL import Image
from tests_helpers import run_cli

from dalikd import dataimport
from dalikd.archives import restricted_load
from dalikd.dataimport import DATASETS, import_dataset, temp_folder
from dalikd.errors import DalikdError
from dalikd.manifest import RAW_EXTENSION, class_folders, read_manifest


class Recorder:
    def __init__(self):
        self.messages, self.phases = [], {}

    def progress(self, phase, done, total):
        assert 0 <= done <= total
        self.phases[phase] = (done, total)

    def message(self, text):
        self.messages.append(text)


def listing(out, split):
    """(class folder, stem, pixels) of every file of a split, in sorted order."""
    rows = []
    for folder in sorted(os.listdir(out / split)):
        for name in sorted(os.listdir(out / split / folder)):
            assert name.endswith(RAW_EXTENSION)
            data = (out / split / folder / name).read_bytes()
            rows.append((folder, name[: -len(RAW_EXTENSION)], data))
    return rows


def check_cifar(out, source, image_shape=(32, 32, 3)):
    classes = source["classes"]
    assert tuple(sorted(os.listdir(out / "train"))) == class_folders(classes) == classes
    for split in ("train", "val"):
        pixels, labels = source[split]
        rows = listing(out, split)
        assert sorted(int(stem) for _, stem, _ in rows) == list(range(len(labels)))
        for folder, stem, data in rows:  # every file: its class and its pixels, exactly
            i = int(stem)
            assert folder == classes[labels[i]]
            got = np.frombuffer(data, np.uint8).reshape(image_shape)
            assert np.array_equal(got, pixels[i])


def test_cifar100_pixels_labels_and_manifest(tmp_path):
    archive, source = make_cifar100(tmp_path / "cifar-100-python.tar.gz")
    out = tmp_path / "c100"
    rec = Recorder()
    manifest = import_dataset("cifar100", archive, out, rec)
    check_cifar(out, source)
    assert read_manifest(out) == manifest
    assert manifest.name == "cifar100" and manifest.layout == "folder"
    assert manifest.codec == "raw" and manifest.image_shape == (32, 32, 3)
    assert manifest.classes == source["classes"]
    assert manifest.splits["train"].samples == 12 and manifest.splits["train"].per_class == (3,) * 4
    assert manifest.splits["val"].per_class == (2,) * 4
    assert manifest.data_defaults == {
        "image_size": 32, "base_view": "pad_crop", "pad": 4,
        "mean": [129.3105, 124.1085, 112.404], "std": [68.2125, 65.4075, 70.4055],
        "val_transform": "none",
    }  # fmt: skip
    assert manifest.source == {
        "archive": "cifar-100-python.tar.gz",
        "bytes": archive.stat().st_size,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
    }
    assert rec.phases["writing train"] == (12, 12) and rec.phases["writing val"] == (8, 8)
    assert any(p.startswith("reading") for p in rec.phases)
    # 12 train images of 4 classes, not the official 50,000 of 100: said, and imported
    assert len(rec.messages) == 1 and "the official archive holds 50,000" in rec.messages[0]
    assert not temp_folder(out).exists()


def test_cifar10_rows_follow_the_five_batches(tmp_path):
    archive, source = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "c10"
    manifest = import_dataset("cifar10", archive, out)
    check_cifar(out, source)
    assert manifest.splits["train"].samples == 15 and manifest.data_defaults["pad"] == 4
    assert manifest.data_defaults["mean"] == [125.307, 122.961, 113.8575]


def test_tiny_imagenet_sorted_wnids_val_annotations_and_pixels(tmp_path):
    archive, source = make_tiny(tmp_path / "tiny-imagenet-200.zip")
    out = tmp_path / "tiny"
    manifest = import_dataset("tiny-imagenet", archive, out)
    classes = source["classes"]  # sorted wnids, whatever wnids.txt's order
    assert manifest.classes == classes and tuple(sorted(os.listdir(out / "train"))) == classes
    assert manifest.image_shape == (64, 64, 3)
    assert manifest.data_defaults["image_size"] == 64 and manifest.data_defaults["pad"] == 8
    assert manifest.data_defaults["mean"] == [123.675, 116.28, 103.53]
    for split in ("train", "val"):
        rows = listing(out, split)
        assert sorted(stem for _, stem, _ in rows) == sorted(source[split])  # test/ left out
        for folder, stem, data in rows:
            wnid, jpeg = source[split][stem]
            assert folder == wnid
            want = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            assert np.array_equal(np.frombuffer(data, np.uint8).reshape(64, 64, 3), want)
    first = (out / "train" / "n09999999" / f"n09999999_0{RAW_EXTENSION}").read_bytes()
    grey = np.frombuffer(first, np.uint8).reshape(64, 64, 3)  # wnids.txt's first class
    assert grey.std() > 0 and (grey == grey[..., :1]).all()  # a greyscale JPEG: R = G = B
    assert manifest.splits["val"].per_class == (2, 2, 2)


def test_the_written_files_read_in_a_dali_graph(tmp_path):
    """The format as the pipelines will read it: fn.readers.file + fn.reshape, nothing decoded
    (the folder scan does not list .hwc files yet; this is the listing the import produces)."""
    from nvidia.dali import fn, pipeline_def

    archive, source = make_cifar100(tmp_path / "a.tar.gz", train_per_class=2)
    out = tmp_path / "c100"
    import_dataset("cifar100", archive, out)
    folders = sorted(os.listdir(out / "train"))
    files = [
        str(out / "train" / f / n) for f in folders for n in sorted(os.listdir(out / "train" / f))
    ]
    labels = [folders.index(os.path.basename(os.path.dirname(f))) for f in files]

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def graph():
        data, label = fn.readers.file(files=files, labels=labels)
        return fn.reshape(data, shape=[32, 32, 3], layout="HWC"), label

    pipe = graph()
    pipe.build()
    images, got_labels = pipe.run()
    pixels, want_labels = source["train"]
    for k, path in enumerate(files):
        i = int(os.path.basename(path)[: -len(RAW_EXTENSION)])
        assert np.array_equal(np.asarray(images[k]), pixels[i])
        assert int(np.asarray(got_labels[k])[0]) == want_labels[i]


# -- the restricted unpickler ----------------------------------------------------------------


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"data": Evil(marker)}, protocol=2)
    assert b"system" in blob
    with pytest.raises(pickle.UnpicklingError, match=r"refusing (posix|os)\.system"):
        restricted_load(blob)
    assert not marker.exists()
    # the same inside an archive: one line naming the archive and member, nothing run
    archive, _ = make_cifar100(
        tmp_path / "evil.tar.gz",
        edit=lambda m, d: d.update(data=Evil(marker)) if m == "train" else None,
    )
    out = tmp_path / "out"
    with pytest.raises(DalikdError) as e:
        import_dataset("cifar100", archive, out)
    assert "member cifar-100-python/train is not a CIFAR pickle" in str(e.value)
    assert "refusing" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists() and not out.exists() and not temp_folder(out).exists()


def test_restricted_unpickler_reads_what_the_official_files_hold():
    d = {b"data": np.arange(3072 * 2, dtype=np.uint64).astype(np.uint8).reshape(2, 3072),
         b"fine_labels": [3, 1], b"filenames": [b"x.png", b"y.png"]}  # fmt: skip
    loaded = restricted_load(py2_pickle(d))
    assert loaded["fine_labels"] == [3, 1] and loaded["filenames"] == ["x.png", "y.png"]
    assert np.array_equal(loaded["data"], d[b"data"])
    # protocol 2 as Python 3 writes it (bytes through _codecs.encode), and protocol 4
    for protocol in (2, 4):
        again = restricted_load(pickle.dumps({"data": d[b"data"], "b": b"\x00\xff"}, protocol))
        assert np.array_equal(again["data"], d[b"data"]) and again["b"] == b"\x00\xff"


# -- wrong or damaged archives -----------------------------------------------------------------


def _truncated(path, tmp_path):
    cut = tmp_path / f"cut-{path.name}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return cut


def _bad_labels(member, d):
    if member == "train":
        d["fine_labels"] = d["fine_labels"][:-1]


def _label_out_of_range(member, d):
    if member == "test":
        d["fine_labels"][0] = 4


WRONG = [  # (dataset, make archive (tmp_path -> path), expected message part)
    ("cifar100", lambda t: make_cifar10(t / "cifar-10-python.tar.gz")[0],
     "has no member cifar-100-python/train; expected the official cifar-100-python.tar.gz "
     "(it holds cifar-10-batches-py/: import it as cifar10)"),
    ("cifar10", lambda t: make_cifar100(t / "c.tar.gz")[0], "import it as cifar100"),
    ("cifar100", lambda t: make_tiny(t / "tiny.zip")[0], "is a zip file, not the tar.gz archive"),
    ("tiny-imagenet", lambda t: make_cifar100(t / "c.tar.gz")[0],
     "is a gzip file, not the zip archive expected"),
    ("cifar100", lambda t: _truncated(make_cifar100(t / "c.tar.gz")[0], t), "damaged or truncated"),
    ("tiny-imagenet", lambda t: _truncated(make_tiny(t / "t.zip")[0], t), "damaged or truncated"),
    ("cifar100", lambda t: make_cifar100(t / "c.tar.gz", drop="meta")[0],
     "has no member cifar-100-python/meta"),
    ("cifar100", lambda t: make_cifar100(t / "c.tar.gz", edit=_bad_labels)[0],
     "member cifar-100-python/train has 12 images but 11 labels"),
    ("cifar100", lambda t: make_cifar100(t / "c.tar.gz", edit=_label_out_of_range)[0],
     "has a label outside 0..3"),
    ("tiny-imagenet", lambda t: make_tiny(t / "t.zip", drop="val/val_annotations.txt")[0],
     "has no member tiny-imagenet-200/val/val_annotations.txt"),
    ("tiny-imagenet", lambda t: make_tiny(t / "t.zip", drop="wnids.txt")[0],
     "has no member tiny-imagenet-200/wnids.txt"),
    ("tiny-imagenet", lambda t: make_tiny(t / "t.zip", odd_size=True)[0],
     "is 32x32 px; Tiny-ImageNet's images are 64x64"),
    ("tiny-imagenet", lambda t: make_tiny(t / "t.zip", drop="val/images/val_1.JPEG")[0],
     "val_annotations.txt line 2 names an unknown image 'val_1.JPEG'"),
    ("cifar100", lambda t: t / "absent.tar.gz", "archive not found"),
]  # fmt: skip


@pytest.mark.parametrize(("dataset", "make", "expected"), WRONG, ids=[w[2][:40] for w in WRONG])
def test_a_wrong_archive_is_one_line(tmp_path, dataset, make, expected):
    archive = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DalikdError) as e:
        import_dataset(dataset, archive, out)
    message = str(e.value)
    assert expected in message and "\n" not in message
    assert str(archive) in message
    assert not out.exists() and not temp_folder(out).exists()


# -- atomic output ---------------------------------------------------------------------------


def test_a_failure_mid_import_leaves_nothing_at_out(tmp_path, monkeypatch):
    archive, _ = make_cifar100(tmp_path / "c.tar.gz")
    out = tmp_path / "out"
    written = []
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if "x" in mode and len(written) == 5:  # the sixth image: a full disk
            raise OSError(28, "No space left on device", str(path))
        written.append(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(dataimport, "open", failing_open, raising=False)
    with pytest.raises(DalikdError, match="cannot write .*: No space left on device"):
        import_dataset("cifar100", archive, out)
    assert len(written) == 5 and not out.exists() and not temp_folder(out).exists()

    def interrupted(path, mode="r", *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataimport, "open", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        import_dataset("cifar100", archive, out)
    assert not out.exists() and not temp_folder(out).exists()


def test_a_killed_import_leaves_no_dataset_and_the_next_cleans_up(tmp_path):
    archive, source = make_cifar100(tmp_path / "c.tar.gz")
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from dalikd.dataimport import import_dataset\n"
        "class Kill:\n"
        "    def progress(self, phase, done, total):\n"
        "        if phase == 'writing val':\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    def message(self, text): pass\n"
        "import_dataset('cifar100', sys.argv[1], sys.argv[2], Kill())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(archive), str(out)])
    assert proc.returncode == -9
    assert not out.exists() and (temp_folder(out) / "train").is_dir()  # a leftover, hidden
    rec = Recorder()
    import_dataset("cifar100", archive, out, rec)
    assert f"removing {temp_folder(out)}, left by an import that did not finish" in rec.messages
    check_cifar(out, source)


def test_an_import_still_running_is_not_disturbed(tmp_path):
    archive, _ = make_cifar100(tmp_path / "c.tar.gz")
    out = tmp_path / "out"
    tmp = temp_folder(out)
    tmp.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            (tmp / ".pid").write_text(str(other.pid))
            with pytest.raises(
                DalikdError, match=f"another import into .* is running \\(pid {other.pid}"
            ):
                import_dataset("cifar100", archive, out)
            assert tmp.is_dir()
        finally:
            other.kill()


def test_out_must_be_new_or_empty(tmp_path):
    archive, source = make_cifar100(tmp_path / "c.tar.gz")
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    with pytest.raises(DalikdError, match="is not empty; give a new or empty folder"):
        import_dataset("cifar100", archive, full)
    (tmp_path / "file").write_text("")
    with pytest.raises(DalikdError, match="is a file"):
        import_dataset("cifar100", archive, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    import_dataset("cifar100", archive, empty)
    check_cifar(empty, source)


# -- class folders and the command ------------------------------------------------------------


def test_class_folders_sort_into_label_order():
    assert class_folders(("apple", "bear", "cat")) == ("apple", "bear", "cat")
    for names in [("bear", "apple"), ("a/b", "c"), (".hidden", "x"), ("x", "x")]:
        folders = class_folders(names)
        assert sorted(folders) == list(folders) and len(set(folders)) == len(names)
        assert "/" not in "".join(folders) and not any(f.startswith(".") for f in folders)
    assert class_folders(tuple(f"c{11 - i}" for i in range(12)))[:2] == ("00_c11", "01_c10")


def test_unsorted_class_names_import_into_numbered_folders(tmp_path):
    archive, source = make_cifar100(tmp_path / "c.tar.gz", classes=("zebra", "ant", "moth"))
    out = tmp_path / "out"
    manifest = import_dataset("cifar100", archive, out)
    assert manifest.classes == ("zebra", "ant", "moth")  # the true names, in label order
    folders = sorted(os.listdir(out / "train"))
    assert folders == ["0_zebra", "1_ant", "2_moth"]
    _, labels = source["train"]
    for folder, stem, _ in listing(out, "train"):
        assert folders.index(folder) == labels[int(stem)]


def test_command(tmp_path, capsys):
    archive, source = make_cifar100(tmp_path / "cifar-100-python.tar.gz")
    out = tmp_path / "c100"
    code, stdout, err = run_cli(["data", "import", "cifar100", archive, out], capsys)
    assert code == 0, err
    assert f"imported cifar100 into {out}: 12 train, 8 val images, 4 classes" in stdout
    assert "the official archive holds 50,000" in stdout
    check_cifar(out, source)
    code, _, err = run_cli(["data", "import", "cifar100", archive, out], capsys)
    assert code == 1 and err.count("\n") == 1 and "is not empty" in err
    code, _, err = run_cli(["data", "import", "cifar1000", archive, tmp_path / "x"], capsys)
    assert code == 2 and "cifar1000" in err


def test_command_choices_are_the_library_datasets():
    from dalikd.cli.data_cmd import import_cmd

    assert tuple(import_cmd.params[0].type.choices) == DATASETS


def test_cifar_tar_member_order_does_not_matter(tmp_path):
    """Members in another order than the official one (meta first, then test, train), named
    with a leading ./ as a re-packed archive may be."""
    archive, source = make_cifar100(tmp_path / "c.tar.gz")
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    reordered = tmp_path / "r.tar.gz"
    with tarfile.open(reordered, "w:gz") as tar:
        for m, data in reversed(members):
            m.name = f"./{m.name}"
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    import_dataset("cifar100", reordered, tmp_path / "out")
    check_cifar(tmp_path / "out", source)

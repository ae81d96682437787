import pytest
from tests_helpers import touch_image

from dalikd.data import scan_dataset
from dalikd.errors import DalikdError


def test_labels_follow_sorted_class_folders(solid_dataset):
    ds = scan_dataset(solid_dataset)
    assert ds.classes == ("ant", "bee", "cat")
    for path, label in zip(ds.train.files, ds.train.labels, strict=True):
        assert path.split("/")[-2] == ds.classes[label]
    assert len(ds.train) == 24 and len(ds.val) == 15


def test_non_images_are_skipped_and_case_is_ignored(tmp_path):
    for split in ("train", "val"):
        touch_image(tmp_path / split / "a" / "x.JPEG")
        touch_image(tmp_path / split / "a" / "y.png")
        (tmp_path / split / "a" / "notes.txt").write_text("hi")
    ds = scan_dataset(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in ds.train.files] == ["x.JPEG", "y.png"]


def test_val_class_missing_from_train_is_refused(tmp_path):
    touch_image(tmp_path / "train" / "a" / "x.jpg")
    touch_image(tmp_path / "val" / "b" / "x.jpg")
    with pytest.raises(DalikdError, match="class that train/ does not have"):
        scan_dataset(tmp_path)


def test_val_may_lack_a_class_and_keeps_train_indices(tmp_path):
    for name in ("a", "b"):
        touch_image(tmp_path / "train" / name / "x.jpg")
    touch_image(tmp_path / "val" / "b" / "x.jpg")
    assert scan_dataset(tmp_path).val.labels == (1,)


@pytest.mark.parametrize(
    "layout, message",
    [
        ([], "dataset folder not found"),
        (["train/a/x.jpg"], "has no val/ folder"),
        (["val/a/x.jpg"], "has no train/ folder"),
        (["train/a/x.txt", "val/a/x.jpg"], "train holds no usable images"),
    ],
)
def test_bad_layouts(tmp_path, layout, message):
    root = tmp_path / "data"
    for rel in layout:
        touch_image(root / rel)
    with pytest.raises(DalikdError, match=message):
        scan_dataset(root)

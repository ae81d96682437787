import json

import pytest

from dalikd.errors import DalikdError
from dalikd.manifest import Manifest, Shard, SplitInfo, read_manifest, write_manifest


def _manifest() -> Manifest:
    return Manifest(
        name="tiny",
        layout="shards",
        codec="raw",
        classes=("a", "b"),
        splits={
            "train": SplitInfo(5, (3, 2), (Shard("train-00000.tar", 5, 1234, "ab" * 32),)),
            "val": SplitInfo(2, (1, 1)),
        },
        image_shape=(32, 32, 3),
        data_defaults={"image_size": 32, "mean": [1.0, 2.0, 3.0]},
        source={"archive": "x.tar.gz"},
    )


def test_round_trip(tmp_path):
    m = _manifest()
    write_manifest(m, tmp_path)
    assert read_manifest(tmp_path) == m
    assert not list(tmp_path.glob("*.tmp"))


def test_absent_is_none(tmp_path):
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(format=99),
        lambda d: d.update(layout="zip"),
        lambda d: d["splits"]["train"].update(samples=6),  # per_class no longer sums to it
        lambda d: d.update(image_shape=None),  # raw without a shape
        lambda d: d.pop("classes"),
    ],
)
def test_damaged_is_one_line(tmp_path, edit):
    write_manifest(_manifest(), tmp_path)
    path = tmp_path / "dataset.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(DalikdError) as e:
        read_manifest(tmp_path)
    assert "dataset.json" in str(e.value) and "\n" not in str(e.value)


def test_not_json_is_one_line(tmp_path):
    (tmp_path / "dataset.json").write_bytes(b"\xff\x00not json")
    with pytest.raises(DalikdError, match="cannot read"):
        read_manifest(tmp_path)

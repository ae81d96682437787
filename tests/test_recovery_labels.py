"""Sample positions have their own name: an ``indexed`` loader hands each batch's positions in its
file list over as ``Batch.index`` (on the CPU) and the labels looked up from them on the CPU and
moved to the device once; TrainData finds a failed batch's files from ``index`` and never reads
a device tensor on the host. On CPU a "device tensor" is a tensor subclass whose host reads
raise (.cpu, .item, .tolist)."""

from __future__ import annotations

from pathlib import Path

import torch

from dalikd import loaders, recovery
from dalikd.batch import Batch
from dalikd.config import DataConfig
from dalikd.data import Dataset, Split, scan_dataset
from dalikd.plan import resolve_plan


class DeviceTensor(torch.Tensor):
    """Stands for a tensor on the GPU: reading it on the host would be a blocking sync."""

    def cpu(self, *a, **k):
        raise AssertionError("a device tensor copied to the host (.cpu)")

    def item(self):
        raise AssertionError("a device tensor read on the host (.item)")

    def tolist(self):
        raise AssertionError("a device tensor read on the host (.tolist)")

    def numpy(self, *a, **k):
        raise AssertionError("a device tensor read on the host (.numpy)")


class FakeLoader:
    """Batches of two samples: positions on CPU (only when asked for), labels on the "device"."""

    def __init__(self, split: Split, indexed: bool):
        self.split, self.indexed = split, indexed

    def __len__(self) -> int:
        return len(self.split) // 2

    def __iter__(self):
        for i in range(len(self)):
            index = torch.tensor([2 * i, 2 * i + 1], dtype=torch.int64)
            labels = torch.tensor([self.split.labels[j] for j in index.tolist()])
            yield Batch(images=torch.zeros(2, 4, 4, 3, dtype=torch.uint8),
                        labels=labels.as_subclass(DeviceTensor),
                        index=index if self.indexed else None)  # fmt: skip

    def checkpoint(self) -> str:
        return ""


def test_train_data_reads_positions_on_cpu_and_no_device_tensor(tmp_path, monkeypatch):
    asked = []

    made = []

    def fake_train_loader(split, plan, *, indexed=False, **kw):
        asked.append(indexed)
        made.append(FakeLoader(split, indexed))
        return made[-1]

    monkeypatch.setattr(loaders, "train_loader", fake_train_loader)
    files = tuple(f"f{i}.jpg" for i in range(6))
    classes = (2, 0, 1, 1, 0, 2)
    dataset = Dataset(Path(tmp_path), ("a", "b", "c"), Split(files, classes), Split((), ()))
    plan = resolve_plan(DataConfig(path=str(tmp_path), batch_size=2), device="cpu")
    train = recovery.TrainData(recovery.FileSource(dataset.train), plan, epoch=0)
    labels = [b.labels for b in train]  # without indexed the fake gives no index: it fails
    assert asked == [True]
    assert all(type(t) is DeviceTensor for t in labels)  # handed on as they came
    # the split TrainData built carries each file's class: position i -> class of file i
    # (its files are the epoch's reads, in their order)
    read = made[0].split.files
    assert sorted(read) == sorted(files)
    assert [int(v) for t in labels for v in torch.Tensor.tolist(t.as_subclass(torch.Tensor))] == (
        [classes[files.index(f)] for f in read]
    )


def test_an_indexed_loader_maps_positions_to_labels_on_the_cpu(solid_dataset):
    ds = scan_dataset(solid_dataset)
    data = DataConfig(path=str(solid_dataset), image_size=16, batch_size=4, threads=1)
    loader = loaders.train_loader(ds.train, resolve_plan(data, device="cpu"), indexed=True)
    seen = []
    for batch in loader:
        assert batch.index.dtype == torch.int64 and batch.index.device.type == "cpu"
        assert type(batch.labels) is torch.Tensor and batch.labels.dtype == torch.int64
        assert batch.labels.tolist() == [ds.train.labels[i] for i in batch.index.tolist()]
        seen += batch.index.tolist()
    assert len(set(seen)) == len(seen) == len(loader) * 4  # each position once per epoch
    plain = next(iter(loaders.train_loader(ds.train, resolve_plan(data, device="cpu"))))
    assert plain.index is None

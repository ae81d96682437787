"""TrainData maps the loader's labels (sample indices) to classes without a GPU round trip:
the loader hands them over on CPU and TrainData moves the mapped labels to the device once.
On CPU a "device tensor" is a tensor subclass whose host reads raise (.cpu, .item, .tolist)."""

from __future__ import annotations

from pathlib import Path

import torch

from dalikd import loaders, recovery
from dalikd.batch import Batch
from dalikd.config import DataConfig
from dalikd.data import Dataset, Split


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
    """Batches of two sample indices; labels on CPU only when asked."""

    def __init__(self, split: Split, cpu_labels: bool):
        self.indices, self.cpu_labels = list(split.labels), cpu_labels

    def __len__(self) -> int:
        return len(self.indices) // 2

    def __iter__(self):
        for i in range(len(self)):
            index = torch.tensor(self.indices[2 * i : 2 * i + 2], dtype=torch.int64)
            labels = index if self.cpu_labels else index.as_subclass(DeviceTensor)
            yield Batch(images=torch.zeros(2, 4, 4, 3, dtype=torch.uint8), labels=labels)

    def checkpoint(self) -> str:
        return ""


def test_train_data_maps_labels_on_cpu_and_reads_no_device_tensor(tmp_path, monkeypatch):
    asked = []

    def fake_train_loader(split, data, recipe, *, cpu_labels=False, **kw):
        asked.append(cpu_labels)
        return FakeLoader(split, cpu_labels)

    monkeypatch.setattr(loaders, "train_loader", fake_train_loader)
    files = tuple(f"f{i}.jpg" for i in range(6))
    classes = (2, 0, 1, 1, 0, 2)
    dataset = Dataset(Path(tmp_path), ("a", "b", "c"), Split(files, classes), Split((), ()))
    train = recovery.TrainData(
        dataset, DataConfig(path=str(tmp_path), batch_size=2), None, device="cpu", seed=0,
        epoch=0, run_dir=tmp_path, reporter=None,
    )  # fmt: skip
    labels = [b.labels for b in train]
    assert asked == [True]  # without cpu_labels the fake hands over "device" labels and it fails
    assert all(type(t) is torch.Tensor and t.dtype == torch.int64 for t in labels)
    assert torch.cat(labels).tolist() == list(classes)  # index i -> class of file i

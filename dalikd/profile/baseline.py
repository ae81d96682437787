"""The baselines a DALI hand-off is compared with: torchvision's ImageFolder + DataLoader
(PIL) with the same crop, flip and normalization, torchvision v2 CutMix / MixUp for the
mixing schemes, and timm's prefetching loader."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from dalikd import loaders
from dalikd.config import DataConfig
from dalikd.errors import DalikdError
from dalikd.recipes import recipe_info, resolve

# -- torchvision baseline --------------------------------------------------------------------


class _TwoViews:
    """Per-sample transform of the baseline: x = RandomResizedCrop + flip + ToTensor +
    Normalize; with a second view, x' = the per-image augmentation of the same crop, then the
    same ToTensor + Normalize (as dalikd normalizes x' separately)."""

    def __init__(self, data: DataConfig, second: bool, pil_aug=None, tensor_aug=None):
        from torchvision import transforms as T

        self.crop = T.Compose(
            [
                T.RandomResizedCrop(
                    data.image_size, scale=data.crop_scale, ratio=data.crop_ratio, antialias=True
                ),
                T.RandomHorizontalFlip(),
            ]
        )
        self.to_tensor = T.ToTensor()
        self.normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.second, self.pil_aug, self.tensor_aug = second, pil_aug, tensor_aug

    def __call__(self, image):
        image = self.crop(image)
        x = self.normalize(self.to_tensor(image))
        if not self.second:
            return x
        aug = self.to_tensor(self.pil_aug(image) if self.pil_aug else image)
        if self.tensor_aug:
            aug = self.tensor_aug(aug)
        return x, self.normalize(aug)


class _MixCollate:
    """Batches (x, x') samples and mixes x' over the batch with v2 CutMix / MixUp, in the
    workers (the usage torchvision documents). ``k`` > 1 makes a pool: k independent mixes,
    concatenated view-major as dalikd's Loader hands them over."""

    def __init__(self, mix, k: int):
        self.mix, self.k = mix, k

    def __call__(self, samples):
        from torch.utils.data import default_collate

        (x, aug), labels = default_collate(samples)
        views = [self.mix(aug, labels)[0] for _ in range(self.k)]
        return x, views[0] if self.k == 1 else torch.cat(views), labels


def torchvision_parts(name: str, data: DataConfig, num_classes: int):
    """The torchvision equivalent a recipe declares (``@recipe(torchvision=NAME)``) as
    (PIL aug, tensor aug, batch mix); None for "" (no baseline for the scheme)."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    s = data.image_size
    hole = (s // 4) ** 2 / s**2  # cutout: one (S/4)² hole, filled with the mean
    cutmix = v2.CutMix(alpha=1.0, num_classes=num_classes)
    table = {
        "identity": (None, None, None),
        "RandomHorizontalFlip": (T.RandomHorizontalFlip(), None, None),
        "RandomCrop+RandomHorizontalFlip": (
            T.Compose([T.RandomCrop(s, padding=s // 8), T.RandomHorizontalFlip()]),
            None,
            None,
        ),
        "RandomErasing": (
            None,
            T.RandomErasing(
                p=1.0, scale=(hole, hole), ratio=(1.0, 1.0), value=(0.485, 0.456, 0.406)
            ),
            None,
        ),
        "AutoAugment(IMAGENET)": (T.AutoAugment(T.AutoAugmentPolicy.IMAGENET), None, None),
        "AutoAugment(CIFAR10)": (T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), None, None),
        "AutoAugment(SVHN)": (T.AutoAugment(T.AutoAugmentPolicy.SVHN), None, None),
        "MixUp": (None, None, v2.MixUp(alpha=1.0, num_classes=num_classes)),
        "CutMix": (None, None, cutmix),
        "CutMix pool": (None, None, cutmix),  # k CutMix views: the pool, before the pick
    }
    return table.get(name)


def baseline_loader(aug: str, root: Path, data: DataConfig, classes: int, pool_size: int,
                    files: frozenset[str] | None = None):  # fmt: skip
    """The torchvision DataLoader of one aug (workers = DALI threads), or None when a part
    of it has no torchvision equivalent. ``files``: the ones it reads (default: every image of
    ImageFolder's), the files the scan and the profile kept."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    pil, tensor, mix, k = [], [], None, 1
    if aug != "none":
        for part in (p.strip() for p in aug.split("+")):
            equivalent = recipe_info(resolve(part)).torchvision  # the one recipe registry
            found = torchvision_parts(equivalent, data, classes)
            if found is None:
                return None
            pil += [found[0]] if found[0] else []
            tensor += [found[1]] if found[1] else []
            mix = found[2] or mix
            k = pool_size if equivalent == "CutMix pool" else k
    transform = _TwoViews(
        data,
        second=aug != "none",
        pil_aug=T.Compose(pil) if pil else None,
        tensor_aug=T.Compose(tensor) if tensor else None,
    )
    return DataLoader(
        ImageFolder(
            str(root / "train"),
            transform,
            is_valid_file=None if files is None else files.__contains__,
        ),
        batch_size=data.batch_size,
        shuffle=True,
        num_workers=data.threads,
        persistent_workers=data.threads > 0,
        drop_last=True,
        collate_fn=_MixCollate(mix, k) if mix is not None else None,
    )


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    return [_to(o, device) for o in obj]


def worker_start() -> str:
    """How the baselines' DataLoader workers start: from a clean forkserver process, not forked
    from this one, which runs DALI's threads (a worker forked from it can inherit a lock one of
    them holds and hang; seen under load). Fork only where a worker could not import this
    process's ``__main__`` again (a script read from stdin)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None or os.path.isfile(path):
        return "forkserver"
    return "fork"


class BaselineStream:
    """Endless batches of a DataLoader, moved to the training device as DALI's would be."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        if self._data_loader().num_workers > 0:
            self._data_loader().multiprocessing_context = worker_start()
        self._it = self._batches()

    def _batches(self):
        while True:
            for batch in self.loader:
                yield _to(batch, self.device)

    def step(self) -> None:
        try:
            next(self._it)
        except (OSError, RuntimeError, ValueError) as e:  # PIL is stricter than DALI's decoder
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise DalikdError(
                f"the baseline's PIL could not read an image DALI decodes ({first}); profile "
                "with --baseline none, or find it with: dalikd check-data DIR --decode"
            ) from None

    def _data_loader(self):
        """The DataLoader itself (timm's PrefetchLoader wraps it as .loader)."""
        return getattr(self.loader, "loader", self.loader)

    def _iterator(self):
        # DataLoader does not expose its worker processes; read them where they are today
        return getattr(self._data_loader(), "_iterator", None)

    def _workers(self) -> list:
        return getattr(self._iterator(), "_workers", None) or []

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers() if getattr(w, "pid", None)]

    def close(self) -> None:
        """Stop the workers now: left to garbage collection, a worker holding prefetched
        batches took 5 s (DataLoader's join timeout) to go."""
        self._it.close()
        shutdown = getattr(self._iterator(), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def timm_stream(root: Path, data: DataConfig, device: str) -> BaselineStream | None:
    """timm's own training loader (``timm.data.create_loader`` with its prefetcher: uint8
    collate, normalization after, on the training device) with the same random-resized crop
    (bilinear, PIL: antialiased) and flip, no colour jitter; None without timm."""
    try:
        from timm.data import ImageDataset, create_loader
    except ImportError:
        return None
    loader = create_loader(
        ImageDataset(str(root / "train")),
        input_size=(3, data.image_size, data.image_size),
        batch_size=data.batch_size,
        is_training=True,
        scale=data.crop_scale,
        ratio=data.crop_ratio,
        hflip=0.5,
        color_jitter=0.0,
        interpolation="bilinear",
        num_workers=data.threads,
        device=loaders.torch_device(device),
        use_prefetcher=True,
        persistent_workers=data.threads > 0,
    )
    return BaselineStream(loader, loaders.torch_device(device))

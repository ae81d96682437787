"""Stage-by-stage throughput of the data path and the KD step (``dalikd profile``).

Units: every rate is in *training samples per second* (B samples per batch), whatever the stage
handles per sample (x alone, x and x', or x and a pool of k candidates), so any two stages
compare directly. Each stage is timed alone: warm-up batches first, then ``windows`` windows of
at least ``window_seconds`` each; the rate is the median window. CPU time per sample (this
process, all threads; plus the DataLoader workers for the baseline) comes with every stage: it
stays meaningful on a machine that other work shares.

The DALI stages are cumulative (read; + decode and random crop; + resize; + flip = the plain
training pipeline, uint8 out; + the scheme's x'; + the hand-off to torch and the normalization
on the training device), so a stage's own cost is the difference of the inverse rates; the
stage with the largest own cost bounds the scheme. The model stages (teacher forward, student
forward + backward) and the KD step on synthetic tensors in memory are timed alone; the KD step
fed by the pipeline is the real thing.
Data-loading efficiency = fed step / synthetic step.

``ratio`` = DALI hand-off rate / baseline rate per scheme (the headline); ``cpu_ratio`` =
baseline CPU time / DALI CPU time per sample, the same comparison in work done, which a busy
machine disturbs much less.

The torchvision baseline is the usual ImageFolder + DataLoader (PIL) with as many workers as
DALI has threads, the same RandomResizedCrop (antialiased), flip and normalize, and
``torchvision.transforms.v2`` CutMix / MixUp for the mixing schemes. It is timed in windows
interleaved with DALI's hand-off of the same scheme, so a machine that gets busier slows both.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dalikd import __version__, pipeline
from dalikd.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig, validate
from dalikd.data import Dataset, scan_dataset
from dalikd.device import autocast, prepare_batch, prepare_images, resolve_device
from dalikd.errors import DalikdError
from dalikd.models import input_norm
from dalikd.pick import pick_count
from dalikd.recipes import Recipe, builtin_recipes, recipe_info, resolve
from dalikd.step import Distiller, make_optimizer

BASELINES = ("torchvision", "none")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileConfig:
    data: str  # dataset root with train/<class>/* (val/ is scanned but not read)
    augs: str = "all"  # comma-separated --aug values; "all" = every built-in recipe
    device: str = "auto"  # auto | cpu | gpu
    batch_size: int = 32  # samples per batch, B
    threads: int = 0  # DALI threads = torchvision workers; 0 = one per core, at most 8
    image_size: int = 224  # px, side of the square training images
    antialias: bool = True  # as torchvision's RandomResizedCrop; False is a separate, faster mode
    teacher: str = ""  # model name; empty: no teacher stages
    student: str = ""  # model name; empty: no model stages, no KD step
    baseline: str = "torchvision"  # torchvision | none
    pool: int = 2  # k, CutMixPick candidates per sample (the paper: 2)
    windows: int = 5  # timed windows per stage; the median is reported
    window_seconds: float = 1.0  # s, minimum length of one timed window (at least one batch)
    warmup: int = 3  # batches run before timing a stage
    seed: int = 0


@dataclass(frozen=True)
class Scheme:
    """One --aug value to profile."""

    name: str
    recipe: Recipe | None  # None: plain KD, no x'
    mixing: bool = False


@dataclass
class Timing:
    img_per_s: float  # median window, samples/s
    windows: list[float] = field(default_factory=list)  # every window's rate, samples/s
    cpu_ms_per_img: float | None = None  # CPU time per sample over all windows, ms


# -- schemes -------------------------------------------------------------------------------------


def resolve_schemes(spec: str) -> list[Scheme]:
    """The schemes to profile; plain KD ("none") always comes first, as the reference.
    ``all`` = every built-in recipe, so new recipes are profiled without a change here."""
    names = [n.strip() for n in spec.split(",")]
    if any(not n for n in names):
        raise DalikdError(f"--aug '{spec}' has an empty item; write e.g. flip,cutmix")
    if "all" in names:
        names = [n for n in names if n != "all"] + list(builtin_recipes())
    schemes = [Scheme("none", None)]
    for name in dict.fromkeys(names):  # keeps order, drops repeats
        recipe = resolve(name)  # unknown names fail here, with the list of known ones
        if recipe is not None:
            schemes.append(Scheme(name, recipe, mixing=recipe_info(recipe).mixing))
    return schemes


# -- timing --------------------------------------------------------------------------------------


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of other processes, from /proc; 0 where unreadable."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class _Runner:
    """One thing to time: ``step()`` handles one batch of ``samples`` samples."""

    step: Callable[[], Any]
    samples: int
    sync: Callable[[], None] = lambda: None  # waits for queued device work
    pids: Callable[[], list[int]] = list  # helper processes whose CPU time counts

    def window(self, seconds: float, min_calls: int = 1) -> tuple[float, int, float]:
        """Run at least ``seconds`` and ``min_calls`` batches: (seconds, samples, cpu s)."""
        pids = self.pids()
        cpu0 = time.process_time() + _cpu_seconds(pids)
        t0 = time.perf_counter()
        calls = 0
        while calls < min_calls or time.perf_counter() - t0 < seconds:
            self.step()
            calls += 1
        self.sync()
        elapsed = time.perf_counter() - t0
        return elapsed, calls * self.samples, time.process_time() + _cpu_seconds(pids) - cpu0


def _timing(parts: list[tuple[float, int, float]]) -> Timing:
    rates = [n / t for t, n, _ in parts]
    samples = sum(n for _, n, _ in parts)
    cpu = sum(c for _, _, c in parts)
    return Timing(statistics.median(rates), rates, 1e3 * cpu / samples if samples else None)


def time_alone(run: _Runner, cfg: ProfileConfig) -> Timing:
    """Warm-up batches, then ``cfg.windows`` timed windows."""
    run.window(0.0, cfg.warmup)
    return _timing([run.window(cfg.window_seconds) for _ in range(cfg.windows)])


def time_interleaved(
    runs: dict[str, _Runner], cfg: ProfileConfig, settle_seconds: float = 0.0
) -> dict[str, Timing]:
    """Round-robin windows of several runs, so a machine whose load drifts (other jobs) slows
    them alike and their ratios hold.

    Before each window a run settles (``warmup`` batches and ``settle_seconds``): the previous
    run's prefetching threads or DataLoader workers finish their queued batches then, not in
    this window. DALI queues two batches ahead; a DataLoader two per worker.
    """
    parts: dict[str, list] = {name: [] for name in runs}
    for run in runs.values():
        run.window(0.0, cfg.warmup)
    for _ in range(cfg.windows):
        for name, run in runs.items():
            run.window(settle_seconds, cfg.warmup)
            parts[name].append(run.window(cfg.window_seconds))
    return {name: _timing(p) for name, p in parts.items()}


# -- DALI stages (graphs return dicts of named DataNodes, see pipeline.build_pipeline) ----------


def read_graph(split, data, device):
    jpegs, labels = pipeline.read(split, shuffle=True, shard_id=0, num_shards=1)
    return {"jpegs": jpegs, "labels": labels}


def decode_graph(split, data, device):
    jpegs, labels = pipeline.read(split, shuffle=True, shard_id=0, num_shards=1)
    return {"images": pipeline.random_crop_decode(jpegs, data, device), "labels": labels}


def resize_graph(split, data, device):
    jpegs, labels = pipeline.read(split, shuffle=True, shard_id=0, num_shards=1)
    return {"images": pipeline.random_resized_crop(jpegs, data, device), "labels": labels}


def _dali_runner(graph, data: DataConfig, device: str, seed: int, **kw) -> tuple[_Runner, int]:
    """A built pipeline's run(), and how many x' views per image it emits (k for a pool)."""
    pipe, names = pipeline.build_pipeline(graph, data=data, device=device, seed=seed, **kw)
    pipe.build()
    return _Runner(pipe.run, data.batch_size), sum(n.startswith("aug_images_") for n in names)


def _forever(loader: pipeline.Loader) -> Iterator[pipeline.Batch]:
    while True:
        yield from loader


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


def _baseline_parts(name: str, data: DataConfig, num_classes: int):
    """torchvision equivalents of one built-in recipe: (PIL aug, tensor aug, batch mix), or
    None for a recipe with no known equivalent (then the scheme has no baseline)."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    s = data.image_size
    hole = (s // 4) ** 2 / s**2  # cutout: one (S/4)² hole, filled with the mean
    cutmix = v2.CutMix(alpha=1.0, num_classes=num_classes)
    table = {
        "identity": (None, None, None),
        "flip": (T.RandomHorizontalFlip(), None, None),
        "crop_flip": (
            T.Compose([T.RandomCrop(s, padding=s // 8), T.RandomHorizontalFlip()]),
            None,
            None,
        ),
        "cutout": (
            None,
            T.RandomErasing(
                p=1.0, scale=(hole, hole), ratio=(1.0, 1.0), value=(0.485, 0.456, 0.406)
            ),
            None,
        ),
        "autoaugment": (T.AutoAugment(T.AutoAugmentPolicy.IMAGENET), None, None),
        "mixup": (None, None, v2.MixUp(alpha=1.0, num_classes=num_classes)),
        "cutmix": (None, None, cutmix),
        "cutmixpick": (None, None, cutmix),  # k CutMix views: the pool, before the pick
    }
    return table.get(name)


def _baseline_loader(scheme: str, root: Path, data: DataConfig, classes: int, pool: int):
    """The torchvision DataLoader of one scheme (workers = DALI threads), or None when a part
    of it has no torchvision equivalent."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    pil, tensor, mix, k = [], [], None, 1
    if scheme != "none":
        for part in (p.strip() for p in scheme.split("+")):
            found = _baseline_parts(part, data, classes)
            if found is None:
                return None
            pil += [found[0]] if found[0] else []
            tensor += [found[1]] if found[1] else []
            mix = found[2] or mix
            k = pool if part == "cutmixpick" else k
    transform = _TwoViews(
        data,
        second=scheme != "none",
        pil_aug=T.Compose(pil) if pil else None,
        tensor_aug=T.Compose(tensor) if tensor else None,
    )
    return DataLoader(
        ImageFolder(str(root / "train"), transform),
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


class _BaselineStream:
    """Endless batches of a DataLoader, moved to the training device as DALI's would be."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self._it = self._batches()

    def _batches(self):
        while True:
            for batch in self.loader:
                yield _to(batch, self.device)

    def step(self) -> None:
        next(self._it)

    def _workers(self) -> list:
        # DataLoader does not expose its worker processes; read them where they are today.
        return getattr(getattr(self.loader, "_iterator", None), "_workers", None) or []

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers() if getattr(w, "pid", None)]

    def close(self) -> None:
        """Stop the workers now: left to garbage collection, a worker holding prefetched
        batches took 5 s (DataLoader's join timeout) to go."""
        self._it.close()
        shutdown = getattr(getattr(self.loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# -- models and the KD step ------------------------------------------------------------------


@dataclass
class _Models:
    distiller: Distiller  # the training step's models and losses
    optimizer: torch.optim.Optimizer

    def step(self, batch: pipeline.Batch) -> None:
        """The training loop's step on one batch, fp32 or bf16 (no loss scaling)."""
        self.distiller.step(batch, self.optimizer, _NO_SCALER)


def _build_models(cfg: ProfileConfig, kd: KDConfig, num_classes: int, device: str):
    """Randomly initialised models (weights do not change throughput), or None without a
    student."""
    if not cfg.student:
        if cfg.teacher:
            raise DalikdError("--teacher needs --student: the KD step trains a student")
        return None
    model = ModelConfig(student=cfg.student, teacher=cfg.teacher)
    distiller = Distiller.build(model, kd, num_classes, device, weights=False).train()
    return _Models(distiller, make_optimizer(distiller.student, OptimConfig(lr=0.01)))


_NO_SCALER = torch.amp.GradScaler(enabled=False)


def _synthetic_batch(views: int, mixing: bool, data: DataConfig, classes: int, device: str):
    """A Batch of random uint8 images already on the device, shaped as the Loader's: x' holds
    views·B rows, view-major, with per-row λ and partner for mixing schemes."""
    tdev = pipeline.torch_device(device)
    b, s = data.batch_size, data.image_size
    gen = torch.Generator().manual_seed(0)
    rows = views * b

    def pixels(n: int) -> torch.Tensor:
        return torch.randint(256, (n, s, s, 3), generator=gen, dtype=torch.uint8).to(tdev)

    return pipeline.Batch(
        images=pixels(b),
        labels=torch.randint(classes, (b,), generator=gen).to(tdev),
        aug_images=pixels(rows) if views else None,
        lam=torch.rand(rows, generator=gen).to(tdev) if views and mixing else None,
        perm=torch.randint(b, (rows,), generator=gen).to(tdev) if views and mixing else None,
        pool=max(views, 1),
    )


def _model_runners(
    views: int, mixing: bool, models: _Models, data: DataConfig, classes: int
) -> dict[str, _Runner]:
    """Teacher forward (B + views·B images: x and every x' row, a pool included), student
    forward + backward (x, and the B' rows of x' it trains on: all of them, or the pick of a
    pool), and the whole KD step on synthetic tensors already on the device."""
    distiller = models.distiller
    student, teacher = distiller.student, distiller.teacher
    device, precision, b = distiller.device, distiller.precision, data.batch_size
    batch = _synthetic_batch(views, mixing, data, classes, device)
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    runs: dict[str, _Runner] = {}
    seen = [batch.images] if batch.aug_images is None else [batch.images, batch.aug_images]
    if teacher is not None:
        teacher_input = prepare_images(torch.cat(seen), device, input_norm(teacher))

        def teacher_forward():
            with torch.no_grad(), autocast(device, precision):
                teacher(teacher_input)

        runs["teacher"] = _Runner(teacher_forward, b, sync)
    if views > 1:  # the student trains on the picked rows only
        kd = distiller.kd
        seen[1] = seen[1][: pick_count(len(seen[1]), kd.pick_count, kd.pick_fraction)]
    student_views = [prepare_images(x, device, distiller.input_norm) for x in seen]
    targets = [batch.labels.repeat(-(-len(x) // b))[: len(x)] for x in seen]

    def student_step():
        for x, y in zip(student_views, targets, strict=True):
            with autocast(device, precision):
                loss = F.cross_entropy(student(x), y)
            loss.backward()
        student.zero_grad(set_to_none=True)

    runs["student"] = _Runner(student_step, b, sync)

    def synthetic_step():
        models.step(batch)

    runs["synthetic"] = _Runner(synthetic_step, b, sync)
    return runs


# -- the profile -----------------------------------------------------------------------------


def _stage(name: str, timing: Timing, kind: str, aug: str | None = None, **extra) -> dict:
    return {
        "name": name,
        "aug": aug,
        "kind": kind,
        "img_per_s": timing.img_per_s,
        "cpu_ms_per_img": timing.cpu_ms_per_img,
        "windows": timing.windows,
        **extra,
    }


def _dataset_facts(dataset: Dataset) -> dict[str, Any]:
    sizes = [os.path.getsize(f) for f in dataset.train.files[:2000]]
    return {
        "path": str(dataset.root),
        "train_images": len(dataset.train),
        "classes": dataset.num_classes,
        "mean_file_kb": round(sum(sizes) / len(sizes) / 1024, 1),
    }


def check(cfg: ProfileConfig) -> tuple[Dataset, list[Scheme], str]:
    """Every user mistake, before anything is measured: (dataset, schemes, device)."""
    device = resolve_device(cfg.device)
    if cfg.baseline not in BASELINES:
        raise DalikdError(f"--baseline must be one of {', '.join(BASELINES)}; got {cfg.baseline}")
    if cfg.windows < 1 or cfg.window_seconds < 0 or cfg.warmup < 0:
        raise DalikdError("--windows must be >= 1, --window-seconds and --warmup >= 0")
    data = DataConfig(
        path=cfg.data, image_size=cfg.image_size, batch_size=cfg.batch_size, threads=cfg.threads
    )
    validate(TrainConfig(data=data))  # image size, batch size, threads
    dataset = scan_dataset(cfg.data)
    if len(dataset.train) < cfg.batch_size:
        raise DalikdError(
            f"{len(dataset.train)} training images make no full batch of {cfg.batch_size}; "
            "lower --batch-size"
        )
    if cfg.pool < 1:
        raise DalikdError(f"--pool must be at least 1, got {cfg.pool}")
    schemes = resolve_schemes(cfg.augs)
    if cfg.batch_size < 2 and any(s.mixing for s in schemes):
        raise DalikdError("mixing schemes need --batch-size of at least 2 (a partner)")
    return dataset, schemes, device


def run_profile(cfg: ProfileConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every stage; return the JSON-ready report (see the module docstring)."""
    dataset, schemes, device = check(cfg)
    profiler = _Profiler(cfg, dataset, device, progress or (lambda text: None))
    profiler.plain_pipeline()
    for scheme in schemes:
        profiler.scheme(scheme)
    return {
        "device": device,
        "cpu_count": _cpu_count(),
        "threads": profiler.data.threads,
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "antialias": cfg.antialias,
        "teacher": cfg.teacher or None,
        "student": cfg.student or None,
        "pool": cfg.pool,
        "windows": cfg.windows,
        "window_seconds": cfg.window_seconds,
        "dataset": _dataset_facts(dataset),
        "mixing": _mixing_path(device) if any(s.mixing for s in schemes) else "none profiled",
        "versions": _versions(),
        "stages": profiler.stages,
        "baseline": profiler.baseline,
        "ratio": profiler.ratio,
        "cpu_ratio": profiler.cpu_ratio,
        "bound": profiler.bound,
        "efficiency": profiler.efficiency,
    }


class _Profiler:
    """The stages of one profile, in the order they are measured; results accumulate here."""

    def __init__(self, cfg: ProfileConfig, dataset: Dataset, device: str, say: Progress):
        self.cfg, self.dataset, self.device, self.say = cfg, dataset, device, say
        self.data = DataConfig(
            path=cfg.data,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            threads=cfg.threads or pipeline.default_threads(),
            antialias=cfg.antialias,
        )
        # A pool is picked by teacher entropy (the paper's best); without a teacher, by the
        # student's, as `dalikd train` would require.
        criterion = "teacher_entropy" if cfg.teacher else "student_entropy"
        kd = KDConfig(pool_size=cfg.pool, pick_criterion=criterion)

        self.sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
        torch.manual_seed(cfg.seed)
        self.models = _build_models(cfg, kd, dataset.num_classes, device)
        self.stages: list[dict] = []
        self.chain: list[str] = []  # the plain pipeline's cumulative stages
        self.baseline: list[dict] = []
        self.ratio: dict[str, float] = {}
        self.cpu_ratio: dict[str, float] = {}  # baseline CPU ms / DALI CPU ms, per sample
        self.bound: dict[str, dict] = {}
        self.efficiency: dict[str, float] = {}

    def add(self, name: str, timing: Timing, kind: str, aug: str | None = None, **extra) -> str:
        self.stages.append(_stage(name, timing, kind, aug, **extra))
        return name

    def dali(self, graph, data: DataConfig | None = None, **kw) -> tuple[_Runner, int]:
        return _dali_runner(
            graph, data or self.data, self.device, self.cfg.seed, split=self.dataset.train, **kw
        )

    def plain_runner(self) -> _Runner:
        graph_kw = {"recipe": None, "shard_id": 0, "num_shards": 1}
        return self.dali(pipeline.train_graph, **graph_kw)[0]

    def plain_pipeline(self) -> None:
        """read; + decode and random crop; + resize; + flip (cumulative), in interleaved
        windows."""
        s = self.cfg.image_size
        aa = "antialias" if self.cfg.antialias else "NO antialias"
        runs = {
            "read": self.dali(read_graph)[0],
            "+ decode, random crop": self.dali(decode_graph)[0],
            f"+ resize {s}² ({aa})": self.dali(resize_graph)[0],
        }
        side = f"+ resize {s}², no antialias (option)"
        if self.cfg.antialias:  # the faster, lower-quality mode, beside the chain, never in it
            runs[side] = self.dali(resize_graph, replace(self.data, antialias=False))[0]
        runs["+ flip (plain pipeline)"] = self.plain_runner()
        self.say("the plain pipeline, stage by stage")
        for name, timing in time_interleaved(runs, self.cfg).items():
            self.add(name, timing, "side" if name == side else "data")
            if name != side:
                self.chain.append(name)

    def scheme(self, scheme: Scheme) -> None:
        """+ x' (interleaved with the plain pipeline, for its cost), the hand-off to torch
        (interleaved with the torchvision baseline), then the model stages."""
        a, cfg = scheme.name, self.cfg
        names = list(self.chain)
        runs: dict[str, _Runner] = {}
        views = 0
        if scheme.recipe is not None:  # + x' (or a pool of k candidates per image)
            runs["plain"] = self.plain_runner()
            runs["aug"], views = self.dali(
                pipeline.train_graph,
                recipe=scheme.recipe,
                shard_id=0,
                num_shards=1,
                pool_size=cfg.pool,
            )
        loader = pipeline.train_loader(
            self.dataset.train,
            self.data,
            scheme.recipe,
            device=self.device,
            seed=cfg.seed,
            pool_size=cfg.pool,
        )
        batches = _forever(loader)

        def handoff() -> None:  # what the model gets: the batch, normalized on the device
            prepare_batch(next(batches), self.device)

        runs["handoff"] = _Runner(handoff, cfg.batch_size, self.sync)
        tv = None
        if cfg.baseline == "torchvision":
            tv_loader = _baseline_loader(
                a, self.dataset.root, self.data, self.dataset.num_classes, cfg.pool
            )
            if tv_loader is not None:
                tv = _BaselineStream(tv_loader, pipeline.torch_device(self.device))
                runs["torchvision"] = _Runner(tv.step, cfg.batch_size, self.sync, tv.worker_pids)
        self.say(f"{a}: pipeline, hand-off" + (" and torchvision" if tv else ""))
        t = time_interleaved(runs, cfg, cfg.window_seconds / 2 if tv else 0.0)
        if tv is not None:
            tv.close()  # the baseline's workers stop before the models run
        del runs, tv
        before = t["plain"] if "aug" in t else None
        if "aug" in t:
            label = f"+ {a}" + (f" (pool of {views}·B)" if views > 1 else "")
            # Its own cost and its share of the plain pipeline's rate, from the same windows.
            names.append(
                self.add(
                    label,
                    t["aug"],
                    "data",
                    a,
                    views=views,
                    own_ms_per_img=_extra_ms(t["aug"], t["plain"]),
                    vs_plain=t["aug"].img_per_s / t["plain"].img_per_s,
                )
            )
            before = t["aug"]
        handoff = f"hand-off to torch, normalize ({a})"
        own = _extra_ms(t["handoff"], before) if before else None
        names.append(
            self.add(
                handoff,
                t["handoff"],
                "data",
                a,
                **({"own_ms_per_img": own} if own is not None else {}),
            )
        )
        if "torchvision" in t:
            base = t["torchvision"]
            self.baseline.append(
                {
                    "aug": a,
                    "img_per_s": base.img_per_s,
                    "cpu_ms_per_img": base.cpu_ms_per_img,
                    "windows": base.windows,
                }
            )
            self.ratio[a] = t["handoff"].img_per_s / base.img_per_s
            if base.cpu_ms_per_img and t["handoff"].cpu_ms_per_img:
                self.cpu_ratio[a] = base.cpu_ms_per_img / t["handoff"].cpu_ms_per_img
        if self.models is not None:
            names += self.model_stages(a, views, scheme.mixing, batches)
        self.bound[a] = _bound(self.stages, names)

    def model_stages(self, a: str, views: int, mixing: bool, batches) -> list[str]:
        cfg, names = self.cfg, []
        runs = _model_runners(views, mixing, self.models, self.data, self.dataset.num_classes)
        if "teacher" in runs:
            n = 1 + views
            name = f"teacher forward, {n if n > 1 else ''}B images ({a})"
            self.say(name)
            names.append(
                self.add(name, time_alone(runs["teacher"], cfg), "model", a, images_per_sample=n)
            )
        name = f"student forward + backward, {'x and x' + chr(39) if views else 'x'} ({a})"
        self.say(name)
        names.append(self.add(name, time_alone(runs["student"], cfg), "model", a))
        self.say(f"KD step, synthetic tensors ({a})")
        synthetic = time_alone(runs["synthetic"], cfg)
        self.add(f"KD step, synthetic tensors ({a})", synthetic, "step", a)

        def fed_step():
            self.models.step(next(batches))

        self.say(f"KD step, fed by the pipeline ({a})")
        fed = time_alone(_Runner(fed_step, cfg.batch_size, self.sync), cfg)
        self.add(f"KD step, fed by the pipeline ({a})", fed, "step", a)
        self.efficiency[a] = fed.img_per_s / synthetic.img_per_s
        return names


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _extra_ms(timing: Timing, before: Timing) -> float:
    """ms per sample a cumulative stage adds to the one before it (0 when within noise)."""
    return max(0.0, 1e3 / timing.img_per_s - 1e3 / before.img_per_s)


def _bound(stages: list[dict], names: list[str]) -> dict[str, Any]:
    """The stage of a scheme's chain with the largest own cost (ms per sample). A cumulative
    data stage costs the difference of inverse rates to the data stage before it (unless its
    record already holds one measured in the same windows); a model stage its inverse rate.
    Sets ``own_ms_per_img`` on the stage records."""
    by_name = {st["name"]: st for st in stages}
    worst, previous = None, 0.0
    for name in names:
        st = by_name[name]
        cost = 1e3 / st["img_per_s"]
        own = cost if st["kind"] != "data" else max(0.0, cost - previous)
        if st["kind"] == "data":
            previous = cost
        own = st.setdefault("own_ms_per_img", own)
        if worst is None or own > worst[1]:
            worst = (name, own)
    assert worst is not None
    return {"stage": worst[0], "own_ms_per_img": worst[1]}


def _mixing_path(device: str) -> str:
    """Which implementation the mixing recipes ran on: dalikd's fused operator or stock ones."""
    try:
        from dalikd import native
    except ImportError:
        return "stock operators"
    return "native (fn.dalikd_mix)" if native.use_native(device) else "stock operators"


def _versions() -> dict[str, str]:
    import nvidia.dali
    import torchvision

    return {
        "dalikd": __version__,
        "dali": nvidia.dali.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """A horizontal bar chart of every stage's rate; each scheme's torchvision baseline sits
    under its DALI hand-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"data": "#4c72b0", "side": "#a0b4d6", "model": "#dd8452", "step": "#55a868"}
    base = {b["aug"]: b for b in report["baseline"]}
    rows = []
    for st in report["stages"]:
        rows.append((st["name"], st["img_per_s"], colours[st["kind"]]))
        if st["name"].startswith("hand-off") and st["aug"] in base:
            rows.append(
                (f"torchvision DataLoader ({st['aug']})", base[st["aug"]]["img_per_s"], "#c44e52")
            )
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(rows) + 1.0))
    ax.barh(range(len(rows)), [r[1] for r in rows], color=[r[2] for r in rows])
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training samples / s (log scale); red: torchvision DataLoader")
    ax.set_title(
        f"dalikd profile: {report['device']}, {report['cpu_count']} cores, "
        f"{report['threads']} threads, batch {report['batch_size']}, {report['image_size']} px"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""One profile, stage by stage (the order of the package docstring); ``run_profile``
returns the JSON-ready report."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from dalikd import loaders, recovery
from dalikd.batch import IMAGENET_NORM, data_norm
from dalikd.config import DataConfig, KDConfig, flags_named_as_keys
from dalikd.data import Dataset
from dalikd.device import prepare_batch, resolve_device
from dalikd.errors import DalikdError
from dalikd.plan import DataPlan, resolve_plan
from dalikd.profile.baseline import BaselineStream, baseline_loader, timm_stream
from dalikd.profile.config import (
    BASELINES,
    DALI_RESIZE,
    ProfileConfig,
    ProfiledAug,
    Progress,
    Timing,
    resolve_augs,
)
from dalikd.profile.report import (
    bound,
    cpu_count,
    cpu_vs_plain,
    dataset_facts,
    extra_ms,
    mixing_path,
    resize_path,
    stage_record,
    versions,
)
from dalikd.profile.stages import (
    build_models,
    dali_runner,
    decode_graph,
    forever,
    model_runners,
    pixels_graph,
    read_graph,
    resize_graph,
)
from dalikd.profile.timing import Runner, time_alone, time_interleaved
from dalikd.settings import command_config
from dalikd.sources import is_shards, open_dataset

# -- the profile -----------------------------------------------------------------------------


def check(cfg: ProfileConfig) -> tuple[Dataset, list[ProfiledAug], str]:
    """Every user mistake, before anything is measured: (dataset, schemes, device)."""
    device = resolve_device(cfg.device)
    if cfg.baseline not in BASELINES:
        raise DalikdError(f"--baseline must be one of {', '.join(BASELINES)}; got {cfg.baseline}")
    if cfg.windows < 1 or cfg.window_seconds < 0 or cfg.warmup < 0:
        raise DalikdError("--windows must be >= 1, --window-seconds and --warmup >= 0")
    profile_data(cfg)  # image size, batch size, threads, mixing: one line each
    dataset = open_dataset(cfg.data)  # a folder of images or a shard set
    if len(dataset.train) < cfg.batch_size:
        raise DalikdError(
            f"{len(dataset.train)} training images make no full batch of {cfg.batch_size}; "
            "lower --batch-size"
        )
    if cfg.pool_size < 1:
        raise DalikdError(f"--pool-size must be at least 1, got {cfg.pool_size}")
    schemes = resolve_augs(cfg.augs)
    if cfg.batch_size < 2 and any(s.mixing for s in schemes):
        raise DalikdError("mixing schemes need --batch-size of at least 2 (a partner)")
    return dataset, schemes, device


def profile_data(cfg: ProfileConfig) -> DataConfig:
    """The data settings profiled: the dataset's own (dataset.json) < the options given."""
    given = {"data.path": cfg.data, "data.batch_size": cfg.batch_size, "data.threads": cfg.threads,
             "data.mixing": cfg.mixing, "data.antialias": cfg.antialias}  # fmt: skip
    if cfg.image_size is not None:
        given["data.image_size"] = cfg.image_size
    return command_config(overrides=given, flags=flags_named_as_keys(*given)).data


def short_chain(data: DataConfig, raw: bool) -> bool:
    """The plain pipeline has no decode-a-window and resize stages: pad_crop (the whole image,
    padded and cropped), or raw images (nothing to decode a window of)."""
    return data.base_view == "pad_crop" or raw


def run_profile(cfg: ProfileConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every stage; return the JSON-ready report (see the module docstring). A file
    that fails to decode in DALI (it passed the scan) is found, left out with one warning line,
    and the profile starts again without it."""
    dataset, schemes, device = check(cfg)
    say = progress or (lambda text: None)
    if is_shards(dataset) and cfg.baseline != "none":  # torchvision's loaders read folders
        say("a shard set: no torchvision baseline")
        cfg = replace(cfg, baseline="none")
    left_out = _LeftOut()
    while True:
        profiler = _Profiler(cfg, dataset, device, say)
        try:
            profiler.plain_pipeline()
            for scheme in schemes:
                profiler.scheme(scheme)
            break
        except RuntimeError as error:
            if not recovery.is_decode_failure(error):
                raise
            dataset = left_out.without(error, dataset, profiler.plan, say)
    return {
        "device": device,
        "cpu_count": cpu_count(),
        "threads": profiler.plan.data.threads,
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "image_size": profiler.data.image_size,
        "base_view": profiler.data.base_view,
        "baseline_skipped": profiler.baseline_skipped,
        "antialias": cfg.antialias,
        "teacher": cfg.teacher or None,
        "student": cfg.student or None,
        "pool_size": cfg.pool_size,
        "windows": cfg.windows,
        "window_seconds": cfg.window_seconds,
        "dataset": dataset_facts(dataset),
        "mixing": (
            mixing_path(profiler.plans) if any(s.mixing for s in schemes) else "none profiled"
        ),  # fmt: skip
        "resize": resize_path(profiler.plan),
        "plans": {name: plan.to_dict() for name, plan in profiler.plans.items()},
        "alternatives": profiler.alternatives,
        "versions": versions(),
        "stages": profiler.stages,
        "baseline": profiler.baseline,
        "ratio": profiler.ratio,
        "cpu_ratio": profiler.cpu_ratio,
        "bound": profiler.bound,
        "efficiency": profiler.efficiency,
    }


class _LeftOut:
    """The training samples a profile left out so far: a pipeline that fails to decode one is
    searched for it (the ones DALI names, else the first failing batch in stored order; a later
    failure finds the next), and the profile starts again on the rest (a folder's files, or the
    same tars read through index files of the good samples)."""

    def __init__(self) -> None:
        self.source: Any = None  # the whole train split's recovery.SampleSource, from the first
        self.out: set[int] = set()  # failure on (a shard set's owns the index files)
        self.warning = recovery.LeftOutWarning()

    def without(self, error: RuntimeError, dataset: Dataset, plan: DataPlan, say: Progress
                ) -> Dataset:  # fmt: skip
        """``dataset`` whose train split leaves out the samples that made ``error``."""
        if self.source is None:
            self.source = recovery.source_of(dataset.train)
            self.warning.what = self.source.what
        source, what = self.source, self.source.what
        say(f"a training {what} failed to decode: finding it, then profiling again without it")
        good = [i for i in range(len(source)) if i not in self.out]
        found = source.culprits(error, good, plan)
        if not found:
            raise DalikdError(
                f"a pipeline failed while profiling and no single {what} explains it: "
                f"{recovery.dali_reason(error)}"
            ) from None
        self.warning({source.name(i): reason for i, reason in found.items()}, "")
        self.out |= set(found)
        good = [i for i in good if i not in found]
        if len(good) < plan.data.batch_size:
            samples = "images" if what == "file" else "samples"
            raise DalikdError(f"{len(good)} training {samples} decode, no full batch of "
                              f"{plan.data.batch_size}; lower --batch-size")  # fmt: skip
        return replace(dataset, train=source.subset(good))


class _Profiler:
    """The stages of one profile, in the order they are measured; results accumulate here."""

    def __init__(self, cfg: ProfileConfig, dataset: Dataset, device: str, say: Progress):
        self.cfg, self.dataset, self.device, self.say = cfg, dataset, device, say
        self.data = profile_data(cfg)
        self.raw_shape = dataset.raw_shape
        # the plain pipeline's plan (no x'); each scheme gets its own (self.plans)
        self.plan = self.resolve(self.data)
        # the torchvision baseline and the alternatives read image files with a
        # random-resized crop; CIFAR's loaders are compared by benchmarks/cifar_loader.py
        self.short = short_chain(self.data, bool(self.raw_shape))
        self.baseline_skipped = (
            f"no torchvision baseline for {self.data.base_view} on "
            f"{'raw' if self.raw_shape else 'encoded'} images (benchmarks/cifar_loader.py "
            "compares a reference-style CIFAR loader)"
            if self.short
            else None
        )
        self.plans: dict[str, DataPlan] = {}
        # A pool is picked by teacher entropy (the paper's best); without a teacher, by the
        # student's, as `dalikd train` would require.
        criterion = "teacher_entropy" if cfg.teacher else "student_entropy"
        kd = KDConfig(pool_size=cfg.pool_size, pick_criterion=criterion)

        self.sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
        torch.manual_seed(cfg.seed)
        self.models = build_models(cfg, kd, dataset.num_classes, device,
                                   data_norm(self.data.mean, self.data.std))  # fmt: skip
        # the normalization the models' inputs get (cutout's fill in the schemes' plans)
        self.norm = self.models.distiller.input_norm if self.models else IMAGENET_NORM
        self.stages: list[dict] = []
        self.chain: list[str] = []  # the plain pipeline's cumulative stages
        self.baseline: list[dict] = []
        self.ratio: dict[str, float] = {}
        self.cpu_ratio: dict[str, float] = {}  # baseline CPU ms / DALI CPU ms, per sample
        self.bound: dict[str, dict] = {}
        self.efficiency: dict[str, float] = {}
        # fn.dalikd_resize in the pipelines (CPU, antialiased, where it loads); when it is, the
        # plain pipeline is also timed with DALI's fn.resize, in the same windows
        self.native_resize = self.plan.native_resize and not self.short
        self.alternatives: dict[str, dict] = {}  # plain KD: DALI's resize, timm's loader

    def resolve(self, data: DataConfig, recipe=None, **kw) -> DataPlan:
        """The plan of ``data`` (and ``recipe``) on this profile's device, seed and dataset."""
        return resolve_plan(data, recipe, device=self.device, seed=self.cfg.seed,
                            raw_shape=self.raw_shape, validates=False, **kw)  # fmt: skip

    def add(self, name: str, timing: Timing, kind: str, aug: str | None = None, **extra) -> str:
        self.stages.append(stage_record(name, timing, kind, aug, **extra))
        return name

    def dali(self, graph, plan: DataPlan | None = None, **kw) -> Runner:
        return dali_runner(graph, plan or self.plan, self.cfg.seed, split=self.dataset.train, **kw)

    def dali_resize(self) -> DataPlan:
        """The plain plan on DALI's own resize (timed beside dalikd's)."""
        return self.plan.with_resize("dali")

    def plain_runner(self, plan: DataPlan | None = None) -> Runner:
        return self.dali(loaders.train_graph, plan, shard_id=0, num_shards=1)

    def plain_pipeline(self) -> None:
        """read; + decode and random crop; + resize; + flip (cumulative), in interleaved
        windows."""
        if self.short:
            return self.short_pipeline()
        s = self.data.image_size
        aa = "antialias" if self.cfg.antialias else "NO antialias"
        runs = {
            "read": self.dali(read_graph),
            "+ decode, random crop": self.dali(decode_graph),
            f"+ resize {s}² ({aa})": self.dali(resize_graph),
        }
        side = f"+ resize {s}², no antialias (option)"
        if self.cfg.antialias:  # the faster, lower-quality mode, beside the chain, never in it
            loose = self.resolve(replace(self.data, antialias=False))
            runs[side] = self.dali(resize_graph, loose)
        runs["+ flip (plain pipeline)"] = self.plain_runner()
        sides = [side]
        if self.native_resize:  # DALI's own antialiased resize (and separate flip), beside it
            dali = f" ({DALI_RESIZE})"
            sides += [f"+ resize {s}² (antialias){dali}", f"+ flip (plain pipeline){dali}"]
            runs[sides[1]] = self.dali(resize_graph, self.dali_resize())
            runs[sides[2]] = self.plain_runner(self.dali_resize())
        self.say("the plain pipeline, stage by stage")
        for name, timing in time_interleaved(runs, self.cfg).items():
            self.add(name, timing, "side" if name in sides else "data")
            if name not in sides:
                self.chain.append(name)

    def short_pipeline(self) -> None:
        """read; + the pixels (reshape or decode); + the base view (plain pipeline)."""
        pixels = "reshape (raw)" if self.raw_shape else "decode"
        view = (f"pad {self.data.pad}, crop" if self.data.base_view == "pad_crop"
                else "random-resized crop")  # fmt: skip
        runs = {"read": self.dali(read_graph), f"+ {pixels}": self.dali(pixels_graph),
                f"+ {view}, flip (plain pipeline)": self.plain_runner()}  # fmt: skip
        self.say("the plain pipeline, stage by stage")
        for name, timing in time_interleaved(runs, self.cfg).items():
            self.add(name, timing, "data")
            self.chain.append(name)

    def scheme(self, scheme: ProfiledAug) -> None:
        """+ x' (interleaved with the plain pipeline, for its cost), the hand-off to torch
        (interleaved with the torchvision baseline), then the model stages."""
        a, cfg = scheme.name, self.cfg
        names = list(self.chain)
        runs: dict[str, Runner] = {}
        plan = self.resolve(self.data, scheme.recipe, pool_size=cfg.pool_size, norm=self.norm)
        self.plans[a] = plan
        pool_size = plan.pool_size  # x' views per image: k for a pool, 1, 0 (plain KD)
        if scheme.recipe is not None:  # + x' (or a pool of k candidates per image)
            runs["plain"] = self.plain_runner()
            runs["aug"] = self.dali(loaders.train_graph, plan, shard_id=0, num_shards=1)
        batches = forever(loaders.train_loader(self.dataset.train, plan))

        def handoff() -> None:  # what the model gets: the batch, normalized on the device
            prepare_batch(next(batches), self.device, self.norm)

        runs["handoff"] = Runner(handoff, cfg.batch_size, self.sync)
        timm = None
        if scheme.recipe is None:  # plain KD: the alternatives, in the same interleaved run
            if self.native_resize:
                runs[DALI_RESIZE] = self.dali_resize_handoff()
            if cfg.baseline == "torchvision" and not self.short:
                timm = timm_stream(self.dataset.root, self.data, self.device)
                if timm is not None:
                    runs["timm"] = Runner(timm.step, cfg.batch_size, self.sync, timm.worker_pids)
        tv = None
        if cfg.baseline == "torchvision" and not self.short:
            tv_loader = baseline_loader(
                a,
                self.dataset.root,
                self.data,
                self.dataset.num_classes,
                cfg.pool_size,
                files=frozenset(self.dataset.train.files),  # what DALI reads: no file left out
            )
            if tv_loader is not None:
                tv = BaselineStream(tv_loader, loaders.torch_device(self.device))
                runs["torchvision"] = Runner(tv.step, cfg.batch_size, self.sync, tv.worker_pids)
        self.say(f"{a}: pipeline, hand-off" + (" and torchvision" if tv else ""))
        t = time_interleaved(runs, cfg, cfg.window_seconds / 2 if tv else 0.0)
        for stream in (tv, timm):
            if stream is not None:
                stream.close()  # the baselines' workers stop before the models run
        del runs, tv, timm
        names += self.record(a, t, pool_size)
        if self.models is not None:
            names += self.model_stages(a, pool_size, scheme.mixing, batches)
        self.bound[a] = bound(self.stages, names)

    def record(self, a: str, t: dict[str, Timing], pool_size: int) -> list[str]:
        """The data stages of scheme ``a`` from one interleaved run ``t``: + x', the hand-off,
        the baselines and the alternatives; returns the names added to the scheme's chain."""
        names: list[str] = []
        for name in (DALI_RESIZE, "timm"):
            if name in t:
                self.alternatives[name] = {
                    "img_per_s": t[name].img_per_s,
                    "cpu_ms_per_img": t[name].cpu_ms_per_img,
                    "windows": t[name].windows,
                    "dalikd_ratio": t["handoff"].img_per_s / t[name].img_per_s,
                }
        before = t["plain"] if "aug" in t else None
        if "aug" in t:
            label = f"+ {a}" + (f" (pool of {pool_size}·B)" if pool_size > 1 else "")
            # Its own cost and its share of the plain pipeline's rate, from the same windows.
            names.append(
                self.add(
                    label,
                    t["aug"],
                    "data",
                    a,
                    pool_size=pool_size,
                    own_ms_per_img=extra_ms(t["aug"], t["plain"]),
                    vs_plain=t["aug"].img_per_s / t["plain"].img_per_s,
                    **cpu_vs_plain(t["aug"], t["plain"]),
                )
            )
            before = t["aug"]
        handoff = f"hand-off to torch, normalize ({a})"
        own = extra_ms(t["handoff"], before) if before else None
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
        return names

    def dali_resize_handoff(self) -> Runner:
        """The plain training loader's hand-off with DALI's fn.resize + fn.flip instead of
        fn.dalikd_resize."""
        loader = loaders.train_loader(self.dataset.train, self.dali_resize())
        batches = forever(loader)
        return Runner(lambda: prepare_batch(next(batches), self.device), self.cfg.batch_size,
                       self.sync)  # fmt: skip

    def model_stages(self, a: str, pool_size: int, mixing: bool, batches) -> list[str]:
        cfg, names = self.cfg, []
        runs = model_runners(pool_size, mixing, self.models, self.data, self.dataset.num_classes)
        if "teacher" in runs:
            n = 1 + pool_size
            name = f"teacher forward, {n if n > 1 else ''}B images ({a})"
            self.say(name)
            names.append(
                self.add(name, time_alone(runs["teacher"], cfg), "model", a, images_per_sample=n)
            )
        name = f"student forward + backward, {'x and x' + chr(39) if pool_size else 'x'} ({a})"
        self.say(name)
        names.append(self.add(name, time_alone(runs["student"], cfg), "model", a))
        self.say(f"KD step, synthetic tensors ({a})")
        synthetic = time_alone(runs["synthetic"], cfg)
        self.add(f"KD step, synthetic tensors ({a})", synthetic, "step", a)

        def fed_step():
            self.models.step(next(batches))

        self.say(f"KD step, fed by the pipeline ({a})")
        fed = time_alone(Runner(fed_step, cfg.batch_size, self.sync), cfg)
        self.add(f"KD step, fed by the pipeline ({a})", fed, "step", a)
        self.efficiency[a] = fed.img_per_s / synthetic.img_per_s
        return names

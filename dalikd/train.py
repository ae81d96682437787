"""The training loop: distill a student from a frozen teacher (or train it supervised).

One function, read top to bottom: setup -> resume -> per epoch (lr -> forward -> backward ->
step -> log) -> validate -> checkpoint. The step is dalikd.step.Distiller; the schedule is a pure
function of the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dalikd import distributed, recipes, recovery, rundir, teacher_cache, tensorboard
from dalikd.atomic import write_jsonl_atomic, write_text_atomic
from dalikd.checkpoint import CHECKPOINT_FORMAT, RunState, save_atomic
from dalikd.config import OptimConfig, TrainConfig, build_config
from dalikd.data import Dataset, scan_dataset, train_listing
from dalikd.device import amp_dtype, resolve_device, torch_device
from dalikd.errors import DalikdError, RunInterrupted
from dalikd.evaluate import evaluate
from dalikd.metrics import GROUP_STEPS, TStddev
from dalikd.models import check_classes, check_shapes, checkpoint_classes
from dalikd.step import Distiller, make_optimizer
from dalikd.tensorboard import ScalarWriter


class Reporter(Protocol):
    """What the loop tells the outside world; the CLI draws it with rich."""

    def message(self, text: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    # cache: (hits, misses) of --teacher-cache so far this run (None without a cache)
    def step(
        self, step: int, loss: float, img_per_s: float, lr: float,
        cache: tuple[int, int] | None = None,
    ) -> None: ...  # fmt: skip
    def val_step(self, done: int, total: int) -> None: ...  # val batches done of total
    def epoch_end(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def message(self, text: str) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(
        self, step: int, loss: float, img_per_s: float, lr: float,
        cache: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        pass

    def val_step(self, done: int, total: int) -> None:
        pass

    def epoch_end(self, record: dict[str, Any]) -> None:
        pass


# -- schedule ----------------------------------------------------------------------------------


def lr_at(step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Learning rate at a global step: linear warmup, then step or cosine decay."""
    warmup = round(optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "cosine":
        total = optim.epochs * steps_per_epoch
        progress = (step - warmup) / max(1, total - warmup)
        return optim.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    epoch = step // steps_per_epoch
    return optim.lr * optim.gamma ** sum(epoch >= m for m in optim.milestones)


# -- run setup ---------------------------------------------------------------------------------


def default_run_dir() -> str:
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def load_resume(
    run_dir: str | Path, overrides: dict[str, Any], flags: dict[str, str] | None = None
) -> TrainConfig:
    """The config a run was started with, updated by flags given again (e.g. more epochs);
    ``flags``: dotted key -> flag, named in errors (config.build_config)."""
    run_dir = Path(run_dir)
    if run_dir.name == "last.pt" and run_dir.is_file():  # the checkpoint: its run is meant
        run_dir = run_dir.parent
    out = overrides.get("out")
    if out and Path(out).expanduser().resolve() != run_dir.resolve():
        raise DalikdError(
            f"--resume continues the run in {run_dir}, where it writes; drop --out {out}"
        )
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.json").is_file():
        raise DalikdError(f"nothing to resume in {run_dir}: no last.pt and config.json there")
    ckpt = _read_checkpoint(run_dir / "last.pt", mmap=True)
    if not isinstance(ckpt, dict) or not {"model", "epoch", "scheduler"} <= ckpt.keys():
        raise DalikdError(
            f"{run_dir / 'last.pt'} is not a dalikd checkpoint (a weights file? those start a "
            f"new run: --student-weights {run_dir / 'last.pt'})"
        )
    found = ckpt.get("format", 1)
    if found != CHECKPOINT_FORMAT:
        raise DalikdError(
            f"{run_dir / 'last.pt'} has checkpoint format {found}; this dalikd resumes format "
            f"{CHECKPOINT_FORMAT} only (its data pipeline changed). Start a new run; the old "
            f"weights can seed it: --student-weights {run_dir / 'last.pt'}"
        )
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise DalikdError(f"cannot read {run_dir / 'config.json'}: {e}") from None
    if not isinstance(saved, dict):
        raise DalikdError(f"{run_dir / 'config.json'} is damaged: not a table of settings")
    data = saved.setdefault("data", {})
    if isinstance(data, dict) and ckpt.get("dali"):
        # saved before the mixing and resize paths were configuration: the DALI state names
        # its graph's operators
        from dalikd.loaders import checkpoint_mixing, checkpoint_resize

        if "mixing" not in data:
            data["mixing"] = checkpoint_mixing(recovery.dali_state(ckpt["dali"][0]))
        if "resize" not in data:
            data["resize"] = checkpoint_resize(recovery.dali_state(ckpt["dali"][0]))
    try:
        before = build_config(saved, {"out": str(run_dir)})
    except DalikdError as e:
        raise DalikdError(f"{run_dir / 'config.json'} is damaged: {e}") from None
    # An explicit `auto` path asks dalikd to choose; on resume the choice is the one the run
    # made (its DALI state belongs to that graph), so it is kept, not refused as a change.
    overrides = {k: v for k, v in overrides.items()
                 if not (k in ("data.mixing", "data.resize") and v == "auto")}  # fmt: skip
    overrides.update(_resume_data_path(run_dir, before.data.path, overrides.get("data.path"),
                                       has_listing="train_listing" in ckpt))  # fmt: skip
    cfg = build_config(overrides={**overrides, "out": str(run_dir)}, base=before, flags=flags)
    old, new = _flat(before.to_dict()), _flat(cfg.to_dict())
    fixed = [f"{k} {old[k]} -> {new[k]}" for k in old
             if old[k] != new[k] and k not in RESUMABLE | {"data.path"}]  # fmt: skip
    if fixed:
        raise DalikdError(
            f"cannot change on resume: {', '.join(fixed)} (the data order, models or step count "
            f"depend on them); start a new run, seeded with --student-weights {run_dir}/last.pt"
        )
    done, epochs = ckpt["epoch"], cfg.optim.epochs
    if epochs == done == before.optim.epochs:
        raise DalikdError(
            f"{run_dir} is complete ({done} of {epochs} epochs); give --epochs N > {done} to "
            "train on"
        )
    if epochs <= done:
        raise DalikdError(
            f"{run_dir} has done {done} epochs; --epochs {epochs} is "
            f"{'fewer' if epochs < done else 'no more'}; give --epochs N > {done} to train on"
        )
    return cfg


def _resume_data_path(
    run_dir: Path, saved: str, given: str | None, has_listing: bool
) -> dict[str, str]:
    """The data.path override of a resume: a dataset that moved (e.g. copied to a node's
    scratch disk) may be given; _resume checks that it is the same listing. A run from before
    the listing was recorded takes only its own folder under another spelling."""
    if given is None:
        if not Path(saved).expanduser().is_dir():
            raise DalikdError(
                f"{run_dir}'s dataset folder {saved} is not there; give --data DIR where it "
                "is now (the same classes and train files)"
            )
        return {}
    where = Path(given).expanduser().resolve()
    if not has_listing and where != Path(saved).expanduser().resolve():
        raise DalikdError(
            f"{run_dir} cannot move to --data {where}: it was saved before dalikd recorded "
            f"its dataset's listing, so only its folder {saved} can be given"
        )
    return {"data.path": str(where)}


# What --resume may change: the schedule is a pure function of the step, the loss weights and
# the optimizer's hyperparameters are read each step, the rest is bookkeeping. Everything else
# (batch size, images, augmentation, models, seed, device, ...) is fixed by the checkpoint.
RESUMABLE = frozenset(
    {"optim.epochs", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay",
     "optim.schedule", "optim.milestones", "optim.gamma", "optim.warmup_epochs",
     "kd.ce_weight", "kd.kd_weight", "kd.temperature", "kd.mixed_label_ce",
     "log_every", "ckpt_every", "eval_teacher", "channels_last", "tensorboard", "out",
     "teacher_cache", "teacher_cache_topk", "log_seconds"}
)  # fmt: skip


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _kept(run_dir: Path) -> str:
    """The note for a stop on bad numbers: only a run that saved a checkpoint has one to keep."""
    return "; last.pt keeps the last good checkpoint" if (run_dir / "last.pt").is_file() else ""


def resolve_mixing(cfg: TrainConfig, recipe: recipes.Recipe | None, device: str) -> TrainConfig:
    """``cfg`` with its mixing path resolved once ("native" | "composed"), when the recipe
    mixes: config.json and the checkpoint record the graph the data state belongs to."""
    if recipe is None or not recipes.recipe_info(recipe).mixing:
        return cfg
    from dalikd import native

    return build_config(
        overrides={"data.mixing": native.resolve(cfg.data.mixing, device)}, base=cfg
    )


def resolve_resize(cfg: TrainConfig, device: str) -> TrainConfig:
    """``cfg`` with its resize path resolved once ("native" | "dali"): the two differ in
    pixels, so config.json, the checkpoint and a teacher cache's key record which ran."""
    from dalikd import native

    resize = native.resolve_resize(cfg.data.resize, cfg.data.antialias, device)
    return build_config(overrides={"data.resize": resize}, base=cfg)


def _read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        raise DalikdError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except Exception as e:  # torch's text for a cut-off zip, an empty file, another format
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise DalikdError(
            f"{path} is damaged (truncated or not a checkpoint): {reason or type(e).__name__}"
        ) from None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 ask the loop to stop after the current step.

    The loop then writes a checkpoint and returns; a second SIGINT interrupts at once.
    Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(
    cfg: TrainConfig,
    reporter: Reporter | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train ``cfg.model.student``; return a summary.

    Writes config.json, metrics.jsonl, last.pt and best.pt in ``cfg.out`` (rank 0 only), a new
    or empty folder (``overwrite``: or one a run it replaces used); without ``cfg.out``, a new
    runs/<timestamp>. A run that fails before its first checkpoint leaves no folder behind.
    ``resume=True`` continues from ``cfg.out/last.pt`` exactly where it stopped, mid-epoch
    included: weights, optimizer, schedule step, metrics and the DALI pipeline state.
    Launched by torchrun, each rank reads its own shard and the student is wrapped in DDP.
    """
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device != "gpu":
        raise DalikdError("--precision fp16 needs a GPU; on CPU use fp32 (default) or bf16")
    if cfg.tensorboard:
        tensorboard.require()
    ctx = distributed.init(device)
    try:
        given = Path(cfg.out) if cfg.out else None
        cfg = build_config(overrides={"out": cfg.out or default_run_dir()}, base=cfg)
        claim: contextlib.AbstractContextManager[Path] = contextlib.nullcontext(Path(cfg.out))
        if ctx.is_main:  # one run per run directory (a second one is refused in one line)
            note = (reporter or SilentReporter()).message
            claim = rundir.claimed(given, Path(cfg.out), note, resume, overwrite)
        with claim as run_dir, StopSignals() as stop:
            cfg = build_config(overrides={"out": str(run_dir)}, base=cfg)
            try:
                return _train(cfg, reporter if ctx.is_main and reporter else SilentReporter(),
                              resume, device, ctx, stop)  # fmt: skip
            except KeyboardInterrupt:
                raise RunInterrupted(str(run_dir)) from None
    finally:
        distributed.shutdown(ctx)


@dataclass
class Run:
    """The objects of one run, made once before the loop (:func:`_setup`)."""

    cfg: TrainConfig
    device: str  # "cpu" | "gpu"
    ctx: distributed.Dist
    run_dir: Path
    reporter: Reporter
    dataset: Dataset
    distiller: Distiller  # the student (DDP-wrapped where distributed), teacher and losses
    student: nn.Module  # the student itself: what checkpoints save
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: RunState
    # T. stddev of this rank's teacher rows (x and the x' trained on), cumulative over the run;
    # pooled over the ranks at each epoch end (TStddev.pooled). A group is GROUP_STEPS steps of
    # rows (the reference's 5); its size in rows is set at the first step (0: not yet known).
    tstd: TStddev
    train_data: Any = None  # recovery.TrainData
    val_data: Any = None  # loaders.Loader
    tb: ScalarWriter | None = None  # --tensorboard: rank 0 writes the epoch records there too
    # --teacher-cache: the wrapper of the distiller's teacher pass (teacher_cache.attach)
    caching: teacher_cache.CachingTeacherPass | None = None
    tstd_sized: bool = False  # the group size was checked against this run's (first step)
    # the scanned train listing (data.train_listing), saved in checkpoints: a resume from
    # another --data checks that it lists the same files
    listing: dict[str, Any] | None = None

    @property
    def tdev(self) -> torch.device:
        return torch_device(self.device)


def _train(cfg, reporter, resume, device, ctx, stop) -> dict:
    run = _setup(cfg, reporter, resume, device, ctx)
    cfg, state, tdev = run.cfg, run.state, run.tdev
    while state.epoch < cfg.optim.epochs:
        steps_per_epoch = len(run.train_data)  # fewer once files that failed in training are out
        reporter.epoch_start(state.epoch, cfg.optim.epochs, steps_per_epoch)
        run.distiller.train()
        loss_sum = torch.tensor(state.partial["loss_sum"], device=tdev)
        seen, t0 = state.partial["seen"], time.perf_counter() - state.partial["seconds"]
        for batch in run.train_data:
            # lr: a pure function of the step
            lr = lr_at(state.global_step, steps_per_epoch, cfg.optim)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            # step
            losses = _step(run, batch)
            state.global_step += 1
            state.step_in_epoch += 1
            loss_sum += losses["loss"].detach()
            seen += len(batch)
            # stop requests are agreed across ranks (a sync point, so at log boundaries only)
            step = state.step_in_epoch
            boundary = step % cfg.log_every == 0 or step == steps_per_epoch
            stopping = (boundary or not ctx.enabled) and distributed.any_rank(
                ctx, stop.received is not None, tdev
            )
            # mid-epoch checkpoint: every ckpt_every steps, and before stopping
            periodic = bool(cfg.ckpt_every) and step % cfg.ckpt_every == 0
            save_now = step < steps_per_epoch and (stopping or periodic)
            # log: .item() is a CPU-GPU sync point, so only at log boundaries and before a
            # checkpoint, which must never hold the weights of a non-finite loss
            if boundary or save_now:
                loss = _finite_loss(run, losses)
                if boundary:
                    img_per_s = seen * ctx.world_size / (time.perf_counter() - t0)
                    cache = None if run.caching is None else (run.caching.hits,
                                                              run.caching.misses)  # fmt: skip
                    reporter.step(step, loss, img_per_s, lr, cache=cache)
            # checkpoint (mid-epoch)
            if save_now:
                distributed.average_buffers(ctx, run.student)  # the state every rank resumes
                elapsed = time.perf_counter() - t0
                state.partial = {"loss_sum": float(loss_sum), "seen": seen, "seconds": elapsed}
                _save(run, ("last.pt",))
                if stopping:
                    stop.received = stop.received or "SIGTERM"  # signalled on another rank
                    break
        if state.step_in_epoch < steps_per_epoch:  # stopped mid-epoch
            break
        train_seconds = time.perf_counter() - t0

        # validate (every rank with the same BatchNorm statistics: those saved next)
        distributed.average_buffers(ctx, run.student)
        record = _validate(run, loss_sum, seen, steps_per_epoch, lr, train_seconds, t0)

        # checkpoint: last.pt every epoch, best.pt when val top-1 improves
        improved = state.end_epoch(record)
        _save(run, ("last.pt", "best.pt") if improved else ("last.pt",))
        if ctx.is_main:
            write_jsonl_atomic(state.history, run.run_dir / "metrics.jsonl")
            if run.tb is not None:
                run.tb.add(record)
        reporter.epoch_end(record)
        if distributed.any_rank(ctx, stop.received is not None, tdev):
            stop.received = stop.received or "SIGTERM"
            break

    if run.tb is not None:
        run.tb.close()
    return _summary(run, stop.received)


# -- the loop's parts ----------------------------------------------------------------------------


def _summary(run: Run, stopped_by: str | None) -> dict[str, Any]:
    state = run.state
    return {
        "run_dir": str(run.run_dir),
        "device": run.device,
        "world_size": run.ctx.world_size,
        "epochs": run.cfg.optim.epochs,
        "epochs_done": state.epoch,
        "best_top1": state.best_top1,
        "final": state.history[-1] if state.history else {},
        "stopped_by": stopped_by,
        "step_in_epoch": state.step_in_epoch,
    }


def _step(run: Run, batch: Any) -> dict[str, torch.Tensor]:
    """One optimization step; its teacher rows go into T. stddev. Returns the named losses."""
    if run.caching is not None and run.train_data.dataset is not run.dataset:
        run.caching.detach()  # a file failed mid-run: the views now differ from the cache's
    try:
        out = run.distiller.step(batch, run.optimizer, run.scaler)
    except torch.OutOfMemoryError:
        cfg = run.cfg
        raise DalikdError(
            f"out of memory at --batch-size {cfg.data.batch_size} "
            f"(student {cfg.model.student}, teacher {cfg.model.teacher or 'none'}); "
            "lower --batch-size"
        ) from None
    if out.teacher_logits is not None:
        if not run.tstd_sized:  # x's rows + the x' trained on, GROUP_STEPS times
            _size_tstddev(run, GROUP_STEPS * len(out.teacher_logits))
        if run.caching is not None and run.caching.tstd_sums is not None:  # a top-K cache hit
            run.tstd.add_sums(*run.caching.tstd_sums)
        else:
            run.tstd.add(out.teacher_logits.float().softmax(dim=1))
    return out.losses


def _size_tstddev(run: Run, group_size: int) -> None:
    """Set T. stddev's group size at the first step; a resumed accumulator whose groups were
    another size (a checkpoint from before group steps, or another batch) starts afresh: its
    groups would not match this run's (and top-K cache sums cannot split a group)."""
    saved = run.tstd.group_size
    if saved and saved != group_size:
        run.reporter.message(
            f"T. stddev restarts: the checkpoint's groups are {saved} rows, this run's {group_size}"
        )
        run.tstd = TStddev(group_size=0)
    run.tstd.group_size = group_size
    run.tstd_sized = True


def _finite_loss(run: Run, losses: dict[str, torch.Tensor]) -> float:
    loss = losses["loss"].item()
    if not math.isfinite(loss):
        raise DalikdError(
            f"loss is {loss} at step {run.state.global_step} (epoch {run.state.epoch + 1}); "
            f"lower --lr{_kept(run.run_dir)}"
        )
    return loss


def _validate(run: Run, loss_sum, seen, steps_per_epoch, lr, train_seconds, t0) -> dict:
    """The epoch's record: train loss and images/s over every rank, val metrics, and with a
    teacher T. stddev and the teacher-student agreement on val."""
    ctx, teacher = run.ctx, run.distiller.teacher
    if run.caching is not None:  # the cached val logits (the teacher runs where they are not)
        teacher = run.caching.val_teacher
    val = evaluate(run.student, run.val_data, run.device, run.cfg.precision, ctx, teacher=teacher,
                   progress=run.reporter.val_step)  # fmt: skip
    totals = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64, device=run.tdev)
    distributed.all_sum(ctx, totals)
    record = {
        "epoch": run.state.epoch + 1,
        "train_loss": float(totals[0]) / (steps_per_epoch * ctx.world_size),
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "lr": lr,
        "img_per_s": float(totals[1]) / train_seconds,
        "seconds": time.perf_counter() - t0,
    }
    if run.caching is not None:  # this rank's steps read from the cache / computed, so far
        record["cache_hits"], record["cache_misses"] = run.caching.hits, run.caching.misses
    if teacher is not None:  # over every rank's rows; NaN (before 2 groups) is written null
        t_std, entropy = run.tstd.pooled(lambda t: distributed.all_sum(ctx, t))
        record["t_stddev"] = _finite_or_none(t_std)
        record["teacher_entropy"] = _finite_or_none(entropy)
        record["group_rows"] = run.tstd.group_size
        # teacher-student agreement on val: top-1 (%) and KL(teacher || student) at T = 1
        record["val_agree_top1"], record["val_kl_ts"] = val["agree_top1"], val["kl_ts"]
    return record


def _save(run: Run, names: tuple[str, ...]) -> None:
    """All ranks call this: each contributes its DALI and T. stddev states; rank 0 writes."""
    ctx, state = run.ctx, run.state
    if run.caching is not None:  # the cache's chunks end where checkpoints do
        run.caching.flush()
    dali_states = distributed.gather_objects(ctx, run.train_data.checkpoint())
    tstd_states = distributed.gather_objects(ctx, run.tstd.state_dict(cpu=True))
    if not ctx.is_main:
        return
    if not all(p.isfinite().all() for p in run.student.parameters()):
        raise DalikdError(
            f"the weights became non-finite by step {state.global_step} (epoch "
            f"{state.epoch + 1}); lower --lr{_kept(run.run_dir)}"
        )
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model": run.student.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        **state.state_dict(),
        "dali": dali_states,
        "tstddev": tstd_states,
        "rng": torch.get_rng_state(),
        "config": run.cfg.to_dict(),
        "classes": list(run.dataset.classes),
        "train_listing": run.listing,
    }
    for name in names:
        save_atomic(ckpt, run.run_dir / name)


# -- setup and resume ------------------------------------------------------------------------------


def _setup(cfg: TrainConfig, reporter: Reporter, resume: bool, device: str, ctx) -> Run:
    """Data, models, optimizer; the saved state where resuming; the run directory's files;
    the loaders."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.out)  # train() claimed it
    dataset = scan_dataset(cfg.data.path)
    if cfg.model.teacher_weights:  # a dalikd checkpoint of other classes: wrong labels
        w = cfg.model.teacher_weights
        check_classes(checkpoint_classes(w), dataset.classes, f"teacher weights {w}")
    # saved absolute: a resume from another working directory finds the data
    cfg = build_config(overrides={"data.path": str(dataset.root)}, base=cfg)
    listing = train_listing(dataset)
    # read once here: its listing is checked before the models (another class count is the
    # data's mistake, not theirs), the rest restored by _resume
    ckpt = _read_checkpoint(run_dir / "last.pt") if resume else None
    if ckpt is not None and ckpt.get("train_listing"):
        _check_listing(ckpt["train_listing"], listing, run_dir, dataset.root)
    recipe = recipes.resolve(cfg.kd.aug)
    cfg = resolve_resize(resolve_mixing(cfg, recipe, device), device)
    # --teacher-cache: the teacher is built on the first step the cache lacks (teacher_cache)
    models = replace(cfg.model, teacher="") if cfg.teacher_cache else cfg.model
    distiller = Distiller.build(models, cfg.kd, dataset.num_classes, device, cfg.precision,
                                channels_last=cfg.channels_last)  # fmt: skip
    student = distiller.student
    optimizer = make_optimizer(student, cfg.optim)
    # Loss scaling only for fp16 autocast; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(enabled=amp_dtype(device, cfg.precision) == torch.float16)
    # The teacher stays unwrapped: it is frozen, there is nothing to synchronise.
    if ctx.enabled:  # the step calls the wrapper; checkpoints save the student itself
        distiller.student = distributed.wrap(ctx, student, device)
        reporter.message(f"distributed: {ctx.world_size} rank(s), {ctx.backend}, DDP")
    run = Run(cfg, device, ctx, run_dir, reporter, dataset, distiller, student, optimizer,
              scaler, RunState(), TStddev(group_size=0))  # fmt: skip
    run.listing = listing
    dali_state = _resume(run, ckpt) if ckpt is not None else None
    _open_run_dir(run)
    _open_loaders(run, recipe, dali_state)
    return run


def _resume(run: Run, ckpt: dict[str, Any]) -> str | bytes | None:
    """Restore the run from its last.pt, ``ckpt``: weights, optimizer, scaler, RNG, RunState,
    T. stddev. Returns this rank's DALI state (None where the world size changed)."""
    cfg, ctx, state = run.cfg, run.ctx, None
    # the data may have moved (data.path): the skip list names the files where they were, under
    # the checkpoint's root or, where a later start rewrote it before dying, config.json's
    roots = [ckpt["config"]["data"]["path"], _config_data_path(run.run_dir)]
    roots = [Path(r).expanduser().resolve() for r in roots if r]
    skips = recovery.read_report(run.run_dir)  # files that failed in training before stay out
    run.dataset = recovery.apply_skips(run.dataset, _moved(skips, roots, run.dataset.root))
    check_shapes(run.student, ckpt["model"], f"{run.run_dir / 'last.pt'} does not fit the student")
    run.student.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    # settings given again on resume win over the saved ones (lr is set at every step)
    run.optimizer.param_groups[0]["weight_decay"] = cfg.optim.weight_decay  # the decay group
    for group in run.optimizer.param_groups:
        group["momentum"], group["nesterov"] = cfg.optim.momentum, cfg.optim.nesterov
    run.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])
    run.state = state = RunState.from_checkpoint(ckpt)
    run.tstd = _restore_tstddev(ckpt["tstddev"], ctx, run.tdev)
    dali_state = None
    if len(ckpt["dali"]) == ctx.world_size:
        dali_state = ckpt["dali"][ctx.rank]
    elif state.step_in_epoch:
        run.reporter.message(
            f"world size changed ({len(ckpt['dali'])} -> {ctx.world_size}): epoch "
            f"{state.epoch + 1} restarts from its first step with a new data order"
        )
        state.restart_epoch()
    run.reporter.message(
        f"resumed {run.run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch}"
    )
    return dali_state


def _check_listing(saved: dict[str, Any], now: dict[str, Any], run_dir: Path, root: Path) -> None:
    """One line naming what differs where ``root`` does not list the run's train files."""
    if saved["sha256"] == now["sha256"]:
        return
    differs = [f"{saved[k]} {what} in the run, {now[k]} there"
               for k, what in (("classes", "classes"), ("train_files", "train files"))
               if saved[k] != now[k]]  # fmt: skip
    raise DalikdError(
        f"{root} is not the dataset {run_dir} was trained on: "
        f"{', '.join(differs) or 'other class or file names (or order)'}; the data order and "
        "DALI state refer to its train files"
    )


def _config_data_path(run_dir: Path) -> str:
    """config.json's data.path ("" where it cannot be read)."""
    try:
        path = json.loads((run_dir / "config.json").read_text())["data"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return path if isinstance(path, str) else ""


def _moved(paths: dict[str, str], old_roots: list[Path], new_root: Path) -> dict[str, str]:
    """``paths`` (absolute, under one of ``old_roots``) -> the same files under ``new_root``."""
    moved = {}
    for path, reason in paths.items():
        old = next((r for r in old_roots if Path(path).is_relative_to(r)), None)
        if old is not None:
            path = str(new_root / Path(path).relative_to(old))
        moved[path] = reason
    return moved


def _restore_tstddev(states: Any, ctx: distributed.Dist, tdev: torch.device) -> TStddev:
    """This rank's T. stddev accumulator from the saved ones (one per rank then)."""
    tstd = TStddev(group_size=0)
    states = [states] if isinstance(states, dict) else states  # a single dict: before gathering
    if len(states) > ctx.world_size:  # fewer ranks now: rank 0 takes the surplus
        states = [TStddev.combine([states[0], *states[ctx.world_size :]]),
                  *states[1 : ctx.world_size]]  # fmt: skip
    if ctx.rank < len(states):  # more ranks now: the new ones start empty
        tstd.load_state_dict(states[ctx.rank], tdev)
    return tstd


def _open_run_dir(run: Run) -> None:
    """Rank 0 writes config.json, metrics.jsonl and the data report; everyone hears the data."""
    dataset = run.dataset
    if run.ctx.is_main:
        run.tb = ScalarWriter(run.run_dir / "tb") if run.cfg.tensorboard else None
        run.run_dir.mkdir(parents=True, exist_ok=True)
        config = json.dumps(run.cfg.to_dict(), indent=2) + "\n"
        write_text_atomic(config, run.run_dir / "config.json")
        write_jsonl_atomic(run.state.history, run.run_dir / "metrics.jsonl")
        recovery.write_report(run.run_dir, dataset.skipped)
    n = len(dataset.skipped)
    left_out = f", {n} file{'s' if n > 1 else ''} left out (see data_report.tsv)" if n else ""
    run.reporter.message(
        f"data: {len(dataset.train):,} train / {len(dataset.val):,} val images, "
        f"{dataset.num_classes} classes{left_out}"
    )


def _open_loaders(run: Run, recipe: recipes.Recipe | None, dali_state: Any) -> None:
    """The training loader (a file that fails to decode is left out and the epoch goes on)
    and the validation loader; with --eval-teacher, the teacher's val accuracy first."""
    from dalikd import loaders  # DALI: only where the loaders are built

    cfg, ctx, dataset = run.cfg, run.ctx, run.dataset
    # Without a saved DALI state (a fresh start, or another world size) epoch e starts from
    # seed + e, so a restart does not replay the first epoch's order.
    try:
        run.train_data = recovery.TrainData(
            dataset, cfg.data, recipe, device=run.device, seed=cfg.seed,
            epoch=run.state.epoch, step=run.state.step_in_epoch, run_dir=run.run_dir,
            reporter=run.reporter, is_main=ctx.is_main, shard_id=ctx.rank,
            num_shards=ctx.world_size, granularity=cfg.kd.granularity,
            pool_size=cfg.kd.pool_size, checkpoint=dali_state,
        )  # fmt: skip
    except loaders.ForeignState as e:
        raise DalikdError(
            f"{run.run_dir / 'last.pt'}: {e}; start a new run, seeded with --student-weights "
            f"{run.run_dir / 'last.pt'}"
        ) from None
    run.val_data = loaders.val_loader(
        dataset.val, cfg.data, device=run.device, shard_id=ctx.rank, num_shards=ctx.world_size
    )
    if len(run.train_data) == 0:
        raise DalikdError(
            f"{len(dataset.train)} training images make no full batch of {cfg.data.batch_size}"
            f"{' per rank' if ctx.enabled else ''}; lower --batch-size"
        )
    if cfg.teacher_cache:  # around the distiller's teacher pass; the teacher built for
        run.caching = teacher_cache.attach(  # --eval-teacher or on the first uncached step
            cfg, run.dataset, run.distiller, device=run.device, rank=ctx.rank,
            world_size=ctx.world_size, graph_format=CHECKPOINT_FORMAT,
            val_batches=len(run.val_data), message=run.reporter.message,
            detached=bool(recovery.read_report(run.run_dir)),  # files failed: other views
        )  # fmt: skip
        run.caching.seek(run.state.epoch, run.state.step_in_epoch, len(run.train_data))
    teacher = run.distiller.teacher
    if teacher is not None and cfg.eval_teacher:
        t = evaluate(teacher, run.val_data, run.device, cfg.precision, ctx)
        run.reporter.message(
            f"teacher {cfg.model.teacher}: val top-1 {t['top1']:.2f}%  top-5 {t['top5']:.2f}%  "
            f"loss {t['loss']:.4f}"
        )

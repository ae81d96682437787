"""The training loop: distill a student from a frozen teacher (or train it supervised).

One function, read top to bottom: setup -> resume -> per epoch (lr -> forward -> backward ->
step -> log) -> validate -> checkpoint. The step is dalikd.step.Distiller with its teacher source
(dalikd.teacher), used only through its interface; the data comes from graphs built from one
data plan (dalikd.plan); the schedule is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalikd import distributed, recovery, rundir, sources, teacher_cache, tensorboard
from dalikd.atomic import write_jsonl_atomic, write_text_atomic
from dalikd.batch import data_norm
from dalikd.checkpoint import CHECKPOINT_FORMAT, RunState, save_atomic
from dalikd.config import OptimConfig, TrainConfig, build_config
from dalikd.data import Dataset
from dalikd.device import amp_dtype, resolve_device, torch_device
from dalikd.errors import DalikdError, RunInterrupted
from dalikd.evaluate import evaluate
from dalikd.metrics import GROUP_STEPS, TStddev
from dalikd.models import check_classes, checkpoint_classes, student_norm
from dalikd.plan import DataPlan, plan_of
from dalikd.reporter import Reporter, SilentReporter
from dalikd.resume import (
    load_resume,
    read_checkpoint,
    restore_training,
    restore_tstddev,
    run_dataset,
)
from dalikd.step import Distiller, build_student, make_optimizer
from dalikd.stop import StopSignals
from dalikd.teacher import LiveTeacher, TeacherSource
from dalikd.tensorboard import ScalarWriter

__all__ = ["Reporter", "SilentReporter", "StopSignals", "load_resume", "lr_at", "train"]


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


def _kept(run_dir: Path) -> str:
    """The note for a stop on bad numbers: only a run that saved a checkpoint has one to keep."""
    return "; last.pt keeps the last good checkpoint" if (run_dir / "last.pt").is_file() else ""


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
        rundir.refuse_inside_data(cfg.out or default_run_dir(), cfg.data.path)
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
    except (DalikdError, RuntimeError) as e:  # under torchrun: which rank, and why it stops
        said = distributed.explained(ctx, e)
        if said is None:
            raise
        raise said from None
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
    distiller: Distiller  # the student (the step calls it through DDP), teacher and losses
    teacher: TeacherSource | None  # the distiller's: the loop asks it for validation, counts
    student: nn.Module  # the student itself: what checkpoints save
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: RunState
    # T. stddev of this rank's teacher rows (x and the x' trained on), cumulative over the run;
    # pooled over the ranks at each epoch end (TStddev.pooled). A group is GROUP_STEPS steps of
    # rows (the reference's 5); its size in rows is set at the first step (0: not yet known).
    tstd: TStddev
    train_data: Any = None  # recovery.TrainData
    val_data: Any = None  # recovery.ValData
    failures: Any = None  # recovery.RunFailures: what the ranks left out, data_report.tsv
    tb: ScalarWriter | None = None  # --tensorboard: rank 0 writes the epoch records there too
    tstd_sized: bool = False  # the group size was checked against this run's (first step)
    # the scanned train listing (data.train_listing), saved in checkpoints: a resume from
    # another --data checks that it lists the same files
    listing: dict[str, Any] | None = None
    plan: DataPlan | None = None  # the data plan every graph of the run is built from

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
        loss_sum = torch.tensor(state.partial["loss_sum"] * ctx.is_main, device=tdev)  # all ranks'
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
                    reporter.step(step, loss, img_per_s, lr, cache=_counts(run))
            if save_now:  # checkpoint (mid-epoch)
                distributed.average_buffers(ctx, run.student)  # the state every rank resumes
                elapsed = time.perf_counter() - t0
                total = float(distributed.all_sum(ctx, loss_sum.clone()))  # every rank's so far
                state.partial = {"loss_sum": total, "seen": seen, "seconds": elapsed}
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
        "rank": run.ctx.rank,  # under torchrun every rank returns one; rank 0's is printed
        "epochs": run.cfg.optim.epochs,
        "epochs_done": state.epoch,
        "best_top1": state.best_top1,
        "final": state.history[-1] if state.history else {},
        # a stop in the last epoch's validation stopped nothing: the run is complete
        "stopped_by": stopped_by if state.epoch < run.cfg.optim.epochs else None,
        "step_in_epoch": state.step_in_epoch,
    }


def _counts(run: Run) -> tuple[int, int] | None:
    """(steps read from a teacher cache, computed) so far this run; None without a cache."""
    return run.teacher.counts() if run.teacher is not None else None


def _step(run: Run, batch: Any) -> dict[str, torch.Tensor]:
    """One optimization step; its teacher rows go into T. stddev. Returns the named losses."""
    # the views depend on the files left out so far too: a cache keys its steps by that as well
    at = run.state.position(run.ctx.rank)._replace(data=run.train_data.history)
    try:
        out = run.distiller.step(batch, run.optimizer, run.scaler, at)
    except torch.OutOfMemoryError:
        cfg = run.cfg
        raise DalikdError(
            f"out of memory at --batch-size {cfg.data.batch_size} "
            f"(student {cfg.model.student}, teacher {cfg.model.teacher or 'none'}); "
            "lower --batch-size"
        ) from None
    if out.tstd_sums is not None:  # exact: a lossy cache's stored ones, else the rows'
        if not run.tstd_sized:  # x's rows + the x' trained on, GROUP_STEPS times
            _size_tstddev(run, GROUP_STEPS * out.tstd_sums[2])
        run.tstd.add_sums(*out.tstd_sums)
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
    ctx = run.ctx
    # the teacher, or a cache's val logits (the teacher runs where they are not)
    teacher = None
    if run.teacher is not None:  # the batches depend on the files left out so far
        teacher = run.teacher.val_teacher(len(run.val_data), lambda: run.val_data.history)
    val = evaluate(run.student, run.val_data, run.device, run.cfg.precision, ctx, teacher=teacher,
                   progress=run.reporter.val_step, norm=run.plan.norm)  # fmt: skip
    counts = _counts(run)  # a cache's hits and misses: summed over the ranks with the rest
    totals = torch.tensor([float(loss_sum), float(seen), *(counts or ())], dtype=torch.float64,
                          device=run.tdev)  # fmt: skip
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
    if counts is not None:  # every rank's steps read from the cache / computed, so far
        record["cache_hits"], record["cache_misses"] = int(totals[2]), int(totals[3])
    if teacher is not None:  # over every rank's rows; NaN (before 2 groups) is written null
        t_std, entropy = run.tstd.pooled(lambda t: distributed.all_sum(ctx, t))
        record["t_stddev"] = t_std if math.isfinite(t_std) else None
        record["teacher_entropy"] = entropy if math.isfinite(entropy) else None
        record["group_rows"] = run.tstd.group_size
        # teacher-student agreement on val: top-1 (%) and KL(teacher || student) at T = 1
        record["val_agree_top1"], record["val_kl_ts"] = val["agree_top1"], val["kl_ts"]
    return record


def _save(run: Run, names: tuple[str, ...]) -> None:
    """All ranks call this: each contributes its DALI and T. stddev states; rank 0 writes."""
    ctx, state = run.ctx, run.state
    if ctx.is_main:  # a run thought lost, whose folder another run took over, writes nothing
        rundir.check_held(run.run_dir)
    # every rank's failures to every rank (the next epoch is planned without them), and into
    # data_report.tsv before the checkpoint that relies on it
    run.failures.share(run.train_data, run.val_data)
    if run.teacher is not None:  # a cache's chunks end where checkpoints do
        run.teacher.checkpoint()
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
        "plan": run.plan.to_dict(),
        "classes": list(run.dataset.classes),
        "train_listing": run.listing,
        "failed_sizes": run.failures.sizes(),  # a removed file keeps a teacher cache's key
    }
    for name in names:
        save_atomic(ckpt, run.run_dir / name)


# -- setup and resume ------------------------------------------------------------------------------


def _setup(cfg: TrainConfig, reporter: Reporter, resume: bool, device: str, ctx) -> Run:
    """Data, models, optimizer; the saved state where resuming; the run directory's files;
    the loaders."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.out)  # train() claimed it
    scanned = sources.open_dataset(cfg.data.path, max_pixels=cfg.data.max_pixels, verify=True,
                                   rank=ctx.rank, world_size=ctx.world_size,
                                   note=reporter.message)  # fmt: skip
    if cfg.model.teacher_weights:  # a dalikd checkpoint of other classes: wrong labels
        w = cfg.model.teacher_weights
        check_classes(checkpoint_classes(w), scanned.classes, f"teacher weights {w}")
    # saved absolute: a resume from another working directory finds the data and weights
    paths = {"data.path": sources.data_path(cfg.data.path), **rundir.absolute_weights(cfg.model)}
    cfg = build_config(overrides=paths, base=cfg)
    # read once here: its listing is checked before the models (another class count is the
    # data's mistake, not theirs), the rest restored by _resume
    ckpt = read_checkpoint(run_dir / "last.pt") if resume else None
    dataset, failed, listing = run_dataset(scanned, run_dir, ckpt)
    student = build_student(cfg.model, dataset.num_classes, device,
                            channels_last=cfg.channels_last)  # fmt: skip
    # the data plan, resolved once (config.json and checkpoints record it); dn: the data's norm
    dn = data_norm(cfg.data.mean, cfg.data.std)
    plan = plan_of(cfg, device, norm=student_norm(student, dn), raw_shape=dataset.raw_shape)
    cfg = build_config(overrides={"data.mixing": plan.data.mixing,
                                  "data.resize": plan.data.resize}, base=cfg)  # fmt: skip
    sizes = ckpt.get("failed_sizes", {}) if ckpt is not None else {}
    teacher = _teacher_source(cfg, plan, dataset, ctx, reporter, failed, sizes)
    # the teacher is frozen, there is nothing to synchronise: only the student is DDP-wrapped
    distiller = Distiller(student, teacher, cfg.kd, device, cfg.precision, cfg.channels_last,
                          ctx, data_norm=dn)  # fmt: skip
    if ctx.enabled:
        reporter.message(f"distributed: {ctx.world_size} rank(s), {ctx.backend}, DDP")
    optimizer = make_optimizer(student, cfg.optim)
    # Loss scaling only for fp16 autocast; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(enabled=amp_dtype(device, cfg.precision) == torch.float16)
    run = Run(cfg, device, ctx, run_dir, reporter, dataset, distiller, teacher, student,
              optimizer, scaler, RunState(), TStddev(group_size=0))  # fmt: skip
    run.listing, run.plan = listing, plan
    run.failures = recovery.RunFailures(run_dir, dataset, failed, ctx, reporter.message,
                                        sizes=sizes)  # fmt: skip
    dali_state = _resume(run, ckpt) if ckpt is not None else None
    _open_run_dir(run)
    _open_loaders(run, dali_state)
    return run


def _teacher_source(cfg, plan, dataset, ctx, reporter, failed, sizes) -> TeacherSource | None:
    """The teacher live (built now: a wrong teacher is one line before the data loads), or with
    --teacher-cache a CachedTeacher over the cache of this run's key (the teacher is built on
    the first step the cache lacks). The key lists the run's ``dataset`` with the files it
    reported (``failed``, of ``sizes``): removing them keeps the key."""
    if not cfg.model.teacher:
        return None
    live = LiveTeacher.from_config(cfg.model, dataset.num_classes, plan.device, plan.norm,
                                   channels_last=cfg.channels_last,
                                   data_norm=data_norm(cfg.data.mean, cfg.data.std))  # fmt: skip
    if not cfg.teacher_cache:
        live.module()
        return live
    listed = recovery.with_reported(dataset, failed, val=True)
    return teacher_cache.for_run(
        cfg, plan, listed, live, world_size=ctx.world_size, rank=ctx.rank,
        graph_format=CHECKPOINT_FORMAT, message=reporter.message, sizes=sizes,
    )  # fmt: skip


def _resume(run: Run, ckpt: dict[str, Any]) -> str | bytes | None:
    """Restore the run from its last.pt, ``ckpt``: weights, optimizer, scaler, RNG, RunState,
    T. stddev. Returns this rank's DALI state (None where the world size changed)."""
    ctx = run.ctx
    restore_training(ckpt, run.student, run.optimizer, run.scaler, run.cfg.optim,
                     run.run_dir / "last.pt")  # fmt: skip
    run.state = state = RunState.from_checkpoint(ckpt)
    run.tstd = restore_tstddev(ckpt["tstddev"], ctx, run.tdev)
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


def _open_run_dir(run: Run) -> None:
    """Rank 0 writes config.json, metrics.jsonl and the data report; everyone hears the data."""
    if run.ctx.is_main:
        run.tb = ScalarWriter(run.run_dir / "tb") if run.cfg.tensorboard else None
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # the settings, and the data plan resolved from them (a record: not read back)
        config = json.dumps({**run.cfg.to_dict(), "plan": run.plan.to_dict()}, indent=2) + "\n"
        write_text_atomic(config, run.run_dir / "config.json")
        write_jsonl_atomic(run.state.history, run.run_dir / "metrics.jsonl")
    run.failures.write()
    run.reporter.message(run.failures.summary())


def _open_loaders(run: Run, dali_state: Any) -> None:
    """The training loader (a file that fails to decode is left out and the epoch goes on)
    and the validation loader; with --eval-teacher, the teacher's val accuracy first."""
    from dalikd import loaders  # DALI: only where the loaders are built

    cfg, ctx = run.cfg, run.ctx
    # epoch e's order is drawn from the seed and e (recovery.epochs): a restart without a saved
    # state (another world size) does not replay the first epoch's
    try:
        run.train_data = run.failures.train_data(
            run.plan, epoch=run.state.epoch, step=run.state.step_in_epoch, checkpoint=dali_state
        )
    except loaders.ForeignState as e:
        raise DalikdError(
            f"{run.run_dir / 'last.pt'}: {e}; start a new run, seeded with --student-weights "
            f"{run.run_dir / 'last.pt'}"
        ) from None
    run.val_data = run.failures.val_data(run.plan, lambda: f"epoch {run.state.epoch + 1}")
    if run.teacher is not None and cfg.eval_teacher:  # (a cache's teacher is built for it)
        t = evaluate(run.teacher.module(), run.val_data, run.device, cfg.precision, ctx,
                     norm=run.plan.norm)  # fmt: skip
        run.reporter.message(
            f"teacher {cfg.model.teacher}: val top-1 {t['top1']:.2f}%  top-5 {t['top5']:.2f}%  "
            f"loss {t['loss']:.4f}"
        )

"""The training loop: distill a student from a frozen teacher (or train it supervised).

One function, read top to bottom: setup -> resume -> per epoch (lr -> forward -> backward ->
step -> log) -> validate -> checkpoint. The step is dalikd.step.Distiller; the schedule is a pure
function of the step.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dalikd import distributed, recipes, teacher_cache
from dalikd.checkpoint import save_atomic, write_jsonl_atomic, write_text_atomic
from dalikd.config import OptimConfig, TrainConfig, build_config
from dalikd.data import scan_dataset
from dalikd.device import amp_dtype, resolve_device, torch_device
from dalikd.errors import DalikdError
from dalikd.evaluate import evaluate
from dalikd.metrics import GROUP_STEPS, TStddev
from dalikd.step import Distiller, make_optimizer
from dalikd.tensorboard import ScalarWriter


class Reporter(Protocol):
    """What the loop tells the outside world; the CLI draws it with rich."""

    def message(self, text: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, step: int, loss: float, img_per_s: float, lr: float) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def message(self, text: str) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, step: int, loss: float, img_per_s: float, lr: float) -> None:
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


# 2: the DALI graph hands uint8 images over and seeds its draws explicitly; T. stddev is saved
# per rank. A checkpoint of another format cannot restore this version's data pipeline.
CHECKPOINT_FORMAT = 2


def load_resume(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config a run was started with, updated by flags given again (e.g. more epochs)."""
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.json").is_file():
        raise DalikdError(f"nothing to resume in {run_dir}: no last.pt and config.json there")
    found = _read_checkpoint(run_dir / "last.pt", mmap=True).get("format", 1)
    if found != CHECKPOINT_FORMAT:
        raise DalikdError(
            f"{run_dir / 'last.pt'} has checkpoint format {found}; this dalikd resumes format "
            f"{CHECKPOINT_FORMAT} only (its data pipeline changed). Start a new run; the old "
            f"weights can seed it: --student-weights {run_dir / 'last.pt'}"
        )
    saved = json.loads((run_dir / "config.json").read_text())
    return build_config(saved, {**overrides, "out": str(run_dir)})


def _read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise DalikdError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


_EPOCH_START = {"loss_sum": 0.0, "seen": 0, "seconds": 0.0}  # never mutated: rebound per epoch


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


def train(cfg: TrainConfig, reporter: Reporter | None = None, resume: bool = False) -> dict:
    """Train ``cfg.model.student``; return a summary.

    Writes config.json, metrics.jsonl, last.pt and best.pt in ``cfg.out`` (rank 0 only).
    ``resume=True`` continues from ``cfg.out/last.pt`` exactly where it stopped, mid-epoch
    included: weights, optimizer, schedule step, metrics and the DALI pipeline state.
    Launched by torchrun, each rank reads its own shard and the student is wrapped in DDP.
    """
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device != "gpu":
        raise DalikdError("--precision fp16 needs a GPU; on CPU use fp32 (default) or bf16")
    ctx = distributed.init(device)
    try:
        with StopSignals() as stop:
            return _train(cfg, reporter if ctx.is_main and reporter else SilentReporter(),
                          resume, device, ctx, stop)  # fmt: skip
    finally:
        distributed.shutdown(ctx)


def _train(cfg, reporter, resume, device, ctx, stop) -> dict:
    # -- setup: data, models, optimizer ---------------------------------------------------------
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.out or default_run_dir())
    cfg = build_config(overrides={"out": str(run_dir)}, base=cfg)
    dataset = scan_dataset(cfg.data.path)
    recipe = recipes.resolve(cfg.kd.aug)
    # --teacher-cache: the teacher is built on the first step the cache lacks (teacher_cache.attach)
    models = replace(cfg.model, teacher="") if cfg.teacher_cache else cfg.model
    distiller = Distiller.build(models, cfg.kd, dataset.num_classes, device, cfg.precision)
    student, teacher = distiller.student, distiller.teacher
    tdev = torch_device(device)
    optimizer = make_optimizer(student, cfg.optim)
    # Loss scaling only for fp16 autocast; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(enabled=amp_dtype(device, cfg.precision) == torch.float16)
    # The teacher stays unwrapped: it is frozen, there is nothing to synchronise.
    if ctx.enabled:  # the step calls the wrapper; checkpoints save the student itself
        distiller.student = DDP(student, device_ids=[ctx.local_rank] if device == "gpu" else None)

    # -- resume ---------------------------------------------------------------------------------
    epoch, step_in_epoch, global_step, best_top1, history = 0, 0, 0, -1.0, []
    partial = _EPOCH_START  # sums of the interrupted epoch so far
    dali_state = None
    # T. stddev of this rank's teacher rows (x and the x' trained on), cumulative over the run;
    # pooled over the ranks at each epoch end (TStddev.pooled). A group is GROUP_STEPS steps of
    # rows (the reference's 5); its size in rows is set at the first step (0: not yet known).
    tstd = TStddev(group_size=0)
    if resume:
        ckpt = _read_checkpoint(run_dir / "last.pt")
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        epoch, step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        global_step, best_top1, history = (
            ckpt["scheduler"]["step"],
            ckpt["best_top1"],
            ckpt["history"],
        )
        partial = ckpt["partial"]
        tstd_states = ckpt["tstddev"]  # one per rank (a single dict before they were gathered)
        tstd_states = [tstd_states] if isinstance(tstd_states, dict) else tstd_states
        if len(tstd_states) > ctx.world_size:  # fewer ranks now: rank 0 takes the surplus
            tstd_states = [TStddev.combine([tstd_states[0], *tstd_states[ctx.world_size :]]),
                           *tstd_states[1 : ctx.world_size]]  # fmt: skip
        if ctx.rank < len(tstd_states):  # more ranks now: the new ones start empty
            tstd.load_state_dict(tstd_states[ctx.rank], tdev)
        if len(ckpt["dali"]) == ctx.world_size:
            dali_state = ckpt["dali"][ctx.rank]
        elif step_in_epoch:
            reporter.message(
                f"world size changed ({len(ckpt['dali'])} -> {ctx.world_size}): epoch "
                f"{epoch + 1} restarts from its first step with a new data order"
            )
            global_step -= step_in_epoch
            step_in_epoch, partial = 0, _EPOCH_START
        reporter.message(f"resumed {run_dir} at epoch {epoch + 1}, step {step_in_epoch}")
    tb = None  # --tensorboard: rank 0 writes the epoch records to RUN_DIR/tb/ too
    if ctx.is_main:
        tb = ScalarWriter(run_dir / "tb") if cfg.tensorboard else None
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(cfg.to_dict(), indent=2) + "\n", run_dir / "config.json")
        write_jsonl_atomic(history, run_dir / "metrics.jsonl")
        report = "".join(f"{path}\t{reason}\n" for path, reason in dataset.skipped)
        write_text_atomic("path\treason\n" + report, run_dir / "data_report.tsv")
    left_out = (
        f", {len(dataset.skipped)} files left out (see data_report.tsv)" if dataset.skipped else ""
    )
    reporter.message(
        f"data: {len(dataset.train):,} train / {len(dataset.val):,} val images, "
        f"{dataset.num_classes} classes{left_out}"
    )

    # Without a saved DALI state (a fresh start, or another world size) epoch e starts from
    # seed + e, so a restart does not replay the first epoch's order.
    from dalikd import pipeline  # DALI: only where the loaders are built

    train_data = pipeline.train_loader(
        dataset.train, cfg.data, recipe, device=device,
        seed=cfg.seed + (epoch if dali_state is None else 0),
        shard_id=ctx.rank, num_shards=ctx.world_size, granularity=cfg.kd.granularity,
        pool_size=cfg.kd.pool_size, checkpoint=dali_state,
    )  # fmt: skip
    val_data = pipeline.val_loader(
        dataset.val, cfg.data, device=device, shard_id=ctx.rank, num_shards=ctx.world_size
    )
    steps_per_epoch = len(train_data)
    if steps_per_epoch == 0:
        raise DalikdError(
            f"{len(dataset.train)} training images make no full batch of {cfg.data.batch_size}"
            f"{' per rank' if ctx.enabled else ''}; lower --batch-size"
        )
    caching = None  # the teacher-output cache around the distiller's teacher pass
    if cfg.teacher_cache:
        caching = teacher_cache.attach(
            cfg, dataset, distiller, device=device, rank=ctx.rank, world_size=ctx.world_size,
            graph_format=CHECKPOINT_FORMAT, val_batches=len(val_data), message=reporter.message,
        )  # fmt: skip
        caching.seek(epoch, step_in_epoch, steps_per_epoch)
        teacher = distiller.teacher  # built by attach only for --eval-teacher
    if teacher is not None and cfg.eval_teacher:
        t = evaluate(teacher, val_data, device, cfg.precision, ctx)
        reporter.message(
            f"teacher {cfg.model.teacher}: val top-1 {t['top1']:.2f}%  top-5 {t['top5']:.2f}%  "
            f"loss {t['loss']:.4f}"
        )

    def save_checkpoint(path_names: tuple[str, ...]) -> None:
        """All ranks call this: each contributes its DALI and T. stddev states; rank 0 writes."""
        if caching is not None:  # the cache's chunks end where checkpoints do
            caching.cache.flush()
        states = distributed.gather_objects(ctx, train_data.checkpoint())
        tstd_states = distributed.gather_objects(ctx, tstd.state_dict(cpu=True))
        if not ctx.is_main:
            return
        if not all(p.isfinite().all() for p in student.parameters()):
            raise DalikdError(
                f"the weights became non-finite by step {global_step} (epoch {epoch + 1}); "
                "lower --lr; last.pt keeps the last good checkpoint"
            )
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"step": global_step},
            "scaler": scaler.state_dict(),
            "epoch": epoch,  # epochs completed
            "step_in_epoch": step_in_epoch,  # steps of the next epoch already done
            "partial": partial,
            "best_top1": best_top1,
            "history": history,
            "dali": states,
            "tstddev": tstd_states,
            "rng": torch.get_rng_state(),
            "config": cfg.to_dict(),
            "classes": list(dataset.classes),
        }
        for name in path_names:
            save_atomic(ckpt, run_dir / name)

    while epoch < cfg.optim.epochs:
        reporter.epoch_start(epoch, cfg.optim.epochs, steps_per_epoch)
        distiller.train()
        loss_sum = torch.tensor(partial["loss_sum"], device=tdev)
        seen, t0 = partial["seen"], time.perf_counter() - partial["seconds"]
        for batch in train_data:
            # lr
            lr = lr_at(global_step, steps_per_epoch, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                step_out = distiller.step(batch, optimizer, scaler)
            except torch.OutOfMemoryError:
                raise DalikdError(
                    f"out of memory at --batch-size {cfg.data.batch_size} "
                    f"(student {cfg.model.student}, teacher {cfg.model.teacher or 'none'}); "
                    "lower --batch-size"
                ) from None
            losses = step_out.losses
            if step_out.teacher_logits is not None:
                if not tstd.group_size:  # x's rows + the x' trained on, GROUP_STEPS times
                    tstd.group_size = GROUP_STEPS * len(step_out.teacher_logits)
                if caching is not None and caching.tstd_sums is not None:  # top-K cache hit
                    tstd.add_sums(*caching.tstd_sums)
                else:
                    tstd.add(step_out.teacher_logits.float().softmax(dim=1))
            global_step += 1
            step_in_epoch += 1
            loss_sum += losses["loss"].detach()
            seen += len(batch)
            # stop requests are agreed across ranks (a sync point, so at log boundaries only)
            boundary = step_in_epoch % cfg.log_every == 0 or step_in_epoch == steps_per_epoch
            stopping = (boundary or not ctx.enabled) and distributed.any_rank(
                ctx, stop.received is not None, tdev
            )
            # mid-epoch checkpoint: every ckpt_every steps, and before stopping
            periodic = bool(cfg.ckpt_every) and step_in_epoch % cfg.ckpt_every == 0
            save_now = step_in_epoch < steps_per_epoch and (stopping or periodic)
            # log: .item() is a CPU-GPU sync point, so only at log boundaries and before a
            # checkpoint, which must never hold the weights of a non-finite loss
            if boundary or save_now:
                loss = losses["loss"].item()
                if not math.isfinite(loss):
                    raise DalikdError(
                        f"loss is {loss} at step {global_step} (epoch {epoch + 1}); "
                        "lower --lr; last.pt keeps the last good checkpoint"
                    )
                if boundary:
                    img_per_s = seen * ctx.world_size / (time.perf_counter() - t0)
                    reporter.step(step_in_epoch, loss, img_per_s, lr)
            if save_now:
                elapsed = time.perf_counter() - t0
                partial = {"loss_sum": float(loss_sum), "seen": seen, "seconds": elapsed}
                save_checkpoint(("last.pt",))
                if stopping:
                    stop.received = stop.received or "SIGTERM"  # signalled on another rank
                    break
        if step_in_epoch < steps_per_epoch:  # stopped mid-epoch
            break
        train_seconds = time.perf_counter() - t0

        # validate
        val_teacher = caching.val_teacher if caching is not None else teacher
        val = evaluate(student, val_data, device, cfg.precision, ctx, teacher=val_teacher)
        totals = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64, device=tdev)
        distributed.all_sum(ctx, totals)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(totals[0]) / (steps_per_epoch * ctx.world_size),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "lr": lr,
            "img_per_s": float(totals[1]) / train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        if caching is not None:  # this rank's steps read from the cache / computed, so far
            record["cache_hits"], record["cache_misses"] = caching.cache.hits, caching.cache.misses
        if cfg.model.teacher:  # over every rank's rows; NaN (before 2 groups) is written null
            t_std, entropy = tstd.pooled(lambda t: distributed.all_sum(ctx, t))
            record["t_stddev"] = _finite_or_none(t_std)
            record["teacher_entropy"] = _finite_or_none(entropy)
            record["group_rows"] = tstd.group_size
            # teacher-student agreement on val: top-1 (%) and KL(teacher || student) at T = 1
            record["val_agree_top1"], record["val_kl_ts"] = val["agree_top1"], val["kl_ts"]
        history.append(record)
        epoch, step_in_epoch = epoch + 1, 0
        partial = _EPOCH_START

        # checkpoint: last.pt every epoch, best.pt when val top-1 improves
        improved = val["top1"] > best_top1
        best_top1 = max(best_top1, val["top1"])
        save_checkpoint(("last.pt", "best.pt") if improved else ("last.pt",))
        if ctx.is_main:
            write_jsonl_atomic(history, run_dir / "metrics.jsonl")
            if tb is not None:
                tb.add(record)
        reporter.epoch_end(record)
        if distributed.any_rank(ctx, stop.received is not None, tdev):
            stop.received = stop.received or "SIGTERM"
            break

    if tb is not None:
        tb.close()
    return {
        "run_dir": str(run_dir),
        "device": device,
        "world_size": ctx.world_size,
        "epochs": cfg.optim.epochs,
        "epochs_done": epoch,
        "best_top1": best_top1,
        "final": history[-1] if history else {},
        "stopped_by": stop.received,
        "step_in_epoch": step_in_epoch,
    }

"""Continuing a run: the config it is resumed with, and the checks and restores of last.pt.

``dalikd train --resume DIR`` reads DIR's config.json and last.pt (:func:`load_resume`): the
settings given again may change only what :data:`RESUMABLE` lists, the dataset may have moved
(it must list the same train files), and the checkpoint must be of this dalikd's format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dalikd import distributed, recovery, rundir
from dalikd.checkpoint import CHECKPOINT_FORMAT
from dalikd.config import OptimConfig, TrainConfig, build_config
from dalikd.data import Dataset
from dalikd.errors import DalikdError
from dalikd.metrics import TStddev
from dalikd.models import check_shapes


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
    missing = [name for name in ("last.pt", "config.json") if not (run_dir / name).is_file()]
    if missing:
        raise DalikdError(f"nothing to resume in {run_dir}: no {' and no '.join(missing)} there")
    ckpt = read_checkpoint(run_dir / "last.pt", mmap=True)
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
    _upgrade_saved(saved, ckpt)
    rundir.check_code_names(saved, ckpt.get("config"), run_dir)  # before anything reads it
    try:
        before = build_config(saved, {"out": str(run_dir)})
    except DalikdError as e:
        raise DalikdError(f"{run_dir / 'config.json'} is damaged: {e}") from None
    overrides = {**overrides, **rundir.same_weights(before.model, overrides)}
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


def _upgrade_saved(saved: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """config.json as this version reads it: the plan record dropped (resolved again), and the
    settings older versions did not write filled in from what they meant."""
    saved.pop("plan", None)  # the data plan the run resolved: a record, resolved again
    if "teacher_cache_format" not in saved and saved.get("teacher_cache"):
        # saved when the cache's format was its top-K alone (0: exact)
        topk = saved.get("teacher_cache_topk", 12)
        saved["teacher_cache_format"] = "topk" if isinstance(topk, int) and topk > 0 else "exact"
    data = saved.setdefault("data", {})
    if isinstance(data, dict) and ckpt.get("dali"):
        # saved before the mixing and resize paths were configuration: the DALI state names
        # its graph's operators
        from dalikd.plan import checkpoint_mixing, checkpoint_resize

        state = recovery.dali_state(ckpt["dali"][0])
        if "mixing" not in data and state is not None:
            data["mixing"] = checkpoint_mixing(state)
        if "resize" not in data and state is not None:
            data["resize"] = checkpoint_resize(state)


def _resume_data_path(
    run_dir: Path, saved: str, given: str | None, has_listing: bool
) -> dict[str, str]:
    """The data.path override of a resume: a dataset that moved (e.g. copied to a node's
    scratch disk) may be given; _resume checks that it is the same listing. A run from before
    the listing was recorded takes only its own folder under another spelling."""
    from dalikd import sources

    if given is None:
        if not sources.exists(saved):
            raise DalikdError(
                f"{run_dir}'s dataset folder {saved} is not there; give --data DIR where it "
                "is now (the same classes and train files)"
            )
        return {}
    where = sources.data_path(given)
    if not has_listing and where != str(Path(saved).expanduser().resolve()):
        raise DalikdError(
            f"{run_dir} cannot move to --data {where}: it was saved before dalikd recorded "
            f"its dataset's listing, so only its folder {saved} can be given"
        )
    return {"data.path": where}


# What --resume may change: the schedule is a pure function of the step, the loss weights and
# the optimizer's hyperparameters are read each step, the rest is bookkeeping. Everything else
# (batch size, images, augmentation, models, seed, device, ...) is fixed by the checkpoint.
RESUMABLE = frozenset(
    {"optim.epochs", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay",
     "optim.schedule", "optim.milestones", "optim.gamma", "optim.warmup_epochs",
     "kd.ce_weight", "kd.kd_weight", "kd.temperature", "kd.mixed_label_ce",
     "log_every", "ckpt_every", "eval_teacher", "channels_last", "tensorboard", "out",
     "teacher_cache", "teacher_cache_format", "teacher_cache_topk", "log_seconds"}
)  # fmt: skip


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's dict; a file torch cannot read is one line."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except (OSError, RuntimeError, ValueError):
            if not mmap:
                raise
            # mmap reads only whole zip checkpoints and, on a damaged one, advises re-saving
            # for mmap: read it plainly for the real reason (or the data of an older format)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        raise DalikdError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except Exception as e:  # torch's text for a cut-off zip, an empty file, another format
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise DalikdError(
            f"{path} is damaged (truncated or not a checkpoint): {reason or type(e).__name__}"
        ) from None


def check_listing(saved: dict[str, Any], now: dict[str, Any], run_dir: Path, root: Path) -> None:
    """One line naming what differs where ``root`` does not list the run's train files (or
    shards: a shard set's listing is its manifest's, dalikd.sources.listing)."""
    if saved["sha256"] == now["sha256"]:
        return
    was, kind = saved.get("source", "folder"), now.get("source", "folder")
    if was != kind:
        raise DalikdError(
            f"{root} is a {'shard set' if kind == 'shards' else 'folder of images'}; {run_dir} "
            f"was trained on a {'shard set' if was == 'shards' else 'folder'}, whose reader "
            "gives another data order: resume it on the same kind of data"
        )
    if kind == "shards":
        n, m = saved["train_files"], now["train_files"]
        what = f"{n:,} train samples in the run, {m:,} there" if n != m else "other shards or "
        what += "" if n != m else "checksums: another shard run, or its files changed"
        was_read = config_data_path(run_dir)
        if any(c in Path(was_read).name for c in "*?["):  # the run read a glob's shards
            what += f"; the run read the shards of {was_read}: give --data that glob, quoted"
        raise DalikdError(
            f"{root} is not the shard set {run_dir} was trained on ({what}); the data order and "
            "DALI state refer to the run's shards"
        )
    differs = [f"{saved[k]} {what} in the run, {now[k]} there"
               for k, what in (("classes", "classes"), ("train_files", "train files"))
               if saved[k] != now[k]]  # fmt: skip
    raise DalikdError(
        f"{root} is not the dataset {run_dir} was trained on: "
        f"{', '.join(differs) or 'other class or file names (or order)'}; the data order and "
        "DALI state refer to its train files"
    )


def config_data_path(run_dir: Path) -> str:
    """config.json's data.path ("" where it cannot be read)."""
    try:
        path = json.loads((run_dir / "config.json").read_text())["data"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return path if isinstance(path, str) else ""


def moved(paths: dict[str, str], old_roots: list[Path], new_root: Path) -> dict[str, str]:
    """``paths`` (absolute, under one of ``old_roots``) -> the same files under ``new_root``."""
    moved = {}
    for path, reason in paths.items():
        old = next((r for r in old_roots if Path(path).is_relative_to(r)), None)
        if old is not None:
            path = str(new_root / Path(path).relative_to(old))
        moved[path] = reason
    return moved


def restore_tstddev(states: Any, ctx: distributed.Dist, tdev: torch.device) -> TStddev:
    """This rank's T. stddev accumulator from the saved ones (one per rank then)."""
    tstd = TStddev(group_size=0)
    if len(states) > ctx.world_size:  # fewer ranks now: rank 0 takes the surplus
        states = [TStddev.combine([states[0], *states[ctx.world_size :]]),
                  *states[1 : ctx.world_size]]  # fmt: skip
    if ctx.rank < len(states):  # more ranks now: the new ones start empty
        tstd.load_state_dict(states[ctx.rank], tdev)
    return tstd


def run_dataset(
    scanned: Dataset, run_dir: Path, ckpt: dict[str, Any] | None
) -> tuple[Dataset, dict[str, str], dict[str, Any]]:
    """(the run's dataset, name -> reason of the samples it found failing, its train listing):
    the dataset as ``scanned`` (a folder's train split listing again the files the run reported
    that the user removed since: the same listing, the same sample identities,
    recovery.with_reported; a shard set's as its manifest says), checked against the
    checkpoint's listing where resuming (``ckpt``)."""
    from dalikd import sources

    failed = run_failures(run_dir, scanned.root, ckpt) if ckpt is not None else {}
    dataset = scanned if sources.is_shards(scanned) else recovery.with_reported(scanned, failed)
    listing = sources.listing(dataset)
    if ckpt is not None and ckpt.get("train_listing"):
        check_listing(ckpt["train_listing"], listing, run_dir, dataset.root)
    return dataset, failed, listing


def run_failures(run_dir: Path, root: Path, ckpt: dict[str, Any]) -> dict[str, str]:
    """name -> reason of the samples the run found failing while it trained or validated
    (data_report.tsv: a file's path, a shard sample's ``<shard path>:<key>``), named under the
    dataset's ``root`` now. The data may have moved (data.path): the report names them where
    they were, under the checkpoint's root or, where a later start rewrote it before dying,
    config.json's (a shard set given as a glob: its folder)."""
    from dalikd import sources

    roots = [ckpt["config"]["data"]["path"], config_data_path(run_dir)]
    roots = [Path(sources.root_of(r)) for r in roots if r]
    return moved(recovery.read_report(run_dir), roots, Path(root))


def restore_training(
    ckpt: dict[str, Any], student: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, optim: OptimConfig, where: Path,
) -> None:  # fmt: skip
    """The student's weights, the optimizer's and scaler's states and torch's RNG from
    ``ckpt`` (read from ``where``), the optimizer settings given again (``optim``) winning over
    the saved ones (lr is set at every step)."""
    check_shapes(student, ckpt["model"], f"{where} does not fit the student")
    student.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    optimizer.param_groups[0]["weight_decay"] = optim.weight_decay  # the decay group
    for group in optimizer.param_groups:
        group["momentum"], group["nesterov"] = optim.momentum, optim.nesterov
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])

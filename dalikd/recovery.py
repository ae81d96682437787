"""Keep a run alive through image files that pass the data scan and still fail in DALI.

The scan (:mod:`dalikd.datacheck`) reads headers and tails; a file can still kill the pipeline
at run time: a corrupt header, a truncated JPEG whose last 4 KiB hold an embedded thumbnail's
end marker, a file replaced or removed after a cached scan. DALI cannot skip a sample inside
a pipeline, and a pipeline that failed is dead. So :class:`TrainData` works around it:

1. the failing batch's files are found (the paths DALI names first, else the not-yet-seen
   files of the epoch, decoded batch by batch and the failing batch bisected to single files);
2. they join the run's skip list: ``data_report.tsv`` in the run directory, with the reason;
3. the rest of the epoch continues from a *remainder loader*: the epoch's good files not yet
   seen, shuffled, sized to the epoch's remaining steps (padded with already-seen files when
   the removed files leave it short, as DALI's ``pad_last_batch`` would); the next epoch
   starts a fresh loader without them.

"Same position" therefore means: the same epoch and step (the lr schedule and step count go
on unchanged), and every good image of the epoch that had not been trained on yet is trained
on before the epoch ends (less the tail of fewer than a batch that ``LastBatchPolicy.DROP``
leaves out of every epoch). It is not the order DALI would have drawn: the file list changed,
and DALI's per-epoch shuffle depends on it. A checkpoint taken inside a remainder saves its
file list and its DALI state, so a resumed run continues it bit-exactly.

To find which files a batch held, the loader is built ``indexed``: each batch carries the
positions of its samples in the loader's file list (``Batch.index``, on the CPU) beside their
labels. Single process only: under torchrun a failure is one line naming the
files (another rank cannot learn that this one shortened its epoch).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dalikd.data import Dataset, Split
from dalikd.errors import DalikdError, escape_text, unescape_text

REPORT = "data_report.tsv"
RUN_TIME = "failed in training"  # reason prefix of files this module adds to the report
_REMAINDER = "dalikd-remainder:"  # checkpoint prefix of a remainder loader's state


def read_report(run_dir: Path) -> dict[str, str]:
    """path -> reason of the files a run added to its skip list while training."""
    found: dict[str, str] = {}
    try:
        lines = (run_dir / REPORT).read_text(errors="surrogateescape").split("\n")[1:]
    except OSError:
        return found
    for line in lines:
        path, _, reason = line.partition("\t")
        if reason.startswith(RUN_TIME):
            found[unescape_text(path)] = unescape_text(reason)
    return found


def apply_skips(dataset: Dataset, skips: dict[str, str]) -> Dataset:
    """``dataset`` without the files of ``skips``, which join ``dataset.skipped``."""
    if not skips:
        return dataset

    def keep(split: Split) -> Split:
        idx = [i for i, f in enumerate(split.files) if f not in skips]
        return Split(tuple(split.files[i] for i in idx), tuple(split.labels[i] for i in idx))

    listed = {p for p, _ in dataset.skipped}
    extra = tuple((p, r) for p, r in sorted(skips.items()) if p not in listed)
    return replace(
        dataset, train=keep(dataset.train), val=keep(dataset.val), skipped=dataset.skipped + extra
    )


def write_report(run_dir: Path, skipped: tuple[tuple[str, str], ...]) -> None:
    """One row per file: path, tab, reason. A tab, newline or other control character in a
    name, a backslash, and bytes that are not UTF-8 are escaped (errors.escape_text), so a row
    is one line and :func:`read_report` gives the path back exactly."""
    from dalikd.atomic import write_text_atomic

    rows = (f"{escape_text(p, backslash=True)}\t{escape_text(r, backslash=True)}\n"
            for p, r in skipped)  # fmt: skip
    write_text_atomic("path\treason\n" + "".join(rows), run_dir / REPORT)


# -- finding the culprits ----------------------------------------------------------------------


def _dali_reason(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (after 'encountered:')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        if after:
            return after[0]
    return lines[-1] if lines else type(error).__name__


def _first_failure(files: list[str], plan: Any) -> str | None:
    """Decode ``files`` as one batch the way training reads them (raw files: reshaped); the
    DALI error or None."""
    from nvidia.dali import fn, pipeline_def

    from dalikd.loaders import _dali_device_id, pixels

    def graph():
        jpegs, _ = fn.readers.file(files=files, name="Check")
        return pixels(jpegs, plan)

    try:
        pipe = pipeline_def(graph)(
            batch_size=len(files), num_threads=plan.data.threads,
            device_id=_dali_device_id(plan.device), prefetch_queue_depth=1,
        )  # fmt: skip
        pipe.build()
        pipe.run()
    except RuntimeError as e:
        return _dali_reason(e)
    return None


def find_culprits(error: BaseException, candidates: list[str], plan: Any) -> dict[str, str]:
    """path -> reason for the files among ``candidates`` that fail to decode: the ones the
    DALI ``error`` names first; else every candidate, a batch at a time, and a failing batch
    bisected down to single files."""
    named = [f for f in candidates if f in str(error)]
    rest = [f for f in candidates if f not in named]
    bad: dict[str, str] = {}

    def bisect(files: list[str]) -> None:
        reason = _first_failure(files, plan)
        if reason is None:
            return
        if len(files) == 1:
            bad[files[0]] = reason
            return
        half = len(files) // 2
        bisect(files[:half])
        bisect(files[half:])

    for path in named:
        bisect([path])
    if not bad:
        step = max(1, plan.data.batch_size)
        for start in range(0, len(rest), step):
            bisect(rest[start : start + step])
    return bad


def dali_state(checkpoint: str | bytes) -> str | bytes:
    """The DALI pipeline state inside a :meth:`TrainData.checkpoint` (a remainder's wraps it)."""
    if isinstance(checkpoint, str) and checkpoint.startswith(_REMAINDER):
        return base64.b64decode(json.loads(checkpoint.removeprefix(_REMAINDER))["dali"])
    return checkpoint


def _as_bytes(checkpoint: str | bytes) -> bytes:
    return checkpoint if isinstance(checkpoint, bytes) else checkpoint.encode()


# -- the loader --------------------------------------------------------------------------------


@dataclass
class _Remainder:
    indices: list[int]  # into the training split, in the order they are read
    seed: int


class TrainData:
    """The training loader of ``dalikd train``, with run-time decode failures recovered.

    Same interface as :class:`dalikd.loaders.Loader` (iterate one epoch, ``len()``,
    ``checkpoint()``), built from the data plan ``plan``. ``epoch``, ``step``: where the run is
    (a resumed one, mid-epoch). ``seed``: the run's (epoch e starts from seed + e).
    """

    def __init__(
        self,
        dataset: Dataset,
        plan: Any,
        *,
        epoch: int,
        step: int = 0,
        run_dir: Path,
        reporter: Any,
        is_main: bool = True,
        shard_id: int = 0,
        num_shards: int = 1,
        checkpoint: str | bytes | None = None,
    ) -> None:
        self.dataset = dataset
        # training's loader: the GPU decoder preallocates (loaders.decoder_args)
        self._plan, self._seed, self._epoch = replace(plan, preallocate=True), plan.seed, epoch
        self._run_dir, self._reporter, self._is_main = run_dir, reporter, is_main
        self._shard = dict(shard_id=shard_id, num_shards=num_shards)
        batch_size = plan.data.batch_size
        per_shard = len(dataset.train) // num_shards
        if per_shard < batch_size:
            raise DalikdError(
                f"{len(dataset.train)} training images make no full batch of "
                f"{batch_size}{' per rank' if num_shards > 1 else ''}; lower --batch-size"
            )
        self._remainder: _Remainder | None = None
        self._steps = per_shard // batch_size
        seed = plan.seed
        self._step = step  # steps of the current epoch done
        if isinstance(checkpoint, str) and checkpoint.startswith(_REMAINDER):
            state = json.loads(checkpoint.removeprefix(_REMAINDER))
            self._remainder = _Remainder(state["indices"], state["seed"])
            self._step = state["step"]
            dali = base64.b64decode(state["dali"])  # DALI's checkpoint is bytes
            self._loader = self._build(self._remainder.indices, state["seed"], dali)
        else:  # a fresh epoch e starts from seed + e; a DALI state carries its own
            self._loader = self._build(
                None, seed + (epoch if checkpoint is None else 0), checkpoint
            )

    def _build(self, indices: list[int] | None, seed: int, checkpoint: str | None):
        from dalikd import loaders

        train = self.dataset.train
        self._picked = list(range(len(train)) if indices is None else indices)
        split = Split(tuple(train.files[i] for i in self._picked),
                      tuple(train.labels[i] for i in self._picked))  # fmt: skip
        shard = self._shard if indices is None else {}
        return loaders.train_loader(split, self._plan, seed=seed, checkpoint=checkpoint,
                                    indexed=True, **shard)  # fmt: skip

    def __len__(self) -> int:
        return self._steps

    def checkpoint(self) -> str | bytes:
        if self._remainder is None:
            return self._loader.checkpoint()
        dali = base64.b64encode(_as_bytes(self._loader.checkpoint())).decode()
        state = {"indices": self._remainder.indices, "seed": self._remainder.seed,
                 "step": self._step, "dali": dali}  # fmt: skip
        return _REMAINDER + json.dumps(state)

    def __iter__(self) -> Iterator[Any]:
        seen: list[int] = []  # train indices trained on this epoch since the loader was built
        while True:
            try:
                for batch in self._loader:
                    # positions in the loader's files, on the CPU: no copy back from the GPU
                    seen += [self._picked[i] for i in batch.index.tolist()]
                    self._step += 1
                    yield batch
                    if self._remainder is not None and self._step >= self._steps:
                        break  # the remainder may hold more than the epoch's slots
                break
            except RuntimeError as error:
                if "pipeline" not in str(error) or self._step >= self._steps:
                    raise
                seen = self._recover(error, seen)
        self._epoch, self._step = self._epoch + 1, 0
        if self._remainder is not None:  # the next epoch reads every good file again
            self._remainder = None
            self._loader = self._build(None, self._seed + self._epoch, None)
            self._steps = len(self._loader)

    def _recover(self, error: RuntimeError, seen: list[int]) -> list[int]:
        """Leave the failing files out and continue the epoch from a remainder loader;
        returns ``seen`` in the new dataset's indices."""
        train = self.dataset.train
        where = f"epoch {self._epoch + 1}, step {self._step + 1}"
        pool = self._remainder.indices if self._remainder is not None else range(len(train))
        taken = set(seen)
        todo = [i for i in pool if i not in taken]
        culprits = find_culprits(error, [train.files[i] for i in todo], self._plan)
        if not culprits:
            raise DalikdError(
                f"the data pipeline failed at {where} and no single file explains it: "
                f"{_dali_reason(error)}"
            ) from None
        if self._shard["num_shards"] > 1:
            raise DalikdError(
                f"{', '.join(sorted(culprits))} failed to decode at {where} "
                f"({next(iter(culprits.values()))}); under torchrun a run cannot drop a file "
                "mid-epoch: remove it and start the run again"
            ) from None
        self._reporter.message(
            f"left out {len(culprits)} file(s) that failed to decode at {where}: "
            f"{', '.join(sorted(culprits))}; the epoch goes on without them (see {REPORT})"
        )
        # the dataset without the culprits; indices are mapped into it
        self.dataset = apply_skips(
            self.dataset, {p: f"{RUN_TIME} ({where}): {r}" for p, r in culprits.items()}
        )
        if self._is_main:
            write_report(self._run_dir, self.dataset.skipped)
        new_index = {f: i for i, f in enumerate(self.dataset.train.files)}
        remap = {i: new_index[f] for i, f in enumerate(train.files) if f in new_index}
        good_left = [remap[i] for i in todo if i in remap]
        seen = [remap[i] for i in seen if i in remap]
        need = (self._steps - self._step) * self._plan.data.batch_size
        rng = np.random.default_rng([self._seed, self._epoch, self._step, len(seen)])
        # every unseen file, not only ``need``: more bad ones may hide among them, and a later
        # recovery starts again from whatever is still unseen
        order = [good_left[i] for i in rng.permutation(len(good_left))]
        if len(order) < need:  # the removed files left the epoch short: pad with seen ones
            pad = seen or good_left  # (none seen yet: it failed in the epoch's first batch)
            if not pad:
                raise DalikdError(
                    f"every training file left at {where} failed to decode; see {REPORT}"
                ) from None
            order += [pad[i] for i in rng.choice(len(pad), need - len(order),
                                                 replace=len(pad) < need - len(order))]  # fmt: skip
        self._remainder = _Remainder(order, int(rng.integers(2**31)))
        self._loader = self._build(self._remainder.indices, self._remainder.seed, None)
        return seen

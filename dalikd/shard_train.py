"""The training loader of a shard set: :class:`ShardTrainData`, what
:class:`dalikd.recovery.TrainData` is for a folder (the same interface: iterate one epoch,
``len()``, ``checkpoint()``, ``dataset``), built from the same data plan, with the same
shuffling rules (epoch e of a fresh start from seed + e, one seed on every rank), the same
batches per rank, and DALI's checkpoint for an exact mid-epoch resume.

A sample that fails to decode kills DALI's pipeline without naming it (docs/shards.md). Here
it is found and named in one line (its shard and key), and the run stops:

1. the batches carry their samples' numbers (``Batch.index``), but the failing batch never
   comes out. The reader's state after the last batch taken is in the dead loader's
   checkpoint; a *reader-only* pipeline (the same reader, the same arguments: the same order)
   restored to it (:func:`reader_state`) replays the sample numbers of the next batches
   without decoding them;
2. those samples are decoded again, a batch at a time, by DALI's decoder on the run's device,
   and a failing batch is bisected down to single samples
   (:func:`undecodable`); ``ShardSplit.image(n)`` reads a sample's bytes through its index.

Leaving the sample out and going on (as folders do) is the recovery module's to add: the pieces
it needs are :func:`find_failed` (number -> reason) and
:meth:`dalikd.shards.ShardSplit.subset` (the same tars read through filtered index files: a
remainder loader over the epoch's samples not yet trained on, less the failed ones).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dalikd.data import Dataset
from dalikd.errors import DalikdError
from dalikd.shards import ShardSplit

WINDOW = 3  # batches replayed after the last one taken: the failing one, and DALI's prefetch


class ShardTrainData:
    """The training loader of ``dataset`` (a shard set, :func:`dalikd.sources.open_dataset`)
    for ``plan``; arguments as :class:`dalikd.recovery.TrainData`'s (``run_dir``,
    ``reporter``, ``is_main``: unused until failed samples are left out)."""

    def __init__(
        self,
        dataset: Dataset,
        plan: Any,
        *,
        epoch: int,
        step: int = 0,
        run_dir: Path | None = None,
        reporter: Any = None,
        is_main: bool = True,
        shard_id: int = 0,
        num_shards: int = 1,
        checkpoint: str | bytes | None = None,
    ) -> None:
        from dalikd import loaders

        self.dataset = dataset
        self._split: ShardSplit = dataset.train  # type: ignore[assignment]
        # training's loader: the GPU decoder preallocates (loaders.decoder_args)
        self._plan = replace(plan, preallocate=True)
        self._shard = dict(shard_id=shard_id, num_shards=num_shards)
        batch_size = plan.data.batch_size
        per_rank = len(self._split) // num_shards
        if per_rank < batch_size:
            raise DalikdError(
                f"{len(self._split)} training images make no full batch of "
                f"{batch_size}{' per rank' if num_shards > 1 else ''}; lower --batch-size"
            )
        self._steps = per_rank // batch_size
        self._epoch, self._step = epoch, step
        # a fresh epoch e starts from seed + e (as folders); a DALI state carries its own
        self._seed = plan.seed + (epoch if checkpoint is None else 0)
        self._loader = loaders.train_loader(
            self._split, self._plan, seed=self._seed, checkpoint=checkpoint, indexed=True,
            **self._shard,
        )  # fmt: skip
        # where a replay starts: the last state known (None: the reader's start) and the
        # batches taken since
        self._origin, self._taken = checkpoint, 0

    def __len__(self) -> int:
        return self._steps

    def checkpoint(self) -> str | bytes:
        state = self._loader.checkpoint()
        self._origin, self._taken = state, 0
        return state

    def __iter__(self) -> Iterator[Any]:
        try:
            for batch in self._loader:
                self._taken += 1
                self._step += 1
                yield batch
        except RuntimeError as error:
            if "pipeline" not in str(error):
                raise
            raise self._failure(error) from None
        self._epoch, self._step = self._epoch + 1, 0

    def _failure(self, error: RuntimeError) -> DalikdError:
        """The one line for a pipeline that died: the sample that fails to decode, named."""
        where = f"epoch {self._epoch + 1}, step {self._step + 1}"
        try:  # the dead loader still knows the state after the last batch taken
            state, skip = self._loader.checkpoint(), 0
        except RuntimeError:
            state, skip = self._origin, self._taken
        failed = find_failed(self._split, self._plan, state=state, skip=skip,
                             seed=self._seed, **self._shard)  # fmt: skip
        if not failed:
            return DalikdError(
                f"the data pipeline failed at {where} and no single sample of its batch "
                f"explains it: {dali_reason(error)}"
            )
        number, reason = next(iter(failed.items()))
        shard, key = self._split.locate(number)
        more = f" (and {len(failed) - 1} more near it)" if len(failed) > 1 else ""
        return DalikdError(
            f"{self._split.folder / shard}: sample {key} fails to decode at {where} "
            f"({reason}){more}; dalikd check-data {self._split.folder} --decode lists every "
            "such sample: shard the source again without it"
        )


# -- finding the sample ---------------------------------------------------------------------------


def find_failed(
    split: ShardSplit,
    plan: Any,
    *,
    state: str | bytes | None,
    skip: int,
    seed: int,
    shard_id: int,
    num_shards: int,
    window: int = WINDOW,
) -> dict[int, str]:
    """number -> reason of the samples that fail to decode among the ``window`` batches after
    ``skip`` batches from the training reader's ``state`` (a DALI checkpoint of the training
    graph, or None: the reader's start with ``seed``)."""
    numbers = replay(split, plan.data.batch_size, state=state, batches=skip + window,
                     seed=seed, shard_id=shard_id, num_shards=num_shards)[skip:]  # fmt: skip
    candidates = list(dict.fromkeys(n for batch in numbers for n in batch))
    return undecodable(split, candidates, plan)


def replay(
    split: ShardSplit,
    batch_size: int,
    *,
    state: str | bytes | None,
    batches: int,
    seed: int,
    shard_id: int,
    num_shards: int,
) -> list[list[int]]:
    """The sample numbers of the next ``batches`` batches of the training reader, read by a
    pipeline of the reader alone (nothing decoded) restored to the reader's part of ``state``.
    """
    from nvidia.dali import pipeline_def

    from dalikd.shard_source import read_shards

    def build(checkpoint: bytes | None) -> Any:
        def graph() -> Any:
            return read_shards(split, shuffle=True, shard_id=shard_id, num_shards=num_shards,
                               seed=seed)[2]  # fmt: skip

        pipe = pipeline_def(graph, enable_checkpointing=True)(
            batch_size=batch_size, num_threads=1, device_id=None, seed=seed, checkpoint=checkpoint
        )
        pipe.build()
        return pipe

    pipe = build(None)
    if state is not None:
        pipe = build(reader_state(_as_bytes(state), _as_bytes(pipe.checkpoint())))
    out = []
    for _ in range(batches):
        (numbers,) = pipe.run()
        out.append([int(np.asarray(n)[0]) for n in numbers])
    return out


def undecodable(split: ShardSplit, numbers: list[int], plan: Any) -> dict[int, str]:
    """number -> DALI's reason for each of ``numbers`` that fails to decode (a batch at a time;
    a failing batch bisected to single samples)."""
    bad: dict[int, str] = {}

    def bisect(part: list[int]) -> None:
        reason = _decode_failure([split.image(n) for n in part], plan)
        if reason is None:
            return
        if len(part) == 1:
            bad[part[0]] = reason
            return
        bisect(part[: len(part) // 2])
        bisect(part[len(part) // 2 :])

    step = max(1, plan.data.batch_size)
    for start in range(0, len(numbers), step):
        bisect(numbers[start : start + step])
    return bad


def _decode_failure(images: list[bytes], plan: Any) -> str | None:
    """Decode ``images`` as one batch with DALI's decoder on the plan's device: its error's
    reason, or None."""
    from nvidia.dali import fn, pipeline_def, types

    from dalikd.loaders import _dali_device_id

    def graph() -> Any:
        data = fn.external_source(name="bytes", dtype=types.UINT8)
        return fn.decoders.image(
            data, device="mixed" if plan.device == "gpu" else "cpu", output_type=types.RGB
        )

    try:
        pipe = pipeline_def(graph)(
            batch_size=len(images), num_threads=plan.data.threads,
            device_id=_dali_device_id(plan.device), prefetch_queue_depth=1,
        )  # fmt: skip
        pipe.build()
        pipe.feed_input("bytes", [np.frombuffer(b, np.uint8) for b in images])
        pipe.run()
    except RuntimeError as e:
        return dali_reason(e)
    return None


def dali_reason(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (after 'encountered:')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else type(error).__name__


# -- the reader's part of a DALI checkpoint -------------------------------------------------------
#
# A DALI 2.4 checkpoint is a protobuf message: field 1 (repeated) one operator's checkpoint
# {1: operator name, 2: its state}, field 2 the pipeline's and iterator's context. A pipeline
# restores only a checkpoint naming exactly its operators, so the reader-only replay takes the
# reader's entry (and the context) from the training graph's checkpoint and its other
# operators' entries from its own fresh checkpoint. tests/test_shards_train.py checks it on the
# DALI installed: an upgrade that changes the layout fails there.


def reader_state(trained: bytes, fresh: bytes) -> bytes:
    """``fresh`` (a checkpoint of the reader-only pipeline) with the entries of the operators
    both graphs have (the reader) and the context taken from ``trained``."""
    theirs = {_op_name(body): raw for number, raw, body in _fields(trained) if number == 1}
    out = b"".join(
        theirs.get(_op_name(body), raw) for number, raw, body in _fields(fresh) if number == 1
    )
    return out + b"".join(raw for number, raw, _ in _fields(trained) if number == 2)


def _as_bytes(state: str | bytes) -> bytes:
    return state if isinstance(state, bytes) else state.encode("latin-1")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(field number, raw bytes, payload) of each length-delimited field of a message."""
    i = 0
    while i < len(data):
        key, j = _varint(data, i)
        if key & 7 != 2:
            raise ValueError("not a DALI checkpoint of the layout dalikd knows")
        size, k = _varint(data, j)
        yield key >> 3, data[i : k + size], data[k : k + size]
        i = k + size


def _op_name(body: bytes) -> bytes:
    return next(payload for number, _, payload in _fields(body) if number == 1)

"""The training data of ``dalikd train`` (and of the tools that show or probe it): an epoch at a
time, each rank its own reads (:mod:`.epochs`), a file that fails to decode left out mid-epoch."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from dalikd.errors import DalikdError
from dalikd.recovery.culprits import dali_reason, is_decode_failure
from dalikd.recovery.epochs import (
    after_failure,
    epoch_reads,
    history_id,
    remainder_seed,
)
from dalikd.recovery.report import RUN_TIME, failure_epoch
from dalikd.recovery.source import SampleSource

STATE = "dalikd-data:"  # prefix of a checkpoint's data state (JSON)

# told of files left out: ({path: reason as the report has it}, "epoch E, step S")
FailureHook = Callable[[dict[str, str], str], None]


def dali_state(checkpoint: str | bytes) -> str | bytes | None:
    """The DALI pipeline state inside a :meth:`TrainData.checkpoint` (None: an epoch not begun)."""
    if isinstance(checkpoint, str) and checkpoint.startswith(STATE):
        dali = json.loads(checkpoint.removeprefix(STATE))["dali"]
        return None if dali is None else base64.b64decode(dali)
    return checkpoint


def _as_bytes(checkpoint: str | bytes) -> bytes:
    return checkpoint if isinstance(checkpoint, bytes) else checkpoint.encode()


class TrainData:
    """Training batches, an epoch per iteration, with run-time decode failures recovered.

    ``source``: the training split (:class:`~dalikd.recovery.source.SampleSource`); ``plan``: the
    data plan the graphs are built from (its seed orders the epochs). ``epoch``, ``step``: where
    the run is (a resumed one, mid-epoch, with ``checkpoint``: this rank's
    :meth:`checkpoint`). ``failed``: identity -> the epoch (1-based) the sample failed in, as
    the run's report says (left out from the next epoch on). ``rank`` of ``world``: this
    process. ``on_failure`` hears of the files this rank leaves out, as they are found.
    ``preallocate``: the GPU decoder's preallocation (training's; not the tools').

    Same interface as :class:`dalikd.loaders.Loader` (iterate one epoch, ``len()``,
    ``checkpoint()``), plus what the run shares between ranks: :meth:`take_failures` (found
    here since last asked) and :meth:`learn` (found on other ranks), and :attr:`history`, what
    the current step's views depend on beyond the settings (for a teacher cache).
    """

    def __init__(
        self,
        source: SampleSource,
        plan: Any,
        *,
        epoch: int,
        step: int = 0,
        failed: Mapping[int, int] | None = None,
        rank: int = 0,
        world: int = 1,
        checkpoint: str | bytes | None = None,
        on_failure: FailureHook | None = None,
        preallocate: bool = True,
    ) -> None:
        self.source = source
        # training's loader: the GPU decoder preallocates (loaders.decoder_args); the tools
        # that read training's data (tstddev, preview) go without
        self._data_plan, self._seed = replace(plan, preallocate=preallocate), plan.seed
        self._batch, self._rank, self._world = plan.data.batch_size, rank, world
        self._failed = dict(failed or {})
        self._on_failure = on_failure or (lambda found, where: None)
        self._new: list[tuple[str, str]] = []  # (name, reason) found here, not yet taken
        self._loader: Any = None
        self._graph: bytes | None = None  # the last loader's DALI state: it names the graph
        self._start_epoch(epoch)
        self._plan()  # too few images for a batch: one line now
        self._step = step  # steps of the current epoch done
        if isinstance(checkpoint, str) and checkpoint.startswith(STATE):
            self._restore(json.loads(checkpoint.removeprefix(STATE)))
        elif checkpoint is not None:
            raise DalikdError("the checkpoint's data state is of an older dalikd; start a new run")

    # -- the epoch's plan ----------------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._step, self._start = epoch, 0, 0
        self._failures: list[tuple[int, list[int]]] = []  # (step, identities) this epoch here
        self._dali: bytes | None = None  # the state to resume the next loader from
        self._reads: list[int] | None = None  # planned when first asked (_plan)

    def _plan(self) -> list[int]:
        """The epoch's reads, planned from every failure known when it is first asked for (the
        ranks tell each other theirs at the checkpoint that ends the epoch before)."""
        if self._reads is None:
            epoch = self._epoch
            good = [i for i in range(len(self.source)) if self._failed.get(i, epoch + 1) > epoch]
            self._reads, self._extra = epoch_reads(
                good, seed=self._seed, epoch=epoch, rank=self._rank, world=self._world,
                batch=self._batch, groups=self.source.groups,
            )  # fmt: skip
            if not self._reads:
                per = " per rank" if self._world > 1 else ""
                raise DalikdError(
                    f"{len(good)} training images make no full batch of {self._batch}{per}; "
                    "lower --batch-size"
                )
        return self._reads

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch: its failures replayed, the last loader's DALI state."""
        if (state["epoch"], state["step"]) != (self._epoch, self._step):
            return
        self._graph = None if state["dali"] is None else base64.b64decode(state["dali"])
        if not self._step:
            return  # saved at an epoch's end: the next one starts afresh, its own pipeline
        for step, ids in state["failures"]:
            self._reads = after_failure(self._plan(), self._extra, step, ids, self._batch)
            self._failures.append((step, list(ids)))
            self._start = step
        self._dali = self._graph
        if self._dali is not None:  # built now: a state of another graph is one line at start
            self._loader = self._build()

    def __len__(self) -> int:
        return len(self._plan()) // self._batch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def history(self) -> str:
        """What the next step's views depend on beyond the settings: the samples left out
        before this epoch and this rank's failures in it so far ("" when none)."""
        known = (i for i, e in self._failed.items() if e <= self._epoch)
        return history_id(known, self._failures)

    def _build(self) -> Any:
        seed = self._seed + self._epoch
        if self._start:
            seed = remainder_seed(self._seed, self._epoch, self._start)
        return self.source.loader(self._plan()[self._start * self._batch :], self._data_plan,
                                  train=True, seed=seed, rank=self._rank,
                                  checkpoint=self._dali)  # fmt: skip

    def checkpoint(self) -> str:
        """This rank's place in the epoch: its failures so far and the DALI state of the loader
        it reads from (bit-exact on resume; at an epoch's start the last loader's, which only
        names the graph's operators: the epoch starts afresh)."""
        dali = self._dali or self._graph
        if self._loader is not None:
            dali = _as_bytes(self._loader.checkpoint())
        state = {"epoch": self._epoch, "step": self._step,
                 "failures": [[s, ids] for s, ids in self._failures],
                 "dali": None if dali is None else base64.b64encode(dali).decode()}  # fmt: skip
        return STATE + json.dumps(state)

    # -- one epoch -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        steps = len(self)
        while self._step < steps:
            if self._loader is None:
                self._loader = self._build()
            try:
                for batch in self._loader:
                    self._step += 1
                    yield batch
                    if self._step >= steps:
                        break
                else:
                    break
            except RuntimeError as error:
                if not is_decode_failure(error):
                    raise
                self._recover(error)
        if self._loader is not None:
            self._graph = _as_bytes(self._loader.checkpoint())
        self._loader = None  # frees the pipeline before the next epoch builds its own
        self._start_epoch(self._epoch + 1)

    def _recover(self, error: RuntimeError) -> None:
        """Leave the failing samples out; the epoch goes on from a loader over the rest."""
        self._loader = None
        where = f"epoch {self._epoch + 1}, step {self._step + 1}"
        unseen = self._plan()[self._step * self._batch :]
        found = self.source.culprits(error, unseen, self._data_plan)
        if not found:
            raise DalikdError(
                f"the data pipeline failed at {where} and no single {self.source.what} explains "
                "it: "
                f"{dali_reason(error)}"
            ) from None
        self._reads = after_failure(self._reads, self._extra, self._step, found, self._batch)
        if not self._reads:
            raise DalikdError(
                f"every training {self.source.what} left at {where} failed to decode"
            ) from None
        self._failures.append((self._step, sorted(found)))
        self._start, self._dali = self._step, None
        rank = f", rank {self._rank}" if self._world > 1 else ""
        named = {self.source.name(i): f"{RUN_TIME} ({where}{rank}): {r}" for i, r in found.items()}
        for i in found:
            self._failed[i] = self._epoch + 1
        self._new += named.items()
        self._on_failure(named, where)

    # -- what ranks share ----------------------------------------------------------------------

    def take_failures(self) -> list[tuple[str, str]]:
        """(name, reason) of the samples this rank left out since the last call."""
        new, self._new = self._new, []
        return new

    def learn(self, failures: list[tuple[str, str]]) -> None:
        """Samples another rank left out (from its :meth:`take_failures`): this rank leaves them
        out from the next epoch on (an epoch not begun yet is planned again)."""
        for name, reason in failures:
            i = self.source.index(name)
            if i is not None and i not in self._failed:
                self._failed[i] = failure_epoch(reason) or self._epoch + 1
                if self._failed[i] <= self._epoch and self._step == 0 and self._loader is None:
                    self._reads = None

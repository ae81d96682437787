"""The validation data of ``dalikd train`` and ``dalikd eval``: every good file of this rank's
part once per pass, in file order; a file that fails to decode is left out and the pass goes
on with the files after it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dalikd.errors import DalikdError
from dalikd.recovery.culprits import dali_reason, is_decode_failure
from dalikd.recovery.report import VAL_TIME
from dalikd.recovery.source import SampleSource
from dalikd.recovery.train_data import FailureHook


class ValData:
    """Validation batches, a pass per iteration, with decode failures recovered.

    Rank ``rank`` of ``world`` reads the slice ``[N r / n, N (r + 1) / n)`` of the ``N`` good
    samples of ``source`` (no padding: a rank never evaluates a sample twice, and ranks may
    differ by a batch; evaluation has no collective per batch). ``failed``: identities left out
    before (the run's report). ``where()`` names the pass in a failure's reason ("epoch 3");
    ``on_failure`` hears of the files left out, as they are found. :meth:`take_failures` and
    :meth:`learn` share them between ranks, as :class:`~dalikd.recovery.TrainData`'s do.
    """

    def __init__(
        self,
        source: SampleSource,
        plan: Any,
        *,
        rank: int = 0,
        world: int = 1,
        failed: Iterable[int] = (),
        where: Callable[[], str] = lambda: "",
        on_failure: FailureHook | None = None,
    ) -> None:
        self.source, self._plan, self._rank, self._world = source, plan, rank, world
        self._failed = set(failed)
        self._where, self._on_failure = where, on_failure or (lambda found, where: None)
        self._new: list[tuple[str, str]] = []
        self._cached: tuple[tuple[int, ...], Any] | None = None  # (part, its loader)

    def _part(self) -> list[int]:
        good = [i for i in range(len(self.source)) if i not in self._failed]
        n, r, w = len(good), self._rank, self._world
        return good[n * r // w : n * (r + 1) // w]

    def __len__(self) -> int:
        return math.ceil(len(self._part()) / self._plan.data.batch_size)

    @property
    def history(self) -> str:
        """Which samples are left out ("" when none): the batches of a pass depend on it."""
        if not self._failed:
            return ""
        return hashlib.sha256(repr(sorted(self._failed)).encode()).hexdigest()[:16]

    def _loader(self, part: list[int]) -> Any:
        if self._cached is None or self._cached[0] != tuple(part):
            self._cached = None  # frees the pipeline first
            self._cached = (tuple(part), self.source.loader(part, self._plan, train=False))
        return self._cached[1]

    def __iter__(self) -> Iterator[Any]:
        todo = self._part()
        loader = self._loader(todo) if todo else None
        done = 0  # samples of ``todo`` evaluated
        while loader is not None:
            try:
                for batch in loader:
                    done += len(batch)
                    yield batch
                return
            except RuntimeError as error:
                if not is_decode_failure(error):
                    raise
                todo, done = self._recover(error, todo[done:]), 0
                self._cached = None  # the failed pipeline is dead
                loader = self.source.loader(todo, self._plan, train=False) if todo else None

    def _recover(self, error: RuntimeError, unseen: list[int]) -> list[int]:
        """Leave the failing samples out; the unseen good ones, in order."""
        found = self.source.culprits(error, unseen, self._plan)
        if not found:
            raise DalikdError(
                f"the validation pipeline failed and no single {self.source.what} explains it: "
                f"{dali_reason(error)}"
            ) from None
        where = self._where()
        named = {self.source.name(i): f"{VAL_TIME}{f' ({where})' if where else ''}: {r}"
                 for i, r in found.items()}  # fmt: skip
        self._failed |= set(found)
        self._new += named.items()
        self._on_failure(named, where)
        return [i for i in unseen if i not in found]

    def take_failures(self) -> list[tuple[str, str]]:
        """(name, reason) of the samples this rank left out since the last call."""
        new, self._new = self._new, []
        return new

    def learn(self, failures: list[tuple[str, str]]) -> None:
        """Samples another rank left out: left out here too from the next pass on."""
        for name, _ in failures:
            i = self.source.index(name)
            if i is not None:
                self._failed.add(i)

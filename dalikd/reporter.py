"""What a training run tells the outside world (:class:`Reporter`); the CLI draws it with rich,
the library's own callers stay silent (:class:`SilentReporter`)."""

from __future__ import annotations

from typing import Any, Protocol


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

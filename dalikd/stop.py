"""Stop requests: SIGTERM, SIGINT and SIGUSR1 ask a training run to stop after its current step
(a preemption, a job scheduler's warning, Ctrl-C), and it then checkpoints and returns."""

from __future__ import annotations

import signal
import threading
from typing import Any


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

"""`--tensorboard`: the scalars of metrics.jsonl, one point per epoch, in RUN_DIR/tb/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalikd.errors import DalikdError


def require() -> None:
    """Raise the one-line DalikdError when tensorboard is not installed (called before a run
    creates its directory, so a refused run leaves nothing behind)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  needs tensorboard
    except ImportError:
        raise DalikdError(
            "--tensorboard needs tensorboard: pip install 'dalikd[tensorboard]'"
        ) from None


class ScalarWriter:
    """TensorBoard event files under ``log_dir``: each epoch record's numbers, tagged with
    their metrics.jsonl key, at step = epoch. A resumed run appends a new event file there."""

    def __init__(self, log_dir: str | Path) -> None:
        require()
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            # null (e.g. T. stddev before two groups) is left out, as a gap
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=record["epoch"])
        self._writer.flush()  # once per epoch: a crash loses nothing already in metrics.jsonl

    def close(self) -> None:
        self._writer.close()

"""Training curves of one or more runs from their metrics.jsonl, overlaid in one PNG.

Four panels, one point per epoch: train and val loss, val top-1, learning rate, and the
teacher's T. stddev (distillation runs only). Each run is a line (the same colour in every
panel) named by its directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dalikd.atomic import write_atomic
from dalikd.errors import DalikdError
from dalikd.outputs import output_file

# (panel title, y label, y scale, [(metrics.jsonl key, line style)]); the loss on a log scale:
# an early val-loss spike (hundreds, in a short run's first epoch) would flatten the rest
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("loss (solid: train, dashed: val)", "loss", "log", [("train_loss", "-"), ("val_loss", "--")]),
    ("val top-1", "%", "linear", [("val_top1", "-")]),
    ("learning rate (at the epoch's end)", "lr", "linear", [("lr", "-")]),
    ("teacher T. stddev (KD runs)", "T. stddev", "linear", [("t_stddev", "-")]),
]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``run_dir/metrics.jsonl``; one-line errors for a missing,
    empty or unreadable file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DalikdError(f"{run_dir} is not a run directory: no metrics.jsonl there")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:  # a binary file, or another file under that name
        raise DalikdError(f"{path} is not a metrics file (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise DalikdError(f"cannot read {path}: {e}") from None
    except OSError as e:
        raise DalikdError(f"cannot read {path}: {e.strerror or e}") from None
    if not all(isinstance(r, dict) for r in records):
        raise DalikdError(f"{path} is not a metrics file: a line is no JSON object of metrics")
    if not records:
        raise DalikdError(f"{path} has no finished epoch yet")
    return records


def run_names(run_dirs: list[str | Path]) -> list[str]:
    """A legend name per run: the directory's name, or its whole path where names repeat."""
    names = [Path(d).name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):
        return [str(d) for d in run_dirs]
    return names


def _value(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if value is not None else math.nan  # null (not yet defined): a gap


def curves_figure(runs: dict[str, list[dict[str, Any]]]) -> Any:
    """A matplotlib Figure with the :data:`PANELS` (2x2) for ``{name: records}``.

    A run without a key (e.g. ``t_stddev`` of a supervised run) draws no line in that panel.
    """
    # The object API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, ylabel, yscale, series) in zip(axes, PANELS, strict=True):
        for colour, (name, records) in zip(colours, runs.items(), strict=True):
            epochs = [r["epoch"] for r in records]
            for key, style in series:
                if not any(key in r for r in records):
                    continue
                label = name if style == "-" or len(series) == 1 else None
                ax.plot(epochs, [_value(r, key) for r in records], style, color=colour,
                        marker="o", markersize=3, label=label)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_yscale(yscale)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no run has this metric", ha="center", va="center",
                    transform=ax.transAxes, color="grey")  # fmt: skip
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_curves(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Read each run's metrics.jsonl and write their overlaid curves to ``out`` (a *.png;
    its missing folders are made)."""
    if not run_dirs:
        raise DalikdError("give at least one run directory")
    runs = {name: read_metrics(d) for name, d in zip(run_names(run_dirs), run_dirs, strict=True)}
    out = output_file(out, "--out", (".png",))  # missing folders made, PNG bytes in *.png
    fig = curves_figure(runs)
    write_atomic(out, lambda f: fig.savefig(f, format="png"))
    return out

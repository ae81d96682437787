"""rich output for the CLI: the training progress bar and the end-of-run tables."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dalikd.errors import escape_text

console = Console(highlight=False)


class LiveBar:
    """One transient rich bar at a time (description, bar, done/total, ``extra`` columns, times);
    a context manager. The reporters below and in the other commands build on it.

    The bar is drawn on a terminal only: written to a pipe or a file, a log keeps just the
    printed lines (the reporters print a plain progress line there instead, at most every
    ``log_seconds``).
    """

    def __init__(self, *extra: TextColumn) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
            disable=not console.is_terminal,
        )  # fmt: skip
        self._task: Any = None

    def __enter__(self) -> Any:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def _new_bar(self, description: str, total: int, **fields: Any) -> None:
        """Replace the current bar (if any) by a new one."""
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, **fields)


class RichReporter(LiveBar):
    """Implements dalikd.train.Reporter: one bar per epoch with loss and live images/s, and a
    transient bar while validating. In a pipe or a file (nohup, SLURM) the bars are off: a plain
    progress line at most every ``log_seconds`` instead (0: at every update), so a long epoch
    still shows it runs. ``clock`` (seconds) is injectable for tests."""

    def __init__(
        self, log_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(TextColumn("{task.fields[stats]}{task.fields[cache]}"))
        self._log_seconds, self._clock = log_seconds, clock
        self._epoch = ""  # "epoch 3/90"
        self._phase = ""  # "train" or "val": what the current bar (or progress line) counts
        self._last_line = 0.0  # clock at the last progress line (or at the phase's start)
        self._ref: tuple[float, int] | None = None  # (clock, step) of the phase's first update

    def message(self, text: str) -> None:
        # never broken at the width; no markup: paths may hold [brackets]; control characters
        # in a file name escaped (one line, no terminal escapes)
        self._progress.console.print(escape_text(text), soft_wrap=True, markup=False)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch = f"epoch {epoch + 1}/{epochs}"
        self._start_phase("train")
        self._new_bar(self._epoch, steps, stats="loss -  - img/s  lr -", cache="")

    def step(
        self, step: int, loss: float, img_per_s: float, lr: float,
        cache: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        stats = f"loss {fmt_loss(loss)}  {img_per_s:,.0f} img/s  lr {lr:.4g}"
        cache_text = "" if cache is None else f"  cache {cache[0]} hit / {cache[1]} miss"
        self._progress.update(self._task, completed=step, stats=stats, cache=cache_text)
        total = int(self._progress.tasks[-1].total or step)
        self._log_line(f"step {step}/{total}", step, total, stats + cache_text)

    def val_step(self, done: int, total: int) -> None:
        if self._phase != "val":
            self._start_phase("val")
            self._new_bar(f"{self._epoch} validation", total, stats="", cache="")
        self._progress.update(self._task, completed=done)
        self._log_line(f"validation {done}/{total}", done, total, "")

    def epoch_end(self, record: dict[str, Any]) -> None:
        if self._task is not None:  # the validation bar goes before the epoch's line
            self._progress.remove_task(self._task)
            self._task = None
        # one line per epoch however narrow the terminal (or a pipe's 80 columns)
        self._progress.console.print(epoch_line(record), soft_wrap=True, markup=False)

    def _start_phase(self, phase: str) -> None:
        self._phase, self._last_line, self._ref = phase, self._clock(), None

    def _log_line(self, where: str, done: int, total: int, fields: str) -> None:
        """The pipe's progress line, at most every log_seconds (the terminal has the bar)."""
        if self._progress.console.is_terminal:
            return
        now = self._clock()
        if self._ref is None:  # the rate counts from the first update (a resume starts mid-way)
            self._ref = (now, done)
        if now - self._last_line < self._log_seconds:
            return
        self._last_line = now
        t_ref, done_ref = self._ref
        eta = "-"
        if done > done_ref:
            eta = str(timedelta(seconds=round((now - t_ref) / (done - done_ref) * (total - done))))
        percent = f"({100 * done // max(total, 1)}%)"
        line = f"{self._epoch} {where} {percent}  {fields + '  ' if fields else ''}eta {eta}"
        self._progress.console.print(line, soft_wrap=True, markup=False)


def fmt_loss(value: float) -> str:
    """A loss for a log line: 4 decimals, or 4 significant digits in scientific notation when
    that would hide it (>= 1e5, or under 1e-3 but not 0); inf and nan as Python writes them."""
    if not math.isfinite(value) or value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def epoch_line(record: dict[str, Any]) -> str:
    """The log line of one epoch's metrics.jsonl record."""
    agree = ""
    if "val_agree_top1" in record:
        agree = f"agree {record['val_agree_top1']:.2f}%  KL(t||s) {fmt_loss(record['val_kl_ts'])}  "
    cache = ""
    if "cache_hits" in record:
        cache = f"teacher cache {record['cache_hits']} hit / {record['cache_misses']} miss  "
    return (
        f"epoch {record['epoch']}: train loss {fmt_loss(record['train_loss'])}  "
        f"val loss {fmt_loss(record['val_loss'])}  top-1 {record['val_top1']:.2f}%  "
        f"top-5 {record['val_top5']:.2f}%  {agree}{cache}{record['img_per_s']:,.0f} img/s  "
        f"{record['seconds']:.1f} s"
    )


def print_summary(summary: dict[str, Any]) -> None:
    final = summary["final"]
    rows = [("run directory", summary["run_dir"]), ("device", summary["device"]),
            ("epochs", str(summary["epochs"]))]  # fmt: skip
    if final:
        rows += [
            ("final val top-1 / top-5", f"{final['val_top1']:.2f}% / {final['val_top5']:.2f}%"),
            ("final val loss", fmt_loss(final["val_loss"])),
            ("train images/s (last epoch)", f"{final['img_per_s']:,.0f}"),
        ]
    files = "config.json  metrics.jsonl  last.pt  best.pt"
    report = Path(summary["run_dir"]) / "data_report.tsv"  # the files left out, and why
    if report.is_file() and len(report.read_bytes().splitlines()) > 1:  # more than its header
        files += "  data_report.tsv"
    rows += [("best val top-1", f"{summary['best_top1']:.2f}%"), ("files", files)]
    if not console.is_terminal:  # a log: whole, greppable lines, never a cell wrapped at 80
        for key, value in rows:
            console.print(f"{key}: {value}", soft_wrap=True, markup=False)
        return
    table = Table(title="dalikd train", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def print_table(table: Table, to: Console | None = None) -> None:
    """Print a rich table: as is on a terminal; to a pipe or a file (a log) at 200 columns, so
    no cell wraps at the pipe's default 80, and without the padding that ends each line."""
    to = to or console
    if to.is_terminal:
        to.print(table)
        return
    wide = Console(file=io.StringIO(), width=200, color_system=None, highlight=False)
    wide.print(table)
    lines = wide.file.getvalue().splitlines()
    to.out("\n".join(line.rstrip() for line in lines), highlight=False)


def print_eval(model: str, weights: str, result: dict[str, float]) -> None:
    table = Table(title=f"{model} ({weights})")
    for col in ("images", "top-1 %", "top-5 %", "loss"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result["count"]),
        f"{result['top1']:.2f}",
        f"{result['top5']:.2f}",
        fmt_loss(result["loss"]),
    )
    print_table(table)


def print_recipes(infos: list[Any]) -> None:
    table = Table(title="augmentation recipes (--aug NAME, A+B, or file.py:function)")
    table.add_column("name", style="bold")
    table.add_column("mixing")
    table.add_column("description")
    for info in infos:
        table.add_row(info.name, "yes" if info.mixing else "", escape(info.description))
    print_table(table)


def print_demo(rows: list[dict[str, Any]]) -> None:
    if not console.is_terminal:  # a log: one whole line per run, no truncated cells
        for r in rows:
            line = (f"{r['model']}  {r['role']}: val top-1 {r['val_top1']:.2f}%  "
                    f"val loss {fmt_loss(r['val_loss'])}  {r['run']}")  # fmt: skip
            console.print(line, soft_wrap=True, markup=False)
        return
    table = Table(title="dalikd demo: digits (10 classes)")
    for col, justify in (("model", "left"), ("role", "left"), ("val top-1 %", "right"),
                         ("val loss", "right"), ("run", "left")):  # fmt: skip
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            r["model"], r["role"], f"{r['val_top1']:.2f}", fmt_loss(r["val_loss"]), r["run"]
        )
    console.print(table)


class ScanProgress(LiveBar):
    """A bar for the data scan; shown only once a scan has files to check."""

    def update(self, done: int, total: int) -> None:
        if self._task is None:
            self._new_bar("checking files", total)
        self._progress.update(self._task, completed=done)


def print_check(dataset: Any) -> None:
    # One plain line per file (no table): paths stay whole and greppable; a name's control
    # characters escaped, as in data_report.tsv.
    for path, reason in dataset.skipped:
        line = f"left out: {escape_text(path)}  ({escape_text(reason)})"
        console.print(line, soft_wrap=True, markup=False)
    if dataset.empty_val:  # not files left out: those classes only have no val images
        console.print(
            f"note: {len(dataset.empty_val)} val class folder(s) hold no image, so those classes "
            f"are not validated: {', '.join(escape_text(p) for p in dataset.empty_val)}",
            soft_wrap=True, markup=False,
        )  # fmt: skip
    console.print(
        f"{dataset.root}: {len(dataset.train):,} train and {len(dataset.val):,} val images "
        f"usable, {dataset.num_classes} classes, {len(dataset.skipped)} "
        f"file{'' if len(dataset.skipped) == 1 else 's'} left out",
        soft_wrap=True,
    )

"""rich output for the CLI: the training progress bar and the end-of-run tables."""

from __future__ import annotations

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

console = Console(highlight=False)


class LiveBar:
    """One transient rich bar at a time (description, bar, done/total, ``extra`` columns, times);
    a context manager. The reporters below and in the other commands build on it.

    The bar is drawn on a terminal only: written to a pipe or a file, a log keeps just the
    printed lines.
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
    """Implements dalikd.train.Reporter: one bar per epoch with loss and live images/s."""

    def __init__(self) -> None:
        fields = (
            "loss {task.fields[loss]}  {task.fields[speed]} img/s  lr {task.fields[lr]}"
            "{task.fields[cache]}"
        )
        super().__init__(TextColumn(fields))

    def message(self, text: str) -> None:
        # never broken at the width; no markup: paths may hold [brackets]
        self._progress.console.print(text, soft_wrap=True, markup=False)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._new_bar(f"epoch {epoch + 1}/{epochs}", steps, loss="-", speed="-", lr="-", cache="")

    def step(
        self, step: int, loss: float, img_per_s: float, lr: float,
        cache: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        self._progress.update(
            self._task,
            completed=step,
            loss=f"{loss:.4f}",
            speed=f"{img_per_s:,.0f}",
            lr=f"{lr:.4g}",
            cache="" if cache is None else f"  cache {cache[0]} hit / {cache[1]} miss",
        )

    def epoch_end(self, record: dict[str, Any]) -> None:
        # one line per epoch however narrow the terminal (or a pipe's 80 columns)
        self._progress.console.print(epoch_line(record), soft_wrap=True, markup=False)


def epoch_line(record: dict[str, Any]) -> str:
    """The log line of one epoch's metrics.jsonl record."""
    agree = ""
    if "val_agree_top1" in record:
        agree = f"agree {record['val_agree_top1']:.2f}%  KL(t||s) {record['val_kl_ts']:.4f}  "
    cache = ""
    if "cache_hits" in record:
        cache = f"teacher cache {record['cache_hits']} hit / {record['cache_misses']} miss  "
    return (
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}  "
        f"val loss {record['val_loss']:.4f}  top-1 {record['val_top1']:.2f}%  "
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
            ("final val loss", f"{final['val_loss']:.4f}"),
            ("train images/s (last epoch)", f"{final['img_per_s']:,.0f}"),
        ]
    rows += [("best val top-1", f"{summary['best_top1']:.2f}%"),
             ("files", "config.json  metrics.jsonl  last.pt  best.pt")]  # fmt: skip
    if not console.is_terminal:  # a log: whole, greppable lines, never a cell wrapped at 80
        for key, value in rows:
            console.print(f"{key}: {value}", soft_wrap=True, markup=False)
        return
    table = Table(title="dalikd train", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def print_eval(model: str, weights: str, result: dict[str, float]) -> None:
    table = Table(title=f"{model} ({weights})")
    for col in ("images", "top-1 %", "top-5 %", "loss"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result["count"]),
        f"{result['top1']:.2f}",
        f"{result['top5']:.2f}",
        f"{result['loss']:.4f}",
    )
    console.print(table)


def print_recipes(infos: list[Any]) -> None:
    table = Table(title="augmentation recipes (--aug NAME, A+B, or file.py:function)")
    table.add_column("name", style="bold")
    table.add_column("mixing")
    table.add_column("description")
    for info in infos:
        table.add_row(info.name, "yes" if info.mixing else "", escape(info.description))
    console.print(table)


def print_demo(rows: list[dict[str, Any]]) -> None:
    if not console.is_terminal:  # a log: one whole line per run, no truncated cells
        for r in rows:
            line = (f"{r['model']}  {r['role']}: val top-1 {r['val_top1']:.2f}%  "
                    f"val loss {r['val_loss']:.4f}  {r['run']}")  # fmt: skip
            console.print(line, soft_wrap=True, markup=False)
        return
    table = Table(title="dalikd demo: digits (10 classes)")
    for col, justify in (("model", "left"), ("role", "left"), ("val top-1 %", "right"),
                         ("val loss", "right"), ("run", "left")):  # fmt: skip
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            r["model"], r["role"], f"{r['val_top1']:.2f}", f"{r['val_loss']:.4f}", r["run"]
        )
    console.print(table)


class ScanProgress(LiveBar):
    """A bar for the data scan; shown only once a scan has files to check."""

    def update(self, done: int, total: int) -> None:
        if self._task is None:
            self._new_bar("checking files", total)
        self._progress.update(self._task, completed=done)


def print_check(dataset: Any) -> None:
    # One plain line per file (no table): paths stay whole and greppable.
    for path, reason in dataset.skipped:
        console.print(f"left out: {path}  ({reason})", soft_wrap=True, markup=False)
    console.print(
        f"{dataset.root}: {len(dataset.train):,} train and {len(dataset.val):,} val images "
        f"usable, {dataset.num_classes} classes, {len(dataset.skipped)} "
        f"file{'' if len(dataset.skipped) == 1 else 's'} left out",
        soft_wrap=True,
    )

"""``data_report.tsv``: every file a run leaves out, with the reason (one row per file: path, tab,
reason), and the run's *base listing*, which a resume checks against the dataset it is given.

The files a run found failing while it trained or validated carry reasons that start
:data:`RUN_TIME` or :data:`VAL_TIME` and name the epoch ("failed in training (epoch 2, step 14):
..."); a resume reads them back (:func:`read_report`) and leaves them out again. The base listing
of a run is its train split as scanned **plus** every file its report names as failed in
training (:func:`with_reported`): a file the user removed after the run reported it stays in the
listing, so "remove the file and ``--resume``" finds the same listing, and the same sample
identities (a sample's index in the listing), as the run that reported it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from dalikd.data import Dataset, Split
from dalikd.errors import escape_text, unescape_text

REPORT = "data_report.tsv"
RUN_TIME = "failed in training"  # reason prefix of training files that failed in DALI
VAL_TIME = "failed in validation"  # the same for validation files
_EPOCH = re.compile(r"\(epoch (\d+)")


def read_report(run_dir: Path) -> dict[str, str]:
    """path -> reason of the files a run found failing while it trained or validated."""
    found: dict[str, str] = {}
    try:
        lines = (run_dir / REPORT).read_text(errors="surrogateescape").split("\n")[1:]
    except OSError:
        return found
    for line in lines:
        path, _, reason = line.partition("\t")
        if reason.startswith((RUN_TIME, VAL_TIME)):
            found[unescape_text(path)] = unescape_text(reason)
    return found


def failure_epoch(reason: str) -> int:
    """The epoch (1-based) a report's reason says the file failed in; 0 where it names none."""
    match = _EPOCH.search(reason)
    return int(match[1]) if match else 0


def write_report(run_dir: Path, skipped: tuple[tuple[str, str], ...] | list) -> None:
    """One row per file: path, tab, reason. A tab, newline or other control character in a
    name, a backslash, and bytes that are not UTF-8 are escaped (errors.escape_text), so a row
    is one line and :func:`read_report` gives the path back exactly."""
    from dalikd.atomic import write_text_atomic

    rows = (f"{escape_text(p, backslash=True)}\t{escape_text(r, backslash=True)}\n"
            for p, r in skipped)  # fmt: skip
    write_text_atomic("path\treason\n" + "".join(rows), run_dir / REPORT)


def with_reported(dataset: Dataset, reported: dict[str, str], val: bool = False) -> Dataset:
    """``dataset`` whose train split lists again the files ``reported`` as failed in training
    that the scan no longer lists (removed since, or now left out), each in its class folder's
    place (the scan's order: class, then path); ``val``: its val split too, the files reported
    as failed in validation (a teacher cache's key lists them). A reported path outside
    ``<split>/<class>/`` is ignored; nothing else changes."""
    splits = {"train": RUN_TIME, **({"val": VAL_TIME} if val else {})}
    for name, when in splits.items():
        split = _relisted(dataset, name, {p: r for p, r in reported.items() if r.startswith(when)})
        dataset = replace(dataset, **{name: split}) if split is not None else dataset
    return dataset


def _relisted(dataset: Dataset, name: str, reported: dict[str, str]) -> Split | None:
    """Split ``name`` of ``dataset`` with the ``reported`` files it lacks, in place; None where
    it lacks none."""
    index = {name: i for i, name in enumerate(dataset.classes)}
    folder, split = Path(dataset.root) / name, getattr(dataset, name)
    if not isinstance(split, Split):  # a shard set's: its manifest's samples, never relisted
        return None
    listed = set(split.files)
    missing: list[tuple[int, str]] = []
    for path in reported:
        parent = Path(path).parent
        if path not in listed and parent.parent == folder and parent.name in index:
            missing.append((index[parent.name], path))
    if not missing:
        return None
    rows = sorted([*zip(split.labels, split.files, strict=True), *missing])
    return Split(tuple(f for _, f in rows), tuple(label for label, _ in rows))


def report_rows(
    skipped: tuple[tuple[str, str], ...], failed: dict[str, str]
) -> list[tuple[str, str]]:
    """The report's rows: the scan's files left out (a file that also failed in the run is
    listed once, with the run's reason), then the run's failures in the order they were found."""
    return [(p, r) for p, r in skipped if p not in failed] + list(failed.items())


class LeftOutWarning:
    """The ``on_failure`` of a tool without a run folder (eval, tstddev, preview): each file
    left out said once, as a one-line RuntimeWarning naming it and why ("dalikd: left out ...")."""

    def __init__(self, what: str = "file") -> None:
        self.what, self.said = what, set()

    def __call__(self, named: dict[str, str], where: str) -> None:
        import warnings

        new = {p: r for p, r in named.items() if p not in self.said}
        if not new:
            return
        self.said |= set(new)
        at = f" at {where}" if where else ""
        warnings.warn(
            f"dalikd: left out {len(new)} {self.what}(s) that failed to decode{at}: "
            f"{', '.join(escape_text(p) for p in sorted(new))} ({next(iter(new.values()))})",
            RuntimeWarning,
            stacklevel=2,
        )

"""One rank's view of a cache folder: its key, and the chunks of steps it reads and writes.

Chunks are written by :class:`ChunkWriter` and read by :class:`ChunkReader`, through the one
reader and writer of cache files (:mod:`.files`: checksums, regular files only, trust). A chunk
holds the steps of one epoch between two checkpoints of the writing run, each step stored in the
cache's format (:mod:`dalikd.teacher_cache.formats`) with the pick's indices, the exact T. stddev
sums (lossy formats) and, per chunk, what the format changed: the sum and a histogram of the
per-row KL(full ‖ stored) at the run's temperature, measured as the chunk was recorded.

A step's views depend on its position and, where files failed in training, on which ones did
and when (``Position.data``, :attr:`dalikd.recovery.TrainData.history`): a chunk's name carries
that history (none: the plain name), so a later run with the same failures reads the steps after
them, and one without does not.

Faults: a chunk that cannot be used (damaged, foreign, untrusted, not a regular file) is a miss
with one note; a folder that cannot be written (read-only, not the user's) is used read-only
with one warning line; a full disk stops the writing with one line naming it, and the run goes
on (reading what is there).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalikd.atomic import temporary_of, write_text_atomic
from dalikd.errors import DalikdError
from dalikd.metrics import tstddev_sums
from dalikd.teacher_cache.files import (
    FILE_MODE,
    CacheWriteError,
    finite,
    read_bytes,
    read_file,
    writable,
)
from dalikd.teacher_cache.files import write_file as _write_file
from dalikd.teacher_cache.formats import LOSSY_BOUND, Format, kl_histogram, measure_kl
from dalikd.teacher_cache.key import CACHE_FORMAT, key_difference, key_digest

CHUNK_NAME = re.compile(r"c(\d{7})-(\d{7})(?:-([0-9a-f]{16}))?\.pt$")
# a temporary file of dalikd.atomic not modified for STALE_TEMP_S is a killed writer's (a chunk
# is written in seconds; a younger one may be another run's write in progress)
STALE_TEMP_S = 3600
ROWS = ("logits", "values", "scale", "codes")  # a format's floating-point rows (finite)


def chunk_path(root: Path, epoch: int, rank: int, start: int, end: int, data: str = "") -> Path:
    """Where rank ``rank``'s steps [start, end) of ``epoch`` go; ``data``: their history."""
    name = f"c{start:07d}-{end:07d}{f'-{data}' if data else ''}.pt"
    return root / "train" / f"e{epoch:04d}" / f"r{rank}" / name


@dataclass
class CachedStep:
    """What one step takes from the teacher, as read from the cache (on the caller's device)."""

    teacher_x: torch.Tensor  # [B, C] logits of x (a lossy format's: decoded)
    teacher_aug: torch.Tensor | None  # [R, C] logits of the kept x' rows
    keep: torch.Tensor | None  # [R] int64: the pick's pool rows, highest score first
    # lossy formats: (Σ of the rows' probabilities [C] fp64, Σ of their entropies fp64, rows)
    tstd_sums: tuple[torch.Tensor, torch.Tensor, int] | None = None


class KLMeter:
    """The KL(full ‖ stored) a run has seen, written or read. A lossy format's mean is said once
    (at the first chunk), and once more as a warning where it exceeds :data:`LOSSY_BOUND`."""

    def __init__(self, fmt: Format, say: Callable[[str], None]) -> None:
        self.fmt, self.say = fmt, say
        self.total, self.rows, self.told, self.warned = 0.0, 0, False, False

    def add(self, kl_sum: float, rows: int) -> None:
        self.total, self.rows = self.total + kl_sum, self.rows + rows
        mean = self.total / self.rows if self.rows else 0.0
        if not self.fmt.lossy or self.warned or not self.rows:
            return
        if mean <= LOSSY_BOUND and not self.told:
            self.told = True
            self.say(
                f"teacher cache: {self.fmt.name} format, soft targets within {mean:.1e} nats of "
                f"the teacher's (mean KL at T = {self.fmt.temperature:g}; warned above "
                f"{LOSSY_BOUND:g})"
            )
        elif mean > LOSSY_BOUND:
            self.warned = True
            self.say(
                f"teacher cache: the {self.fmt.name} format moves the soft targets {mean:.2e} "
                f"nats from the teacher's (mean KL at T = {self.fmt.temperature:g} over "
                f"{self.rows:,} rows, above {LOSSY_BOUND:g}); --teacher-cache-format exact or "
                "compact keeps them"
            )


class ChunkWriter:
    """Recorded steps of one epoch, in order, until :meth:`write` makes them one chunk.
    ``say`` tells why writing stopped (``off``: it has; nothing more is recorded)."""

    def __init__(self, root: Path, rank: int, digest: str, fmt: Format, meter: KLMeter,
                 written: Callable[[int, Path], None],
                 say: Callable[[str], None] = lambda text: None) -> None:  # fmt: skip
        self.root, self.rank, self.digest, self.fmt, self.meter = root, rank, digest, fmt, meter
        self.written = written  # told of each chunk written (the reader lists it afresh)
        self.say, self.off = say, False
        self.epoch, self.data, self.steps, self.entries = -1, "", [], []

    def stop(self, why: str) -> None:
        """Write nothing more (said once)."""
        if not self.off:
            self.off = True
            self.say(f"teacher cache {self.root}: {why}; the run goes on without caching")
        self.steps, self.entries = [], []

    def add(self, epoch: int, step: int, rows: torch.Tensor, batch: int, keep: Any,
            data: str = "") -> None:  # fmt: skip
        """Step ``step`` of ``epoch`` (views of history ``data``): ``rows`` the full teacher
        logits (x's, then the kept x'), of which the first ``batch`` are x's."""
        if self.off:
            return
        if self.steps and (epoch != self.epoch or step != self.steps[-1] + 1 or data != self.data):
            self.write()  # a chunk is one run of consecutive steps of one history
        encoded = self.fmt.encode(rows)
        stored = self.fmt.decode(encoded, rows.shape[1]).to(rows.device)
        kl = measure_kl(rows, stored, self.fmt.temperature)
        entry: dict[str, Any] = {"batch": batch, **encoded, "kl": kl.cpu()}
        if keep is not None:
            entry["keep"] = keep.to("cpu", torch.int64)  # narrowed per chunk
        if self.fmt.lossy:  # exactly the sums TStddev.add makes of these rows
            prob_sum, entropy_sum, _ = tstddev_sums(rows)
            entry["prob_sum"], entry["entropy_sum"] = prob_sum.cpu(), entropy_sum.cpu()
        self.epoch, self.data = epoch, data
        self.steps.append(step)
        self.entries.append(entry)

    def write(self) -> None:
        if not self.entries or self.off:
            return
        entries, lo, hi = self.entries, self.steps[0], self.steps[-1] + 1
        kl = torch.cat([e.pop("kl") for e in entries])
        chunk: dict[str, Any] = {
            "format": CACHE_FORMAT, "key": self.digest, "epoch": self.epoch, "rank": self.rank,
            "start": lo, "end": hi, "data": self.data, "batch": entries[0]["batch"],
            "kl_sum": float(kl.sum()), "kl_rows": len(kl), "kl_hist": kl_histogram(kl),
            "kl_temperature": self.fmt.temperature,
        }  # fmt: skip
        for name in entries[0]:
            if name != "batch":
                chunk[name] = torch.stack([e[name] for e in entries])
        if "keep" in chunk:  # the smallest index dtype that fits
            fits = chunk["keep"].numel() == 0 or int(chunk["keep"].max()) <= 32767
            chunk["keep"] = chunk["keep"].to(torch.int16 if fits else torch.int32)
        path = chunk_path(self.root, self.epoch, self.rank, lo, hi, self.data)
        self.steps, self.entries = [], []
        try:
            _write_file(self.root, path, chunk)
        except CacheWriteError as e:  # a full disk, a folder turned read-only: named, not fatal
            self.stop(str(e))
            return
        self.meter.add(chunk["kl_sum"], chunk["kl_rows"])
        self.written(self.epoch, path)


class ChunkReader:
    """Steps of this rank's chunks; a chunk that cannot be used is reported once and missed."""

    def __init__(self, root: Path, rank: int, digest: str, fmt: Format, num_classes: int,
                 meter: KLMeter, say: Callable[[str], None]) -> None:  # fmt: skip
        self.root, self.rank, self.digest, self.fmt = root, rank, digest, fmt
        self.num_classes, self.meter, self.say = num_classes, meter, say
        self._index: dict[int, list[tuple[int, int, str, Path]]] = {}
        self._loaded: tuple[Path, dict[str, Any]] | None = None
        self._bad: set[Path] = set()

    def forget(self, epoch: int, path: Path) -> None:
        """A chunk was (re)written: list the epoch again and try ``path`` afresh."""
        self._index.pop(epoch, None)
        self._bad.discard(path)

    def _chunks(self, epoch: int) -> list[tuple[int, int, str, Path]]:
        if epoch not in self._index:
            folder = chunk_path(self.root, epoch, self.rank, 0, 0).parent
            found = []
            if folder.is_dir():
                for path in folder.iterdir():
                    match = CHUNK_NAME.fullmatch(path.name)
                    if match:
                        found.append((int(match[1]), int(match[2]), match[3] or "", path))
            self._index[epoch] = sorted(found)
        return self._index[epoch]

    def lookup(self, epoch: int, step: int, device: Any, data: str = "") -> CachedStep | None:
        for lo, hi, history, path in self._chunks(epoch):
            if lo <= step < hi and history == data and path not in self._bad:
                chunk = self._read(path, epoch, lo, hi, data)
                if chunk is not None:
                    return self._step(chunk, step - lo, device)
        return None

    def _read(self, path: Path, epoch: int, lo: int, hi: int, data: str) -> dict[str, Any] | None:
        if self._loaded is not None and self._loaded[0] == path:
            return self._loaded[1]
        chunk, why = read_file(path, self.root)
        problem = why or self._problem(chunk, epoch, lo, hi, data)
        if problem:
            self._bad.add(path)
            self.say(f"teacher cache: {path} {problem}; recomputing its steps")
            return None
        self._loaded = (path, chunk)
        self.meter.add(float(chunk["kl_sum"]), int(chunk["kl_rows"]))
        return chunk

    def _problem(self, chunk: dict[str, Any], epoch: int, lo: int, hi: int, data: str) -> str:
        header = (chunk.get("format"), chunk.get("key"), chunk.get("epoch"), chunk.get("rank"))
        if header != (CACHE_FORMAT, self.digest, epoch, self.rank):
            return "belongs to another cache, epoch or rank"
        if (chunk.get("start"), chunk.get("end"), chunk.get("data", "")) != (lo, hi, data):
            return "does not hold the steps its name says"
        if not finite(chunk, ROWS):
            return "holds non-finite teacher outputs"
        steps = [v for k, v in chunk.items() if isinstance(v, torch.Tensor) and k != "kl_hist"]
        if not steps or any(t.shape[0] != hi - lo for t in steps):
            return "holds the wrong number of steps"
        main = {"exact": "logits", "compact": "codes", "topk": "values"}[self.fmt.name]
        if main not in chunk or chunk[main].shape[-1] != self.fmt.width(self.num_classes):
            return "holds rows of the wrong width"
        return ""

    def _step(self, chunk: dict[str, Any], i: int, device: Any) -> CachedStep:
        parts = {k: v[i].to(device) for k, v in chunk.items()
                 if isinstance(v, torch.Tensor) and k not in ("keep", "kl_hist")}  # fmt: skip
        rows = self.fmt.decode(parts, self.num_classes)
        batch = int(chunk["batch"])
        keep = chunk["keep"][i].to(device, torch.int64) if "keep" in chunk else None
        sums = None
        if self.fmt.lossy:
            sums = (parts["prob_sum"], parts["entropy_sum"], len(rows))
        aug = rows[batch:] if rows.shape[0] > batch else None
        return CachedStep(rows[:batch], aug, keep, sums)


class TeacherCache:
    """One rank's view of a cache folder: look steps up, record the missed ones, write them.

    ``key`` must equal DIR/key.json (written by the first run); otherwise a DalikdError names
    the differing settings. ``message`` reports a chunk read as a miss, a lossy format above its
    bound, and (once each) a cache used read-only, not at all, or no longer written.
    """

    def __init__(
        self,
        root: str | Path,
        key: dict[str, Any],
        *,
        rank: int = 0,
        message: Callable[[str], None] = lambda text: None,
        temperature: float = 4.0,
    ) -> None:
        self.root, self.key, self.rank = Path(root), key, rank
        self.digest = key_digest(key)
        self.num_classes = int(key["num_classes"])
        # KL is measured at the run's KD ``temperature`` (top-K stores at its key's)
        name = key.get("format", "exact")
        t = float(key["temperature"]) if name == "topk" else temperature
        self.fmt = Format(name, int(key.get("topk", 0)), t)
        self.message = message
        self.unused = ""  # why the cache is neither read nor written ("": it is used)
        self.meter = KLMeter(self.fmt, message)
        self.reader = ChunkReader(self.root, rank, self.digest, self.fmt, self.num_classes,
                                  self.meter, message)  # fmt: skip
        self.writer = ChunkWriter(self.root, rank, self.digest, self.fmt, self.meter,
                                  self.reader.forget, message)  # fmt: skip
        self._check_key()
        if not self.writer.off:
            self._sweep()

    def _sweep(self) -> None:
        """Remove the temporary files that killed writers left in the cache's folder, in its
        validation folder and in this rank's chunk folders (a SIGKILL mid-chunk leaves one as
        large as the chunk), with one note."""
        folders = [self.root, self.root / "val", *self.root.glob(f"train/e*/r{self.rank}")]
        now, removed = time.time(), 0
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                if temporary_of(e.name) is None:
                    continue
                with contextlib.suppress(OSError):
                    if now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                        os.unlink(e.path)
                        removed += 1
        if removed:
            self.message(f"teacher cache {self.root}: removed {removed} temporary file(s) that "
                         "stopped runs left")  # fmt: skip

    def _not_used(self, why: str) -> None:
        self.unused = why
        self.writer.off = True
        self.message(f"teacher cache {self.root}: {why}; not used, every step runs the teacher")

    # -- the key -------------------------------------------------------------------------------

    def _check_key(self) -> None:
        path = self.root / "key.json"
        if os.path.lexists(path):
            self._compare_key(path)
            return
        if self.root.exists() and not self.root.is_dir():
            raise DalikdError(f"--teacher-cache {self.root} is a file, not a folder")
        # another rank's key.json may be on its way (.key.json.*.tmp) or may have landed since
        # the check above (ranks share a new folder): neither is a stranger's file
        if self.root.is_dir() and any(
            p.name != "key.json" and not p.name.startswith((".key.json.", ".dalikd-write"))
            for p in self.root.iterdir()
        ):
            raise DalikdError(
                f"--teacher-cache {self.root} is a non-empty folder without key.json (not a "
                "dalikd teacher cache); give an empty or new folder"
            )
        if path.is_file():  # another rank wrote it meanwhile: it must be this run's key
            self._compare_key(path)
            return
        why = writable(self.root)
        if why:
            return self._not_used(f"cannot be made ({why})")
        try:  # every rank writes the same text: either is right
            write_text_atomic(json.dumps(self.key, indent=2, sort_keys=True) + "\n", path,
                              mode=FILE_MODE)  # fmt: skip
        except DalikdError as e:
            self._not_used(str(e))

    def _compare_key(self, path: Path) -> None:
        """Raise DalikdError unless ``path`` (an existing key.json) holds this run's key; an
        untrusted one leaves the cache unused, a folder that cannot be written read-only."""
        data, why = read_bytes(path, self.root)
        if data is None and why.startswith("is not trusted"):
            return self._not_used(f"key.json {why}")
        saved = None
        if data is not None:
            try:
                saved = json.loads(data)
            except ValueError:  # bad JSON, or bytes that are not UTF-8
                saved = None
        if not isinstance(saved, dict):
            raise DalikdError(
                f"teacher cache {self.root}: key.json {why or 'is unreadable'}; delete the "
                "folder or use another --teacher-cache"
            )
        diff = key_difference(saved, self.key)
        if diff:
            raise DalikdError(
                f"teacher cache {self.root} holds another run's teacher outputs ({diff}); "
                "use another --teacher-cache DIR or the same settings"
            )
        why = writable(self.root)
        if why:
            self.writer.off = True
            self.message(
                f"teacher cache {self.root} cannot be written ({why}): the steps it holds are "
                "read, the others computed and not saved"
            )

    # -- steps ---------------------------------------------------------------------------------

    def lookup(
        self, epoch: int, step: int, device: Any = "cpu", data: str = ""
    ) -> CachedStep | None:
        """The cached step (of views of history ``data``), or None (a miss: the teacher must
        run, then :meth:`record`)."""
        if self.unused:
            return None
        return self.reader.lookup(epoch, step, device, data)

    def record(
        self,
        epoch: int,
        step: int,
        teacher_x: torch.Tensor,
        teacher_aug: torch.Tensor | None,
        keep: torch.Tensor | None,
        data: str = "",
    ) -> None:
        """Remember a missed step's teacher outputs (x's logits, the kept x' rows' logits, the
        pick's indices); :meth:`flush` writes them. Copies to the CPU (a device sync)."""
        if self.writer.off:
            return
        rows = teacher_x if teacher_aug is None else torch.cat([teacher_x, teacher_aug])
        self.writer.add(epoch, step, rows.detach(), len(teacher_x), keep, data)

    def flush(self) -> None:
        """Write the recorded steps as one chunk (call it where the run checkpoints)."""
        self.writer.write()

    # -- validation ----------------------------------------------------------------------------

    def _val_path(self) -> Path:
        return self.root / "val" / f"r{self.rank}.pt"

    def val_logits(self, data: str = "") -> list[torch.Tensor] | None:
        """The teacher's logits of each validation batch (fp32, as evaluation made them), of
        the batches of history ``data`` (which validation files are left out)."""
        path = self._val_path()
        if self.unused or not os.path.lexists(path):
            return None
        saved, why = read_file(path, self.root)
        if saved is not None and (saved.get("format"), saved.get("key")) != (
            CACHE_FORMAT,
            self.digest,
        ):
            saved, why = None, "belongs to another cache"
        if saved is not None and not finite(saved, ("logits",)):
            saved, why = None, "holds non-finite teacher outputs"
        if saved is None:
            self.message(f"teacher cache: {path} {why}; recomputing it")
            return None
        return list(saved["logits"]) if saved.get("data", "") == data else None

    def save_val(self, logits: list[torch.Tensor], data: str = "") -> None:
        if self.writer.off:
            return
        saved = {"format": CACHE_FORMAT, "key": self.digest, "data": data,
                 "logits": [t.cpu() for t in logits]}  # fmt: skip
        try:
            _write_file(self.root, self._val_path(), saved)
        except CacheWriteError as e:
            self.writer.stop(str(e))

"""One rank's view of a cache folder: its key, and the chunks of steps it reads and writes.

Chunks are written by :class:`ChunkWriter` and read by :class:`ChunkReader`, each the one place
that does so (a checksum, read-only and full-disk handling belong there). A chunk holds the
steps of one epoch between two checkpoints of the writing run, each step stored in the cache's
format (:mod:`dalikd.teacher_cache.formats`) with the pick's indices, the exact T. stddev sums
(lossy formats) and, per chunk, what the format changed: the sum and a histogram of the
per-row KL(full ‖ stored) at the run's temperature, measured as the chunk was recorded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalikd.atomic import write_atomic, write_json_atomic
from dalikd.errors import DalikdError
from dalikd.metrics import tstddev_sums
from dalikd.teacher_cache.formats import LOSSY_BOUND, Format, kl_histogram, measure_kl
from dalikd.teacher_cache.key import CACHE_FORMAT, key_difference, key_digest

CHUNK_NAME = re.compile(r"c(\d{7})-(\d{7})\.pt$")


def chunk_path(root: Path, epoch: int, rank: int, start: int, end: int) -> Path:
    return root / "train" / f"e{epoch:04d}" / f"r{rank}" / f"c{start:07d}-{end:07d}.pt"


def write_file(path: Path, obj: dict[str, Any]) -> None:
    """The one writer of cache files (chunks, val logits): atomic, folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f))


def read_file(path: Path) -> dict[str, Any] | None:
    """The one reader of cache files: the dict, or None when it cannot be read (truncated, not
    a torch file, not a dict)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return obj if isinstance(obj, dict) else None


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
    """Recorded steps of one epoch, in order, until :meth:`write` makes them one chunk."""

    def __init__(self, root: Path, rank: int, digest: str, fmt: Format, meter: KLMeter,
                 written: Callable[[int, Path], None]) -> None:  # fmt: skip
        self.root, self.rank, self.digest, self.fmt, self.meter = root, rank, digest, fmt, meter
        self.written = written  # told of each chunk written (the reader lists it afresh)
        self.epoch, self.steps, self.entries = -1, [], []

    def add(self, epoch: int, step: int, rows: torch.Tensor, batch: int, keep: Any) -> None:
        """Step ``step`` of ``epoch``: ``rows`` the full teacher logits (x's, then the kept
        x'), of which the first ``batch`` are x's."""
        if self.steps and (epoch != self.epoch or step != self.steps[-1] + 1):
            self.write()  # a chunk is one run of consecutive steps
        encoded = self.fmt.encode(rows)
        stored = self.fmt.decode(encoded, rows.shape[1]).to(rows.device)
        kl = measure_kl(rows, stored, self.fmt.temperature)
        entry: dict[str, Any] = {"batch": batch, **encoded, "kl": kl.cpu()}
        if keep is not None:
            entry["keep"] = keep.to("cpu", torch.int64)  # narrowed per chunk
        if self.fmt.lossy:  # exactly the sums TStddev.add makes of these rows
            prob_sum, entropy_sum, _ = tstddev_sums(rows)
            entry["prob_sum"], entry["entropy_sum"] = prob_sum.cpu(), entropy_sum.cpu()
        self.epoch = epoch
        self.steps.append(step)
        self.entries.append(entry)

    def write(self) -> None:
        if not self.entries:
            return
        entries, lo, hi = self.entries, self.steps[0], self.steps[-1] + 1
        kl = torch.cat([e.pop("kl") for e in entries])
        chunk: dict[str, Any] = {
            "format": CACHE_FORMAT, "key": self.digest, "epoch": self.epoch, "rank": self.rank,
            "start": lo, "end": hi, "batch": entries[0]["batch"],
            "kl_sum": float(kl.sum()), "kl_rows": len(kl), "kl_hist": kl_histogram(kl),
            "kl_temperature": self.fmt.temperature,
        }  # fmt: skip
        for name in entries[0]:
            if name != "batch":
                chunk[name] = torch.stack([e[name] for e in entries])
        if "keep" in chunk:  # the smallest index dtype that fits
            fits = chunk["keep"].numel() == 0 or int(chunk["keep"].max()) <= 32767
            chunk["keep"] = chunk["keep"].to(torch.int16 if fits else torch.int32)
        path = chunk_path(self.root, self.epoch, self.rank, lo, hi)
        write_file(path, chunk)
        self.meter.add(chunk["kl_sum"], chunk["kl_rows"])
        self.steps, self.entries = [], []
        self.written(self.epoch, path)


class ChunkReader:
    """Steps of this rank's chunks; a chunk that cannot be used is reported once and missed."""

    def __init__(self, root: Path, rank: int, digest: str, fmt: Format, num_classes: int,
                 meter: KLMeter, say: Callable[[str], None]) -> None:  # fmt: skip
        self.root, self.rank, self.digest, self.fmt = root, rank, digest, fmt
        self.num_classes, self.meter, self.say = num_classes, meter, say
        self._index: dict[int, list[tuple[int, int, Path]]] = {}
        self._loaded: tuple[Path, dict[str, Any]] | None = None
        self._bad: set[Path] = set()

    def forget(self, epoch: int, path: Path) -> None:
        """A chunk was (re)written: list the epoch again and try ``path`` afresh."""
        self._index.pop(epoch, None)
        self._bad.discard(path)

    def _chunks(self, epoch: int) -> list[tuple[int, int, Path]]:
        if epoch not in self._index:
            folder = chunk_path(self.root, epoch, self.rank, 0, 0).parent
            found = []
            if folder.is_dir():
                for path in folder.iterdir():
                    match = CHUNK_NAME.fullmatch(path.name)
                    if match:
                        found.append((int(match[1]), int(match[2]), path))
            self._index[epoch] = sorted(found)
        return self._index[epoch]

    def lookup(self, epoch: int, step: int, device: Any) -> CachedStep | None:
        for lo, hi, path in self._chunks(epoch):
            if lo <= step < hi and path not in self._bad:
                chunk = self._read(path, epoch, lo, hi)
                if chunk is not None:
                    return self._step(chunk, step - lo, device)
        return None

    def _read(self, path: Path, epoch: int, lo: int, hi: int) -> dict[str, Any] | None:
        if self._loaded is not None and self._loaded[0] == path:
            return self._loaded[1]
        chunk = read_file(path)
        problem = self._problem(chunk, epoch, lo, hi)
        if problem:
            self._bad.add(path)
            self.say(f"teacher cache: {path} {problem}; recomputing its steps")
            return None
        self._loaded = (path, chunk)
        self.meter.add(float(chunk["kl_sum"]), int(chunk["kl_rows"]))
        return chunk

    def _problem(self, chunk: dict[str, Any] | None, epoch: int, lo: int, hi: int) -> str:
        if chunk is None:
            return "is unreadable (truncated or not a cache file)"
        header = (chunk.get("format"), chunk.get("key"), chunk.get("epoch"), chunk.get("rank"))
        if header != (CACHE_FORMAT, self.digest, epoch, self.rank):
            return "belongs to another cache, epoch or rank"
        if (chunk.get("start"), chunk.get("end")) != (lo, hi):
            return "does not hold the steps its name says"
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
    the differing settings. ``message`` reports a chunk read as a miss and a lossy format above
    its bound.
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
        self._check_key()
        self.meter = KLMeter(self.fmt, message)
        self.reader = ChunkReader(self.root, rank, self.digest, self.fmt, self.num_classes,
                                  self.meter, message)  # fmt: skip
        self.writer = ChunkWriter(self.root, rank, self.digest, self.fmt, self.meter,
                                  self.reader.forget)  # fmt: skip

    # -- the key -------------------------------------------------------------------------------

    def _check_key(self) -> None:
        path = self.root / "key.json"
        if path.is_file():
            self._compare_key(path)
            return
        if self.root.exists() and not self.root.is_dir():
            raise DalikdError(f"--teacher-cache {self.root} is a file, not a folder")
        # another rank's key.json may be on its way (.key.json.*.tmp) or may have landed since
        # the check above (ranks share a new folder): neither is a stranger's file
        if self.root.is_dir() and any(
            p.name != "key.json" and not p.name.startswith(".key.json.")
            for p in self.root.iterdir()
        ):
            raise DalikdError(
                f"--teacher-cache {self.root} is a non-empty folder without key.json (not a "
                "dalikd teacher cache); give an empty or new folder"
            )
        if path.is_file():  # another rank wrote it meanwhile: it must be this run's key
            self._compare_key(path)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.key, path)  # every rank writes the same text: either is right

    def _compare_key(self, path: Path) -> None:
        """Raise DalikdError unless ``path`` (an existing key.json) holds this run's key."""
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            raise DalikdError(
                f"teacher cache {self.root}: key.json is unreadable; delete the folder or "
                "use another --teacher-cache"
            )
        diff = key_difference(saved, self.key)
        if diff:
            raise DalikdError(
                f"teacher cache {self.root} holds another run's teacher outputs ({diff}); "
                "use another --teacher-cache DIR or the same settings"
            )

    # -- steps ---------------------------------------------------------------------------------

    def lookup(self, epoch: int, step: int, device: Any = "cpu") -> CachedStep | None:
        """The cached step, or None (a miss: the teacher must run, then :meth:`record`)."""
        return self.reader.lookup(epoch, step, device)

    def record(
        self,
        epoch: int,
        step: int,
        teacher_x: torch.Tensor,
        teacher_aug: torch.Tensor | None,
        keep: torch.Tensor | None,
    ) -> None:
        """Remember a missed step's teacher outputs (x's logits, the kept x' rows' logits, the
        pick's indices); :meth:`flush` writes them. Copies to the CPU (a device sync)."""
        rows = teacher_x if teacher_aug is None else torch.cat([teacher_x, teacher_aug])
        self.writer.add(epoch, step, rows.detach(), len(teacher_x), keep)

    def flush(self) -> None:
        """Write the recorded steps as one chunk (call it where the run checkpoints)."""
        self.writer.write()

    # -- validation ----------------------------------------------------------------------------

    def _val_path(self) -> Path:
        return self.root / "val" / f"r{self.rank}.pt"

    def val_logits(self) -> list[torch.Tensor] | None:
        """The teacher's logits of each validation batch (fp32, as evaluation made them)."""
        path = self._val_path()
        if not path.is_file():
            return None
        saved = read_file(path)
        if saved is None or (saved.get("format"), saved.get("key")) != (CACHE_FORMAT, self.digest):
            self.message(f"teacher cache: {path} is unreadable or foreign; recomputing it")
            return None
        return list(saved["logits"])

    def save_val(self, logits: list[torch.Tensor]) -> None:
        saved = {"format": CACHE_FORMAT, "key": self.digest, "logits": [t.cpu() for t in logits]}
        write_file(self._val_path(), saved)

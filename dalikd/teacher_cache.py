"""The teacher-output cache: distill again without running the teacher (docs/teacher_cache.md).

dalikd's DALI draws are seeded explicitly and a resumed run is bit-identical, so the views of a
second run with the same settings are the views of the first. The cache stores, per training
step, what the loss and the metrics take from the teacher: its logits of x and of the kept x'
(after the pool's pick, whose indices are stored too) and, with ``topk`` > 0, the step's sums of
teacher probabilities and entropies so T. stddev stays exact. A later run with the same key
reads them and never runs (or loads) the teacher.

Layout of DIR (written by every rank, each file atomically: tmp + fsync + rename)::

    key.json                      every setting that decides the teacher's inputs and outputs
    train/e0003/r0/c0000000-0000500.pt   rank 0's steps [0, 500) of epoch 4 (one chunk)
    val/r0.pt                     rank 0's teacher logits of the validation split

A chunk holds the steps between two checkpoints of the writing run, so a run killed mid-epoch
leaves whole chunks up to its last checkpoint (and the resumed run continues from there).
A chunk that is unreadable, truncated or of another key is a miss: its steps are recomputed.
A key.json of other settings is an error naming them.

Top-K (``topk`` = K > 0): per row the K largest logits (fp16), their classes and the
log-sum-exp over the other classes at the KD temperature, ``R = log Σ_{j∉top} exp(z_j / T)``.
The soft targets are rebuilt with that remainder mass spread uniformly over the other C - K
classes (:func:`expand_topk`): the top-K probabilities and the total remainder mass are kept,
only the remainder's shape across classes is lost. ``topk = 0`` stores the logits exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dalikd.config import TrainConfig
from dalikd.errors import DalikdError

CACHE_FORMAT = 1  # the layout of key.json and the chunk files
# Top-K default (config's teacher_cache_topk): ImageNet (1,281,167 images, 1000 classes), batch
# 256, 100 epochs, KD + CutMixPick (pool 2, keep half) in <= 20 GB with about 10% to spare
# (imagenet_projection: 17.8 GB; the largest K that fits is 14).
DEFAULT_TOPK = TrainConfig().teacher_cache_topk
SIZE_TARGET = 20e9  # bytes: the ImageNet-100-epoch budget the default is chosen for

_CHUNK = re.compile(r"c(\d{7})-(\d{7})\.pt$")


# -- the key -----------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def listing_hash(dataset: Any) -> str:
    """sha256 of the data listing: classes, then per split each file (relative path, size in
    bytes, label), then the files left out and why. Sizes catch a replaced file cheaply; a
    moved dataset folder keeps its hash."""
    h = hashlib.sha256()
    root = Path(dataset.root)
    h.update(("\n".join(dataset.classes) + "\n").encode())
    for name in ("train", "val"):
        split = getattr(dataset, name)
        h.update(f"[{name}]\n".encode())
        for path, label in zip(split.files, split.labels, strict=True):
            rel = os.path.relpath(path, root)
            h.update(f"{rel}\t{os.stat(path).st_size}\t{label}\n".encode())
    h.update(b"[skipped]\n")
    for path, reason in dataset.skipped:
        h.update(f"{os.path.relpath(path, root)}\t{reason}\n".encode())
    return h.hexdigest()


def weights_id(weights: str) -> str:
    """A teacher's weights as the key holds them: the sha256 of a weights file, else the name
    (a torchvision weights name or a timm pretrained tag names fixed published weights)."""
    if weights and Path(weights).expanduser().is_file():
        return "sha256:" + _sha256_file(Path(weights).expanduser())
    return "name:" + weights


def data_source_hash() -> str:
    """sha256 of the sources that decide the pixels of a view (the loaders, DALI operators,
    AutoAugment, the recipes and the native operators' C++/CUDA): a cache written by another
    dalikd version is a key mismatch, not wrong targets."""
    from dalikd import autoaugment, loaders, native, ops, recipes

    h = hashlib.sha256()
    for module in (loaders, ops, autoaugment, recipes):
        h.update(Path(module.__file__).read_bytes() + b"\0")
    h.update(native.source_hash().encode())
    return h.hexdigest()


def recipe_hash(aug: str) -> str:
    """sha256 of the source files of the ``--aug`` recipes: their parameters live there."""
    from dalikd import recipes

    h = hashlib.sha256(aug.encode())
    if aug.strip() == "none":
        return h.hexdigest()
    known = recipes.builtin_recipes()
    for part in (p.strip() for p in aug.split("+")):
        if ".py" in part:
            path = Path(part.rpartition(":")[0]).expanduser()
        else:
            fn = known.get(part)
            path = Path(fn.__code__.co_filename) if fn is not None else None
        if path is not None and path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(
    cfg: Any,
    dataset: Any,
    *,
    device: str,
    precision: str,
    world_size: int,
    input_norm: tuple,
    graph_format: int,
    topk: int,
) -> dict[str, Any]:
    """Every setting that decides the teacher's inputs and outputs (``cfg`` a TrainConfig;
    ``precision`` resolved; ``input_norm`` the mean/std the teacher's inputs arrive with;
    ``graph_format`` dalikd's checkpoint/graph format). Flat, JSON-ready, compared key by key."""
    import nvidia.dali as dali

    d, k, m = cfg.data, cfg.kd, cfg.model
    pool = k.aug != "none" and k.pool_size > 1
    return {
        "cache_format": CACHE_FORMAT,
        "graph_format": graph_format,
        "dali_version": dali.__version__,
        "data_listing": listing_hash(dataset),
        "num_classes": dataset.num_classes,
        "seed": cfg.seed,
        "batch_size": d.batch_size,
        "image_size": d.image_size,
        "crop_scale": list(d.crop_scale),
        "crop_ratio": list(d.crop_ratio),
        "val_crop_fraction": d.val_crop_fraction,
        "antialias": d.antialias,
        # the mixing path (resolved: native | composed; equal on CPU, kept apart to be safe) and,
        # on GPU, the JPEG-engine share: which decoder decodes an image may change its pixels
        "mixing": d.mixing if k.aug != "none" else "",
        "hw_decoder_load": d.hw_decoder_load if device == "gpu" else 0.0,
        # the resize path (resolved: native | dali; up to 2 grey levels apart) and the code
        "resize": d.resize,
        "data_source": data_source_hash(),
        "aug": k.aug,
        "aug_source": recipe_hash(k.aug),
        "granularity": k.granularity,
        "pool_size": k.pool_size if pool else 1,
        "pick_criterion": k.pick_criterion if pool else "",
        "pick_count": k.pick_count if pool else 0,
        "pick_fraction": k.pick_fraction if pool else 0.0,
        "world_size": world_size,
        "teacher": m.teacher,
        "teacher_weights": weights_id(m.teacher_weights),
        "device": device,
        "precision": precision,
        "channels_last": cfg.channels_last and device == "gpu",
        "input_norm": [list(v) for v in input_norm],
        "topk": topk,
        # the remainder's log-sum-exp is taken at the KD temperature; topk 0 stores raw logits
        "temperature": k.temperature if topk else 0.0,
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def key_difference(saved: dict[str, Any], key: dict[str, Any]) -> str:
    """'seed 0 -> 1, teacher resnet34 -> resnet50' for the settings that differ ('' if none)."""
    names = sorted(set(saved) | set(key))
    return ", ".join(
        f"{n} {_short(saved.get(n))} -> {_short(key.get(n))}"
        for n in names
        if saved.get(n) != key.get(n)
    )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:19] + "..." if len(text) > 22 else text


# -- top-K -------------------------------------------------------------------------------------


def compress_topk(logits: torch.Tensor, topk: int, temperature: float) -> dict[str, torch.Tensor]:
    """[N, C] logits -> ``values`` [N, K] fp16, ``indices`` [N, K] int16 (int32 past 32,767
    classes), ``rest_lse`` [N] fp32: log Σ over the other classes of exp(z / T) (-inf when
    K = C)."""
    z = logits.float()
    k = min(topk, z.shape[1])
    values, indices = z.topk(k, dim=1)
    rest = (z / temperature).scatter(1, indices, -math.inf)
    rest_lse = torch.logsumexp(rest, dim=1)
    index_dtype = torch.int16 if z.shape[1] <= 32767 else torch.int32
    return {"values": values.half(), "indices": indices.to(index_dtype), "rest_lse": rest_lse}


def expand_topk(
    values: torch.Tensor, indices: torch.Tensor, rest_lse: torch.Tensor, num_classes: int,
    temperature: float,
) -> torch.Tensor:  # fmt: skip
    """Logits [N, C] float32 whose softmax at ``temperature`` is the cached soft target: the
    top-K classes keep their logits, each other class gets T·(R - log(C - K)), so the C - K of
    them together carry exactly the remainder mass exp(R) / Z."""
    n, k = values.shape
    if k >= num_classes:
        out = torch.empty(n, num_classes, dtype=torch.float32, device=values.device)
    else:
        fill = temperature * (rest_lse.float() - math.log(num_classes - k))
        out = fill[:, None].expand(n, num_classes).clone()
    return out.scatter_(1, indices.long(), values.float())


def soft_target_kl(logits: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    """Per-row KL(softmax(z / T) || cached soft target) in nats, float64: what top-K changes."""
    c = compress_topk(logits, topk, temperature)
    cached = expand_topk(c["values"], c["indices"], c["rest_lse"], logits.shape[1], temperature)
    log_p = F.log_softmax(logits.double() / temperature, dim=1)
    log_q = F.log_softmax(cached.double() / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


# -- size --------------------------------------------------------------------------------------


def step_bytes(
    topk: int, batch: int, kept: int, num_classes: int, full_itemsize: int = 4, picked: bool = True
) -> int:
    """Payload bytes of one cached step: ``batch`` x rows and ``kept`` x' rows (with the pick's
    index of each when ``picked``: a pool recipe)."""
    rows = batch + kept
    index_bytes = 2 if num_classes <= 32767 else 4
    keep_bytes = kept * (index_bytes if topk else 8) if picked else 0
    if topk == 0:
        return rows * num_classes * full_itemsize + keep_bytes
    row = min(topk, num_classes) * (2 + index_bytes) + 4  # fp16 value + index, fp32 rest_lse
    return rows * row + keep_bytes + num_classes * 8 + 8  # + fp64 probability and entropy sums


def imagenet_projection(topk: int, kept: int = 256, picked: bool = True) -> dict[str, float]:
    """Bytes of a cache for ImageNet-1k (1,281,167 train / 50,000 val images, 1000 classes),
    batch 256, 100 epochs, ``kept`` x' rows per step (default KD + CutMixPick, pool 2, half
    kept: 256), one rank, fp32 logits: steps x step_bytes + the val logits (fp32, stored once)."""
    steps = 1_281_167 // 256 * 100
    train = steps * step_bytes(topk, 256, kept, 1000, picked=picked)
    val = 50_000 * 1000 * 4
    return {"steps": steps, "train_bytes": train, "val_bytes": val, "total_bytes": train + val}


# -- storage -----------------------------------------------------------------------------------


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary name unique to this process, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any] | None:
    """A cache file's dict, or None when it cannot be read (truncated, not a torch file)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass
class CachedStep:
    """What one step takes from the teacher, as read from the cache (on the cache's device)."""

    teacher_x: torch.Tensor  # [B, C] logits of x (top-K: rebuilt, see expand_topk)
    teacher_aug: torch.Tensor | None  # [R, C] logits of the kept x' rows
    keep: torch.Tensor | None  # [R] int64: the pick's pool rows, highest score first
    # top-K only: (Σ of the rows' probabilities [C] fp64, Σ of their entropies fp64, rows)
    tstd_sums: tuple[torch.Tensor, torch.Tensor, int] | None = None


class TeacherCache:
    """One rank's view of a cache directory: look steps up, record misses, flush chunks.

    ``key`` must equal DIR/key.json (written by the first run); otherwise a DalikdError names
    the differing settings. ``message`` reports a chunk that is read as a miss.
    """

    def __init__(
        self,
        root: str | Path,
        key: dict[str, Any],
        *,
        rank: int = 0,
        message: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.root = Path(root)
        self.key = key
        self.digest = key_digest(key)
        self.rank = rank
        self.topk = int(key["topk"])
        self.temperature = float(key["temperature"])
        self.num_classes = int(key["num_classes"])
        self.message = message
        self.hits = 0
        self.misses = 0
        self._check_key()
        self._chunk_index: dict[int, list[tuple[int, int, Path]]] = {}
        self._loaded: tuple[Path, dict[str, Any]] | None = None
        self._bad: set[Path] = set()
        self._pending: list[tuple[int, int, dict[str, Any]]] = []  # (epoch, step, record)

    def _check_key(self) -> None:
        path = self.root / "key.json"
        if path.is_file():
            self._compare_key(path)
            return
        if self.root.exists() and not self.root.is_dir():
            raise DalikdError(f"--teacher-cache {self.root} is a file, not a folder")
        # another rank's key.json may be on its way (.key.json.PID.tmp) or may have landed since
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
        tmp = self.root / f".key.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.key, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # every rank writes the same text: whichever lands is right

    def _compare_key(self, path: Path) -> None:
        """Raise DalikdError unless ``path`` (an existing key.json) holds this run's key."""
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise DalikdError(
                f"teacher cache {self.root}: key.json is unreadable; delete the folder or "
                "use another --teacher-cache"
            ) from None
        diff = key_difference(saved, self.key)
        if diff:
            raise DalikdError(
                f"teacher cache {self.root} holds another run's teacher outputs ({diff}); "
                "use another --teacher-cache DIR or the same settings"
            )

    # -- reading -------------------------------------------------------------------------------

    def _epoch_dir(self, epoch: int) -> Path:
        return self.root / "train" / f"e{epoch:04d}" / f"r{self.rank}"

    def _chunks(self, epoch: int) -> list[tuple[int, int, Path]]:
        if epoch not in self._chunk_index:
            found = []
            folder = self._epoch_dir(epoch)
            if folder.is_dir():
                for path in folder.iterdir():
                    match = _CHUNK.fullmatch(path.name)
                    if match:
                        found.append((int(match[1]), int(match[2]), path))
            self._chunk_index[epoch] = sorted(found)
        return self._chunk_index[epoch]

    def covers(self, epoch: int, start: int, end: int) -> bool:
        """Whether chunks (not yet read) cover steps [start, end) of ``epoch``."""
        needed = start
        for lo, hi, path in self._chunks(epoch):
            if lo <= needed < hi and path not in self._bad:
                needed = hi
        return needed >= end

    def lookup(self, epoch: int, step: int, device: torch.device | str = "cpu"):
        """The cached step, or None (a miss: the teacher must run, then :meth:`record`)."""
        for lo, hi, path in self._chunks(epoch):
            if lo <= step < hi and path not in self._bad:
                chunk = self._read_chunk(path, epoch, lo, hi)
                if chunk is not None:
                    self.hits += 1
                    return self._step(chunk, step - lo, device)
        self.misses += 1
        return None

    def _read_chunk(self, path: Path, epoch: int, lo: int, hi: int) -> dict[str, Any] | None:
        if self._loaded is not None and self._loaded[0] == path:
            return self._loaded[1]
        chunk = _load(path)
        problem = self._chunk_problem(chunk, epoch, lo, hi)
        if problem:
            self._bad.add(path)
            self.message(f"teacher cache: {path} {problem}; recomputing its steps")
            return None
        self._loaded = (path, chunk)
        return chunk

    def _chunk_problem(self, chunk: dict[str, Any] | None, epoch: int, lo: int, hi: int) -> str:
        if chunk is None:
            return "is unreadable (truncated or not a cache file)"
        header = (chunk.get("format"), chunk.get("key"), chunk.get("epoch"), chunk.get("rank"))
        if header != (CACHE_FORMAT, self.digest, epoch, self.rank):
            return "belongs to another cache, epoch or rank"
        if (chunk.get("start"), chunk.get("end")) != (lo, hi):
            return "does not hold the steps its name says"
        n = hi - lo
        tensors = [v for name, v in chunk.items() if isinstance(v, torch.Tensor)]
        if not tensors or any(t.shape[0] != n for t in tensors):
            return "holds the wrong number of steps"
        width = chunk["values"].shape[-1] if self.topk else chunk["teacher_x"].shape[-1]
        if width != (min(self.topk, self.num_classes) if self.topk else self.num_classes):
            return "holds rows of the wrong width"
        return ""

    def _step(self, chunk: dict[str, Any], i: int, device: torch.device | str) -> CachedStep:
        keep = chunk["keep"][i].to(device, torch.int64) if "keep" in chunk else None
        batch = int(chunk["batch"])
        if not self.topk:
            aug = chunk["teacher_aug"][i].to(device) if "teacher_aug" in chunk else None
            return CachedStep(chunk["teacher_x"][i].to(device), aug, keep)
        rows = expand_topk(
            chunk["values"][i].to(device), chunk["indices"][i].to(device),
            chunk["rest_lse"][i].to(device), self.num_classes, self.temperature,
        )  # fmt: skip
        aug = rows[batch:] if rows.shape[0] > batch else None
        sums = (chunk["prob_sum"][i].to(device), chunk["entropy_sum"][i].to(device), len(rows))
        return CachedStep(rows[:batch], aug, keep, sums)

    # -- writing -------------------------------------------------------------------------------

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
        entry: dict[str, Any] = {"batch": len(teacher_x)}
        if keep is not None:
            entry["keep"] = keep.to("cpu", torch.int64)  # narrowed per chunk by flush()
        if not self.topk:
            entry["teacher_x"] = teacher_x.detach().cpu()
            if teacher_aug is not None:
                entry["teacher_aug"] = teacher_aug.detach().cpu()
        else:
            top = compress_topk(rows.detach(), self.topk, self.temperature)
            entry.update({name: t.cpu() for name, t in top.items()})
            # exactly the sums TStddev.add makes of these rows (training's softmax at T = 1)
            probs = rows.detach().float().softmax(dim=1).double()
            entry["prob_sum"] = probs.sum(dim=0).cpu()
            entry["entropy_sum"] = (-(probs * probs.clamp_min(1e-30).log()).sum()).cpu()
        if self._pending and (self._pending[-1][0] != epoch or self._pending[-1][1] + 1 != step):
            self.flush()  # a chunk is one run of consecutive steps
        self._pending.append((epoch, step, entry))

    def flush(self) -> None:
        """Write the recorded steps as one chunk (call it where the run checkpoints)."""
        if not self._pending:
            return
        epoch, lo = self._pending[0][0], self._pending[0][1]
        hi = self._pending[-1][1] + 1
        entries = [e for _, _, e in self._pending]
        chunk: dict[str, Any] = {
            "format": CACHE_FORMAT, "key": self.digest, "epoch": epoch, "rank": self.rank,
            "start": lo, "end": hi, "batch": entries[0]["batch"],
        }  # fmt: skip
        for name in entries[0]:
            if name != "batch":
                chunk[name] = torch.stack([e[name] for e in entries])
        if self.topk and "keep" in chunk:  # top-K caches save bytes: the smallest dtype that fits
            fits = chunk["keep"].numel() == 0 or int(chunk["keep"].max()) <= 32767
            chunk["keep"] = chunk["keep"].to(torch.int16 if fits else torch.int32)
        path = self._epoch_dir(epoch) / f"c{lo:07d}-{hi:07d}.pt"
        _save_atomic(chunk, path)
        self._pending = []
        self._chunk_index.pop(epoch, None)
        self._bad.discard(path)

    # -- validation ----------------------------------------------------------------------------

    def _val_path(self) -> Path:
        return self.root / "val" / f"r{self.rank}.pt"

    def val_logits(self) -> list[torch.Tensor] | None:
        """The teacher's logits of each validation batch (fp32, as evaluation made them)."""
        path = self._val_path()
        if not path.is_file():
            return None
        saved = _load(path)
        if saved is None or (saved.get("format"), saved.get("key")) != (CACHE_FORMAT, self.digest):
            self.message(f"teacher cache: {path} is unreadable or foreign; recomputing it")
            return None
        return list(saved["logits"])

    def save_val(self, logits: list[torch.Tensor]) -> None:
        saved = {"format": CACHE_FORMAT, "key": self.digest, "logits": [t.cpu() for t in logits]}
        _save_atomic(saved, self._val_path())


class ValTeacher(torch.nn.Module):
    """Stands in for the teacher during evaluation: replays the cached logits batch by batch
    (``logits`` given), or runs ``teacher`` and records what it returns (``logits`` None).
    ``evaluate`` calls it once per validation batch, in the loader's fixed order. Given
    ``cache`` and ``batches`` (batches per pass), a recorded pass is saved when it completes
    and replayed from then on."""

    def __init__(
        self,
        teacher: Callable | None,
        logits: list[torch.Tensor] | None,
        cache: TeacherCache | None = None,
        batches: int = 0,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.replay = logits
        self.recorded: list[torch.Tensor] = []
        self.cache, self.batches = cache, batches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            logits = self.replay[len(self.recorded)].to(images.device)
            self.recorded.append(logits)
            if len(logits) != len(images):
                raise DalikdError("teacher cache: the validation batches changed; delete val/")
            if len(self.recorded) == len(self.replay):
                self.recorded = []  # the next pass starts again at the first batch
            return logits
        logits = self.teacher(images).float()
        if self.cache is None and self.batches:
            return logits  # no cache to save to: nothing to record
        self.recorded.append(logits.detach().cpu())
        if self.cache is not None and len(self.recorded) == self.batches:
            self.cache.save_val(self.recorded)
            self.replay = self.done()
        return logits

    def done(self) -> list[torch.Tensor]:
        """The batches of this pass; resets for the next pass."""
        out, self.recorded = self.recorded, []
        return out


# -- cache-info --------------------------------------------------------------------------------


def cache_info(root: str | Path) -> dict[str, Any]:
    """What ``dalikd cache-info DIR`` prints: the key, steps covered per epoch and rank, size on
    disk, bytes per stored teacher row, and the ImageNet-100-epoch projection at this top-K."""
    root = Path(root)
    path = root / "key.json"
    if not path.is_file():
        raise DalikdError(f"{root} is not a dalikd teacher cache (no key.json)")
    try:
        key = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DalikdError(f"{path} is unreadable") from None
    epochs: dict[int, dict[int, int]] = {}
    train_bytes, rows = 0, 0
    for chunk_path in sorted((root / "train").glob("e*/r*/c*.pt")):
        match = _CHUNK.fullmatch(chunk_path.name)
        if not match:
            continue
        epoch, rank = int(chunk_path.parent.parent.name[1:]), int(chunk_path.parent.name[1:])
        steps = int(match[2]) - int(match[1])
        epochs.setdefault(epoch, {}).setdefault(rank, 0)
        epochs[epoch][rank] += steps
        train_bytes += chunk_path.stat().st_size
        chunk = _load(chunk_path)
        if chunk is not None:
            first = chunk["values"] if "values" in chunk else chunk["teacher_x"]
            aug = chunk.get("teacher_aug")
            per_step = first.shape[1] + (aug.shape[1] if aug is not None else 0)
            rows += steps * per_step
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    recipe, kept, picked = projected_recipe(key)
    return {
        "key": key,
        "epochs": {e + 1: ranks for e, ranks in sorted(epochs.items())},
        "size_bytes": total,
        "train_bytes": train_bytes,
        "rows": rows,
        "bytes_per_row": train_bytes / rows if rows else math.nan,
        "imagenet": imagenet_projection(int(key.get("topk", 0)), kept, picked),
        "imagenet_recipe": recipe,
    }


def projected_recipe(key: dict[str, Any]) -> tuple[str, int, bool]:
    """The cache's own recipe at ImageNet's batch of 256: (its name for the projection, the x'
    rows kept per step, whether a pool's pick indices are stored). A key without ``aug`` (none
    written by dalikd) gets KD + CutMixPick, the default is chosen for."""
    aug = key.get("aug")
    if aug is None:
        return "KD + CutMixPick keeping 256 of 512", 256, True
    if aug == "none":
        return "plain KD, no x'", 0, False
    pool = int(key.get("pool_size", 1))
    if pool <= 1:
        return f"KD + {aug}", 256, False
    count, batch = int(key.get("pick_count", 0)), int(key.get("batch_size", 256))
    # the share of the pool the cache's run keeps (an absolute count is per its batch)
    share = count / (pool * batch) if count else float(key.get("pick_fraction", 0.5))
    kept = min(max(round(share * pool * 256), 1), pool * 256)
    return f"KD + {aug} keeping {kept} of {pool * 256}", kept, True


# -- the step's teacher pass -------------------------------------------------------------------


class CachingTeacherPass:
    """``--teacher-cache`` around a step's teacher pass (``live(batch)`` returns an object with
    ``logits_x``, ``logits_aug`` (the kept x' rows) and ``keep``, such as
    ``Distiller.teacher_outputs``): a hit returns the stored outputs, built by ``make(x, aug,
    keep)``, and the teacher does not run; a miss calls ``load()`` once (the teacher is loaded
    only when a step needs it), runs ``live`` and records its outputs.

    Steps are counted here: :meth:`seek` sets the position (epoch, step of the epoch) of the
    next call, as after a resume; each call advances it. ``tstd_sums`` are the last hit's
    T. stddev sums (top-K only; None: count the returned rows, which are then exact).
    ``cache`` None, or after :meth:`detach`: every step runs the teacher, nothing is read or
    written (the run's views are no longer those a cache holds).
    """

    def __init__(
        self,
        cache: TeacherCache | None,
        live: Callable[[Any], Any],
        make: Callable[..., Any],
        load: Callable[[], None] = lambda: None,
        message: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.cache, self.live, self.make, self._load = cache, live, make, load
        self.message = message
        self.loaded = False
        self.hits = self.misses = 0
        self.epoch = self.step = self.steps_per_epoch = 0
        self.tstd_sums: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.val_teacher: ValTeacher | None = None  # set by attach()

    def seek(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.epoch, self.step, self.steps_per_epoch = epoch, step, steps_per_epoch

    def covers(self, first_epoch: int, first_step: int, epochs: int) -> bool:
        """Whether every step from (first_epoch, first_step) to the end of ``epochs`` epochs is
        cached (then the teacher need not be loaded for training)."""
        if self.cache is None:
            return False
        return all(
            self.cache.covers(e, first_step if e == first_epoch else 0, self.steps_per_epoch)
            for e in range(first_epoch, epochs)
        )

    def load(self) -> None:
        if not self.loaded:
            self._load()
            self.loaded = True

    def flush(self) -> None:
        """Write the recorded steps as one chunk: the run calls this where it checkpoints."""
        if self.cache is not None:
            self.cache.flush()

    def detach(self) -> None:
        """Stop reading and writing the cache (what was recorded so far is written)."""
        if self.cache is not None:
            self.cache.flush()
            self.message(
                f"teacher cache {self.cache.root}: not used from here on (files failed in "
                "training, see data_report.tsv: the views differ from the cached ones)"
            )
            self.cache = None

    def __call__(self, batch: Any) -> Any:
        epoch, step = self.epoch, self.step
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        self.tstd_sums = None
        hit = None if self.cache is None else self.cache.lookup(epoch, step, batch.images.device)
        if hit is not None:
            self.hits += 1
            self.tstd_sums = hit.tstd_sums
            return self.make(hit.teacher_x, hit.teacher_aug, hit.keep)
        self.misses += 1
        self.load()
        out = self.live(batch)
        if self.cache is not None:
            self.cache.record(epoch, step, out.logits_x, out.logits_aug, out.keep)
        return out


def attach(
    cfg: Any,
    dataset: Any,
    distiller: Any,
    *,
    device: str,
    rank: int,
    world_size: int,
    graph_format: int,
    val_batches: int,
    message: Callable[[str], None],
    detached: bool = False,
) -> CachingTeacherPass:
    """Put ``cfg.teacher_cache`` around ``distiller``'s teacher pass (dalikd.step.Distiller,
    built without its teacher: it is built here on the first miss, or at once for
    ``cfg.eval_teacher``). Returns the wrapper; its ``val_teacher`` stands in for the teacher
    in evaluation (cached logits of the validation split). ``detached``: the run's data stream
    is not the cache's (files failed in training): the cache is neither checked nor used."""
    from dalikd.device import amp_dtype
    from dalikd.models import adapt_input
    from dalikd.step import Distiller, TeacherOut, place

    precision = str(amp_dtype(device, cfg.precision) or torch.float32).removeprefix("torch.")
    key = cache_key(
        cfg, dataset, device=device, precision=precision, world_size=world_size,
        input_norm=tuple(distiller.input_norm), graph_format=graph_format,
        topk=cfg.teacher_cache_topk,
    )  # fmt: skip
    cache = None
    if detached:
        message(f"teacher cache {cfg.teacher_cache}: not used (files failed in training, see "
                "data_report.tsv: the views differ from the cached ones)")  # fmt: skip
    else:
        cache = TeacherCache(cfg.teacher_cache, key, rank=rank, message=message)

    def load() -> None:
        teacher = Distiller.build(
            cfg.model, cfg.kd, dataset.num_classes, device, cfg.precision, student=False,
            channels_last=cfg.channels_last,
        ).teacher  # fmt: skip
        # the student's inputs, mapped to the teacher's own normalization (as Distiller.build)
        teacher = adapt_input(teacher, distiller.input_norm)
        distiller.teacher = place(teacher, device, cfg.channels_last)
        message(f"teacher cache {cfg.teacher_cache}: a step is not cached; teacher loaded")

    def run_teacher(images: torch.Tensor) -> torch.Tensor:
        caching.load()
        return distiller.teacher(images)

    caching = CachingTeacherPass(cache, distiller.teacher_outputs, TeacherOut, load, message)
    distiller.teacher_outputs = caching  # the step calls the wrapper from now on
    val_logits = cache.val_logits() if cache is not None else None
    caching.val_teacher = ValTeacher(run_teacher, val_logits, cache, val_batches)
    if cfg.eval_teacher:
        caching.load()
    return caching

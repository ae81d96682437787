"""How a cached step's teacher rows are stored: exact, compact or top-K, and what each costs.

A step's rows are the teacher logits of x, then those of the kept x' rows (``[n, C]``). Each
format encodes them into a few tensors (:meth:`Format.encode`) and decodes those back into
logits (:meth:`Format.decode`), whose softmax at any temperature is the cached soft target:

- ``exact`` (the default) keeps the logits as the teacher made them (fp32, or bf16/fp16 under
  autocast). A run reading them trains bit-identically to the live teacher.
- ``compact`` keeps one byte per logit and an fp16 scale per row: ``code = round((max_row - z)
  / s)``, ``s`` the row's range / 255. The row's own maximum is dropped: a softmax is the same
  for any shift of a row. Measured KL(full ‖ stored) at T = 4: 1e-5 – 4e-5 nats on a
  1000-class synthetic teacher, 3e-6 on the digits teacher (docs/teacher_cache.md).
- ``topk`` keeps the K largest logits (fp16), their classes and the log-sum-exp of the rest at
  the KD temperature, the rest's mass spread uniformly: explicitly lossy (0.06–0.22 nats per
  row on a 1000-class teacher at K = 12).

The lossy formats also store each step's exact T. stddev sums (:func:`dalikd.metrics.
tstddev_sums`), so the metric does not change. KL(full ‖ stored) at the run's temperature is
measured on every step as it is written (:func:`measure_kl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from dalikd.losses import kl_divergence

FormatName = Literal["exact", "compact", "topk"]
LOSSY_BOUND = 1e-3  # nats: a lossy format whose measured mean KL is above this is warned about
COMPACT_LEVELS = 255  # codes 0..255: 256 levels per row, the row maximum at 0


@dataclass(frozen=True)
class Format:
    """One storage format; ``topk`` and ``temperature`` matter to "topk" only."""

    name: FormatName = "exact"
    topk: int = 0
    temperature: float = 4.0

    @property
    def lossy(self) -> bool:
        return self.name != "exact"

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """A step's rows [n, C] -> what the chunk stores for it (CPU tensors)."""
        if self.name == "exact":
            return {"logits": rows.detach().cpu()}
        if self.name == "compact":
            return compress_compact(rows.detach())
        return {k: v.cpu() for k, v in compress_topk(rows, self.topk, self.temperature).items()}

    def decode(self, parts: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
        """What :meth:`encode` stored -> logits [n, C] (on the parts' device)."""
        if self.name == "exact":
            return parts["logits"]
        if self.name == "compact":
            return expand_compact(parts["codes"], parts["scale"])
        return expand_topk(parts["values"], parts["indices"], parts["rest_lse"], num_classes,
                           self.temperature)  # fmt: skip

    def width(self, num_classes: int) -> int:
        """The last dimension of the main stored tensor (a chunk of another width is damaged)."""
        return min(self.topk, num_classes) if self.name == "topk" else num_classes


# -- compact -----------------------------------------------------------------------------------


def compress_compact(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """[n, C] logits -> ``codes`` [n, C] uint8 and ``scale`` [n] fp16: code 0 is a row's
    maximum, each code a step of the row's ``scale`` (its finite range / 255) below it."""
    z = logits.float()
    below = z.max(dim=1, keepdim=True).values - z  # >= 0; inf where a logit is -inf
    span = below.masked_fill(~below.isfinite(), 0).max(dim=1).values
    scale = (span / COMPACT_LEVELS).clamp_min(1e-4).half()  # fp16: 2 bytes a row
    codes = torch.round(below / scale.float()[:, None]).clamp(0, COMPACT_LEVELS).to(torch.uint8)
    return {"codes": codes.cpu(), "scale": scale.cpu()}


def expand_compact(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits [n, C] float32 of compact ``codes`` (each row's maximum at 0)."""
    return codes.float() * -scale.to(codes.device).float()[:, None]


# -- top-K -------------------------------------------------------------------------------------


def compress_topk(logits: torch.Tensor, topk: int, temperature: float) -> dict[str, torch.Tensor]:
    """[N, C] logits -> ``values`` [N, K] fp16, ``indices`` [N, K] int16 (int32 past 32,767
    classes), ``rest_lse`` [N] fp32: log Σ over the other classes of exp(z / T) (-inf when
    K = C)."""
    z = logits.detach().float()
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


# -- what a format changes ---------------------------------------------------------------------


def measure_kl(full: torch.Tensor, stored: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(softmax(full / T) ‖ softmax(stored / T)) in nats, float64 (small numbers
    need it): what storing changed of the soft targets."""
    return kl_divergence(stored, full, temperature, reduction="rows", dtype=torch.float64)


def soft_target_kl(logits: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per-row KL of the soft targets at ``fmt.temperature`` after a round trip through
    ``fmt``, float64."""
    stored = fmt.decode(fmt.encode(logits), logits.shape[1])
    return measure_kl(logits, stored.to(logits.device), fmt.temperature)


# Per-row KL is kept per chunk as a histogram over these edges (8 a decade, 1e-12 .. 1e2 nats;
# bin 0 holds KL <= 1e-12, the last everything above 1e2): an epoch's p99 to within 10^(1/8).
KL_EDGES = torch.logspace(-12, 2, 14 * 8 + 1, dtype=torch.float64)


def kl_histogram(kl: torch.Tensor) -> torch.Tensor:
    """int64 counts of ``kl`` per bin of :data:`KL_EDGES` (len(KL_EDGES) + 1 bins)."""
    bins = torch.bucketize(kl.double().cpu(), KL_EDGES)
    return torch.bincount(bins, minlength=len(KL_EDGES) + 1)


def kl_quantile(histogram: torch.Tensor, q: float) -> float:
    """The upper edge of the bin holding the ``q`` quantile of a :func:`kl_histogram` (0 when
    it falls in the bin of KL <= 1e-12)."""
    total = int(histogram.sum())
    if not total:
        return math.nan
    index = int(torch.searchsorted(histogram.cumsum(0), math.ceil(q * total)))
    if index == 0:
        return 0.0
    return float(KL_EDGES[min(index, len(KL_EDGES) - 1)])


# -- size --------------------------------------------------------------------------------------


def step_bytes(
    fmt: Format | int, batch: int, kept: int, num_classes: int, full_itemsize: int = 4,
    picked: bool = True,
) -> int:  # fmt: skip
    """Payload bytes of one cached step: ``batch`` x rows and ``kept`` x' rows (with the pick's
    index of each when ``picked``: a pool recipe). ``fmt`` an int: top-K with that K (0: exact).
    ``full_itemsize``: the exact format's bytes per logit (4: fp32, 2: bf16/fp16)."""
    if isinstance(fmt, int):
        fmt = Format("topk", fmt) if fmt else Format("exact")
    rows = batch + kept
    index_bytes = 2 if num_classes <= 32767 else 4
    keep_bytes = kept * index_bytes if picked else 0
    sums = num_classes * 8 + 8  # fp64 probability sums and entropy sum (lossy formats)
    if fmt.name == "exact":
        return rows * num_classes * full_itemsize + keep_bytes
    if fmt.name == "compact":
        return rows * (num_classes + 2) + keep_bytes + sums
    row = min(fmt.topk, num_classes) * (2 + index_bytes) + 4  # fp16 value + index, fp32 rest_lse
    return rows * row + keep_bytes + sums


def imagenet_projection(
    fmt: Format | int, kept: int = 256, picked: bool = True, full_itemsize: int = 4
) -> dict[str, float]:
    """Bytes of a cache for ImageNet-1k (1,281,167 train / 50,000 val images, 1000 classes),
    batch 256, 100 epochs, ``kept`` x' rows per step (default KD + CutMixPick, pool 2, half
    kept: 256), one rank: steps x step_bytes + the val logits (fp32, stored once)."""
    steps = 1_281_167 // 256 * 100
    train = steps * step_bytes(fmt, 256, kept, 1000, full_itemsize, picked)
    val = 50_000 * 1000 * 4
    return {"steps": steps, "train_bytes": train, "val_bytes": val, "total_bytes": train + val}

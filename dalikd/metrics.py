"""T. stddev: the teacher-only proxy for how good a data augmentation is for KD.

Wang et al. (NeurIPS 2022): the lower the standard deviation of the teacher's mean probability,
the lower the student's test loss. Exactly as their reference code: consecutive teacher
probability rows (softmax at T = 1, clean x and augmented x' of every step, in order) are
grouped by ``group_size`` rows (640 = 5 steps x (64 + 64)); each complete group gives one
mean-probability vector; T. stddev = mean over classes of the unbiased standard deviation of
those vectors across groups. It is cumulative over everything seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dalikd.errors import DalikdError

GROUP_SIZE = 640  # rows: the reference's 5 steps at its batch 64, 5 x (64 + 64)
# A group of the probe and of the training metric is this many steps of teacher rows, whatever
# the batch (docs/method.md: the reference closes a group every 5 steps).
GROUP_STEPS = 5


def entropy(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-row entropy in nats, ``-Σ_c p_c log p_c``, from probabilities and their logs (each
    caller takes the logs as its numbers need: T. stddev from the clamped probabilities, the
    pick from log-softmax). The one entropy of dalikd."""
    return -(probs * log_probs).sum(dim=1)


def row_entropy_sum(probs: torch.Tensor) -> torch.Tensor:
    """Σ over rows of the entropy of ``probs`` (float64), as T. stddev counts it."""
    return entropy(probs, probs.clamp_min(1e-30).log()).sum()


def tstddev_sums(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What :meth:`TStddev.add_sums` takes for teacher rows ``logits`` [n, C]: (Σ of their
    probabilities at T = 1 [C] float64, Σ of their entropies float64, n), made exactly as
    :meth:`TStddev.add` makes them from the rows (bit-identical state either way)."""
    probs = logits.detach().float().softmax(dim=1).double()
    return probs.sum(dim=0), row_entropy_sum(probs), len(probs)


def t_stddev(probs: torch.Tensor, group_size: int = GROUP_SIZE) -> float:
    """T. stddev of ``probs`` ([N, C] teacher probability rows, in the order seen).

    Rows past the last complete group are ignored. Needs at least 2 complete groups.
    """
    groups = probs.shape[0] // group_size
    if groups < 2:
        raise DalikdError(
            f"T. stddev needs at least 2 complete groups of {group_size} rows "
            f"({2 * group_size} rows); got {probs.shape[0]}"
        )
    means = probs[: groups * group_size].double().reshape(groups, group_size, -1).mean(dim=1)
    return means.std(dim=0, unbiased=True).mean().item()


class TStddev:
    """The same number, accumulated row by row in constant memory.

    Group means enter Welford's running mean/variance (float64) one at a time, so a 100-epoch
    ImageNet run needs no list of 400k group vectors. Sums stay on the rows' device: no sync
    until :meth:`value`. Also tracks the mean teacher entropy of the rows.
    """

    def __init__(self, group_size: int = GROUP_SIZE) -> None:
        self.group_size = group_size
        self.rows = 0  # rows added so far
        self.groups = 0  # complete groups so far
        self._partial: torch.Tensor | None = None  # sum of the rows of the open group
        self._mean: torch.Tensor | None = None  # running mean of the group means
        self._m2: torch.Tensor | None = None  # running sum of squared deviations
        self._entropy = 0.0  # sum of row entropies, as a tensor once rows arrive

    def add(self, probs: torch.Tensor) -> None:
        """Append rows ([n, C] probabilities), in order."""
        probs = probs.detach().double()
        if self._partial is None:
            self._partial = torch.zeros(probs.shape[1], dtype=torch.float64, device=probs.device)
            self._mean = torch.zeros_like(self._partial)
            self._m2 = torch.zeros_like(self._partial)
        self._entropy = self._entropy + row_entropy_sum(probs)
        start = 0
        while start < len(probs):
            in_group = self.rows % self.group_size
            take = min(self.group_size - in_group, len(probs) - start)
            self._partial += probs[start : start + take].sum(dim=0)
            self.rows += take
            start += take
            if self.rows % self.group_size == 0:
                self._close_group()

    def add_sums(self, prob_sum: torch.Tensor, entropy_sum: torch.Tensor, rows: int) -> None:
        """Append ``rows`` rows given only their sums (probabilities [C] and entropies, float64,
        made as :meth:`add` makes them): the teacher cache's top-K steps keep these instead of
        the rows. The rows must not cross a group boundary (a step's rows never do: a group is
        GROUP_STEPS whole steps); then the state is bit-identical to :meth:`add` of the rows."""
        if self.rows % self.group_size + rows > self.group_size:
            raise ValueError(f"{rows} summed rows cross a group of {self.group_size}")
        if self._partial is None:
            self._partial = torch.zeros_like(prob_sum, dtype=torch.float64)
            self._mean = torch.zeros_like(self._partial)
            self._m2 = torch.zeros_like(self._partial)
        self._entropy = self._entropy + entropy_sum
        self._partial += prob_sum
        self.rows += rows
        if self.rows % self.group_size == 0:
            self._close_group()

    def _close_group(self) -> None:
        group_mean = self._partial / self.group_size
        self.groups += 1
        delta = group_mean - self._mean
        self._mean += delta / self.groups
        self._m2 += delta * (group_mean - self._mean)
        self._partial.zero_()

    def value(self) -> float:
        """T. stddev so far; NaN before 2 complete groups."""
        if self.groups < 2:
            return math.nan
        return (self._m2 / (self.groups - 1)).sqrt().mean().item()

    def mean_entropy(self) -> float:
        return float(self._entropy) / self.rows if self.rows else math.nan

    def pooled(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        """(T. stddev, mean entropy) over the groups and rows of every process, where each
        process accumulated its own rows (one data shard per rank) and ``all_sum`` sums a
        tensor over the processes (every process calls this, in step).

        Welford states combine exactly (Chan et al.): with n_r groups, mean m_r and squared
        deviations M2_r on rank r, N = Σ n_r, m = Σ n_r·m_r / N and M2 = Σ (M2_r + n_r·(m_r -
        m)²). Identity for a single process (``all_sum`` = identity): the same as
        :meth:`value` and :meth:`mean_entropy`.
        """
        if self._mean is None:
            raise DalikdError("T. stddev: no rows were added on this process")
        n = torch.tensor([float(self.groups)], dtype=torch.float64, device=self._mean.device)
        entropy = torch.as_tensor(self._entropy, dtype=torch.float64, device=n.device).view(1)
        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=n.device)
        totals = all_sum(torch.cat([n, rows, entropy, n * self._mean]))
        groups, all_rows, all_entropy = (float(v) for v in totals[:3])
        entropy_mean = all_entropy / all_rows if all_rows else math.nan
        if groups < 2:
            return math.nan, entropy_mean
        mean = totals[3:] / groups
        m2 = all_sum(self._m2 + n * (self._mean - mean) ** 2)
        return (m2 / (groups - 1)).sqrt().mean().item(), entropy_mean

    def state_dict(self, cpu: bool = False) -> dict:
        """The accumulator's state; ``cpu``: its tensors copied to the CPU (to gather them)."""
        move = (lambda t: None if t is None else t.cpu()) if cpu else (lambda t: t)
        return {
            "group_size": self.group_size, "rows": self.rows, "groups": self.groups,
            "partial": move(self._partial), "mean": move(self._mean), "m2": move(self._m2),
            "entropy": float(self._entropy),
        }  # fmt: skip

    @staticmethod
    def combine(states: list[dict]) -> dict:
        """One state whose complete groups are those of all ``states`` (Chan's combination of
        their Welford sums), for a run resumed with fewer processes than it was saved with.
        The open group of the first state is kept; the rows of the others' open groups (fewer
        than a group each) are dropped."""
        first = states[0]
        with_groups = [st for st in states if st["groups"]]
        if len(states) == 1 or not with_groups:
            return first
        groups = sum(st["groups"] for st in with_groups)
        mean = sum(st["groups"] * st["mean"] for st in with_groups) / groups
        m2 = sum(st["m2"] + st["groups"] * (st["mean"] - mean) ** 2 for st in with_groups)
        closed = [st["groups"] * first["group_size"] for st in states[1:]]
        return {**first, "groups": groups, "mean": mean, "m2": m2,
                "rows": first["rows"] + sum(closed),
                "entropy": sum(st["entropy"] for st in states)}  # fmt: skip

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.group_size, self.rows, self.groups = (
            state["group_size"],
            state["rows"],
            state["groups"],
        )
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        self._partial = None if state["partial"] is None else move(state["partial"])
        self._mean = None if state["mean"] is None else move(state["mean"])
        self._m2 = None if state["m2"] is None else move(state["m2"])
        self._entropy = state["entropy"]

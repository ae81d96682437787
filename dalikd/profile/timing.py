"""The timing harness: warm-up, timed windows (median rate, CPU time per sample), and
windows of several runs interleaved so a machine whose load drifts slows them alike."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalikd.profile.config import ProfileConfig, Timing


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of other processes, from /proc; 0 where unreadable."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class Runner:
    """One thing to time: ``step()`` handles one batch of ``samples`` samples."""

    step: Callable[[], Any]
    samples: int
    sync: Callable[[], None] = lambda: None  # waits for queued device work
    pids: Callable[[], list[int]] = list  # helper processes whose CPU time counts

    def window(self, seconds: float, min_calls: int = 1) -> tuple[float, int, float]:
        """Run at least ``seconds`` and ``min_calls`` batches: (seconds, samples, cpu s)."""
        pids = self.pids()
        cpu0 = time.process_time() + _cpu_seconds(pids)
        t0 = time.perf_counter()
        calls = 0
        while calls < min_calls or time.perf_counter() - t0 < seconds:
            self.step()
            calls += 1
        self.sync()
        elapsed = time.perf_counter() - t0
        return elapsed, calls * self.samples, time.process_time() + _cpu_seconds(pids) - cpu0


def timing_of(parts: list[tuple[float, int, float]]) -> Timing:
    rates = [n / t for t, n, _ in parts]
    samples = sum(n for _, n, _ in parts)
    cpu = sum(c for _, _, c in parts)
    return Timing(statistics.median(rates), rates, 1e3 * cpu / samples if samples else None)


def time_alone(run: Runner, cfg: ProfileConfig) -> Timing:
    """Warm-up batches, then ``cfg.windows`` timed windows."""
    run.window(0.0, cfg.warmup)
    return timing_of([run.window(cfg.window_seconds) for _ in range(cfg.windows)])


def time_interleaved(
    runs: dict[str, Runner], cfg: ProfileConfig, settle_seconds: float = 0.0
) -> dict[str, Timing]:
    """Round-robin windows of several runs, so a machine whose load drifts (other jobs) slows
    them alike and their ratios hold.

    Before each window a run settles (``warmup`` batches and ``settle_seconds``): the previous
    run's prefetching threads or DataLoader workers finish their queued batches then, not in
    this window. DALI queues two batches ahead; a DataLoader two per worker.
    """
    parts: dict[str, list] = {name: [] for name in runs}
    for run in runs.values():
        run.window(0.0, cfg.warmup)
    for _ in range(cfg.windows):
        for name, run in runs.items():
            run.window(settle_seconds, cfg.warmup)
            parts[name].append(run.window(cfg.window_seconds))
    return {name: timing_of(p) for name, p in parts.items()}

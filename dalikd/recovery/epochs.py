"""Which samples each rank reads in an epoch, and in which order: pure functions of the run's
seed, the epoch, the rank and the samples still good, so that every rank agrees without a word
and a resumed run knows exactly what was read before it stopped.

Epoch e shuffles the good samples with one permutation for every rank (NumPy's generator
seeded with ``[seed, e]``) and gives rank r of n the slice ``[N r / n, N (r + 1) / n)`` of it (the
rule of DALI's readers). Samples stored together (a tar shard's: ``groups``) stay together: the
permutation then shuffles the groups, and the samples inside each group, from the same
generator, so that a rank reads each shard it touches in one run (a folder's files stand
alone: one permutation of them all).

Every rank takes the same number of steps, ``(N // n) // batch``: its first ``steps x batch``
samples are its *reads*, the few left over its *extra* (a different few each epoch, as DALI's
``LastBatchPolicy.DROP`` leaves out). No padding, no partial batch: a rank never reads a
sample twice in an epoch, or one that is not its own.

When a sample fails at step s, the rank's reads from s on become the unseen good ones, in their
order, topped up to the epoch's length with its extra samples, then (when those run out) with
what it already read this epoch, from its first (:func:`after_failure`): every good sample of
the rank's part is read exactly once, the step count is kept, and nothing depends on another
rank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import numpy as np


def steps_per_epoch(good: int, world: int, batch: int) -> int:
    """The steps every rank takes in an epoch of ``good`` samples."""
    return (good // world) // batch


def epoch_order(
    n: int, *, seed: int, epoch: int, groups: Sequence[int] | None = None
) -> np.ndarray:
    """Epoch ``epoch``'s permutation of ``n`` samples: one draw of NumPy's generator seeded
    with ``[seed, epoch]``; with ``groups`` (sample k's group), the groups in a drawn order
    (by their first sample), each group's samples shuffled in turn."""
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        return rng.permutation(n)
    ids = np.asarray(groups)
    by_group = np.argsort(ids, kind="stable")  # positions, grouped, in order within a group
    starts = np.flatnonzero(np.r_[True, ids[by_group][1:] != ids[by_group][:-1]])
    parts = np.split(by_group, starts[1:])
    return np.concatenate(
        [parts[g][rng.permutation(len(parts[g]))] for g in rng.permutation(len(parts))]
        or [np.zeros(0, np.int64)]
    )


def epoch_reads(
    good: Sequence[int], *, seed: int, epoch: int, rank: int, world: int, batch: int,
    groups: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """(this rank's reads of epoch ``epoch``: steps x batch identities in order, its extra
    ones) of the shuffled ``good`` identities (``groups``: the group of every identity, as a
    :class:`~dalikd.recovery.source.SampleSource` gives them)."""
    n = len(good)
    mine_groups = None if groups is None else np.asarray(groups)[np.asarray(good, np.int64)]
    order = epoch_order(n, seed=seed, epoch=epoch, groups=mine_groups)
    mine = [good[i] for i in order[n * rank // world : n * (rank + 1) // world].tolist()]
    cut = steps_per_epoch(n, world, batch) * batch
    return mine[:cut], mine[cut:]


def after_failure(
    reads: list[int], extra: Sequence[int], step: int, culprits: Iterable[int], batch: int
) -> list[int]:
    """``reads`` once ``culprits`` failed at ``step``: the first ``step`` batches as they were,
    then the unseen reads less the culprits, topped up to the same length with the ``extra``
    samples not yet read nor failed, then with the reads already done (from the first); empty
    when nothing good is left to top up with."""
    bad = set(culprits)
    done, rest = reads[: step * batch], [i for i in reads[step * batch :] if i not in bad]
    short = len(reads) - len(done) - len(rest)
    used = set(reads)
    pool = [i for i in extra if i not in bad and i not in used] + done
    pool = pool or rest  # nothing read yet, no extra left: the unseen good ones again
    if not pool:
        return []
    return done + rest + [pool[k % len(pool)] for k in range(short)]


def remainder_seed(seed: int, epoch: int, step: int) -> int:
    """The augmentation seed of a loader that takes over at ``step`` after a failure (the epoch's
    own loader starts from ``seed + epoch``)."""
    return int(np.random.default_rng([seed, epoch, step, 1]).integers(2**31))


def history_id(known: Iterable[int], failures: Sequence[tuple[int, Sequence[int]]]) -> str:
    """What a step's views depend on beyond the run's settings: the samples left out before the
    epoch (``known``) and this rank's failures in it so far (step, identities). "" when there
    are none: a run without failures, whose views a teacher cache keys by position alone."""
    known = sorted(known)
    if not known and not failures:
        return ""
    text = json.dumps([known, [[s, sorted(ids)] for s, ids in failures]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]

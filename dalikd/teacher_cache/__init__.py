"""The teacher-output cache: distill again without running the teacher (docs/teacher_cache.md).

dalikd's DALI draws are seeded explicitly and a resumed run is bit-identical, so the views of a
second run with the same data plan are the views of the first. The cache stores, per training
step, what the loss and the metrics take from the teacher: its logits of x and of the kept x'
(after the pool's pick, whose indices are stored too), in the format the user chose (exact by
default; :mod:`~dalikd.teacher_cache.formats`). A later run with the same key reads them and
never runs (or loads) the teacher.

Layout of DIR (written by every rank, each file atomically: :mod:`dalikd.atomic`)::

    key.json                      every setting that decides the teacher's inputs and outputs
    train/e0003/r0/c0000000-0000500.pt   rank 0's steps [0, 500) of epoch 4 (one chunk)
    val/r0.pt                     rank 0's teacher logits of the validation split

A chunk holds the steps between two checkpoints of the writing run, so a run killed mid-epoch
leaves whole chunks up to its last checkpoint (and the resumed run continues from there).
A chunk that is unreadable, truncated or of another key is a miss: its steps are recomputed.
A key.json of other settings is an error naming them.

Modules: :mod:`.key` (the key, derived from the data plan), :mod:`.formats` (exact, compact,
top-K; their KL and sizes), :mod:`.store` (the folder: chunk writer and reader),
:mod:`.source` (:class:`CachedTeacher`, the teacher source training uses), :mod:`.info`
(``dalikd cache-info``).
"""

from dalikd.teacher_cache.formats import (
    LOSSY_BOUND,
    Format,
    compress_topk,
    expand_topk,
    imagenet_projection,
    soft_target_kl,
    step_bytes,
)
from dalikd.teacher_cache.info import DEFAULT_TOPK, SIZE_TARGET, cache_info, projected_recipe
from dalikd.teacher_cache.key import (
    CACHE_FORMAT,
    NOT_IN_KEY,
    cache_key,
    key_difference,
    key_digest,
    plan_key,
)
from dalikd.teacher_cache.source import CachedTeacher, ValTeacher, for_run
from dalikd.teacher_cache.store import CachedStep, TeacherCache

__all__ = [
    "CACHE_FORMAT", "DEFAULT_TOPK", "LOSSY_BOUND", "NOT_IN_KEY", "SIZE_TARGET", "CachedStep",
    "CachedTeacher", "Format", "TeacherCache", "ValTeacher", "cache_info", "cache_key",
    "compress_topk", "expand_topk", "imagenet_projection", "key_difference", "key_digest",
    "for_run", "plan_key", "projected_recipe", "soft_target_kl", "step_bytes",
]  # fmt: skip

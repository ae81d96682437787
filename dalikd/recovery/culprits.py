"""Which samples made a DALI pipeline fail: the ones its error names, else the ones read next,
decoded a batch at a time in the order they were read, a failing batch bisected to single
samples. A folder's samples are files (:func:`find_culprits`, DALI's file reader); a shard
set's are bytes read through the shards' index (:func:`bytes_failure`, fed to the same
decode)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

T = TypeVar("T", bound=Hashable)


def is_decode_failure(error: BaseException) -> bool:
    """A DALI pipeline's error (a file it could not read or decode ends the pipeline)."""
    return isinstance(error, RuntimeError) and "pipeline" in str(error)


def dali_reason(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (after 'encountered:')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        if after:
            return after[0]
    return lines[-1] if lines else type(error).__name__


def _run_once(graph: Callable[[], Any], plan: Any, batch: int, feed: Any = None) -> str | None:
    """Build ``graph`` into a pipeline of ``batch`` samples on the plan's device and run it once
    (``feed``: the bytes its external source "bytes" takes); DALI's reason, or None."""
    from nvidia.dali import pipeline_def

    from dalikd.loaders import _dali_device_id

    try:
        pipe = pipeline_def(graph)(
            batch_size=batch, num_threads=plan.data.threads,
            device_id=_dali_device_id(plan.device), prefetch_queue_depth=1,
        )  # fmt: skip
        pipe.build()
        if feed is not None:
            pipe.feed_input("bytes", feed)
        pipe.run()
    except RuntimeError as e:
        return dali_reason(e)
    return None


def first_failure(files: list[str], plan: Any) -> str | None:
    """Decode ``files`` as one batch the way training reads them (raw files: reshaped,
    loaders.pixels); the DALI error or None."""
    from nvidia.dali import fn

    from dalikd.loaders import pixels

    def graph() -> Any:
        jpegs, _ = fn.readers.file(files=files, name="Check")
        return pixels(jpegs, plan)

    return _run_once(graph, plan, len(files))


def bytes_failure(images: list[bytes], plan: Any) -> str | None:
    """Decode ``images`` (each an encoded image's bytes, e.g. a shard member's) as one batch the
    way training reads them; the DALI error or None."""
    import numpy as np
    from nvidia.dali import fn, types

    from dalikd.loaders import pixels

    def graph() -> Any:
        return pixels(fn.external_source(name="bytes", dtype=types.UINT8), plan)

    return _run_once(graph, plan, len(images), [np.frombuffer(b, np.uint8) for b in images])


def bisect_failures(
    candidates: Sequence[T], fails: Callable[[list[T]], str | None], batch: int,
    *, named: Sequence[T] = (), everywhere: bool = False,
) -> dict[T, str]:  # fmt: skip
    """sample -> reason for the ``candidates`` (in the order they were to be read) that fail:
    ``fails(samples)`` decodes samples as one batch (the reason, or None). The ``named`` ones
    (an error names them) are tried alone first; else the candidates a ``batch`` at a time, a
    failing batch bisected down to single samples, up to the first batch that holds one (the
    pipeline fails at the batch it cannot make; a sample further on fails later, where it is
    read). ``everywhere``: every batch is searched."""
    bad: dict[T, str] = {}

    def bisect(part: list[T]) -> None:
        reason = fails(part)
        if reason is None:
            return
        if len(part) == 1:
            bad[part[0]] = reason
            return
        half = len(part) // 2
        bisect(part[:half])
        bisect(part[half:])

    for sample in named:
        bisect([sample])
    if bad:
        return bad
    rest = list(dict.fromkeys(candidates))
    step = max(1, batch)
    for start in range(0, len(rest), step):
        bisect(rest[start : start + step])
        if bad and not everywhere:
            break
    return bad


def find_culprits(
    error: BaseException, candidates: list[str], plan: Any, *, everywhere: bool = False
) -> dict[str, str]:
    """path -> reason for the files among ``candidates`` (in the order they were to be read)
    that fail to decode: the ones the DALI ``error`` names, else the first failing batch's
    (:func:`bisect_failures`)."""
    named = [f for f in dict.fromkeys(candidates) if f in str(error)]
    return bisect_failures(candidates, lambda files: first_failure(files, plan),
                           plan.data.batch_size, named=named, everywhere=everywhere)  # fmt: skip

"""Which files made a DALI pipeline fail: the ones its error names, else the ones read next,
decoded a batch at a time in the order they were read, a failing batch bisected to single
files."""

from __future__ import annotations

from typing import Any


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


def first_failure(files: list[str], plan: Any) -> str | None:
    """Decode ``files`` as one batch the way training reads them; the DALI error or None."""
    from nvidia.dali import fn, pipeline_def, types

    from dalikd.loaders import _dali_device_id, decoder_args

    def graph():
        jpegs, _ = fn.readers.file(files=files, name="Check")
        return fn.decoders.image(
            jpegs, **decoder_args(plan.data, plan.device), output_type=types.RGB
        )

    try:
        pipe = pipeline_def(graph)(
            batch_size=len(files), num_threads=plan.data.threads,
            device_id=_dali_device_id(plan.device), prefetch_queue_depth=1,
        )  # fmt: skip
        pipe.build()
        pipe.run()
    except RuntimeError as e:
        return dali_reason(e)
    return None


def find_culprits(
    error: BaseException, candidates: list[str], plan: Any, *, everywhere: bool = False
) -> dict[str, str]:
    """path -> reason for the files among ``candidates`` (in the order they were to be read)
    that fail to decode: the ones the DALI ``error`` names; else the candidates a batch at a
    time, a failing batch bisected down to single files, up to the first batch that holds one
    (the pipeline fails at the batch it cannot make; a file further on fails later, where it is
    read). ``everywhere``: every batch is searched."""
    named = [f for f in dict.fromkeys(candidates) if f in str(error)]
    bad: dict[str, str] = {}

    def bisect(files: list[str]) -> None:
        reason = first_failure(files, plan)
        if reason is None:
            return
        if len(files) == 1:
            bad[files[0]] = reason
            return
        half = len(files) // 2
        bisect(files[:half])
        bisect(files[half:])

    for path in named:
        bisect([path])
    if bad:
        return bad
    rest = list(dict.fromkeys(candidates))
    step = max(1, plan.data.batch_size)
    for start in range(0, len(rest), step):
        bisect(rest[start : start + step])
        if bad and not everywhere:
            break
    return bad

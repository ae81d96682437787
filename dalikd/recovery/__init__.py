"""Keep a run alive through image files that pass the data scan and still fail in DALI.

The scan (:mod:`dalikd.datacheck`) reads headers and tails; a file can still kill the pipeline
at run time: a corrupt header, a truncated JPEG whose last 4 KiB hold an embedded thumbnail's
end marker, a file replaced or removed after a cached scan. DALI cannot skip a sample inside a
pipeline, and a pipeline that failed is dead. So the run decides itself which samples each rank
reads, in which order (:mod:`.epochs`: a pure function of the seed, the epoch, the rank and the
samples still good), and reads them through a loader over exactly that list. When it fails:

1. the failing files are found (:mod:`.culprits`: the paths DALI names, else the files read
   next, decoded a batch at a time and the failing batch bisected to single files);
2. they are reported (``data_report.tsv``, :mod:`.report`) and every rank leaves them out from
   the next epoch on (the ranks tell each other at the run's next checkpoint);
3. the rank goes on from a loader over the rest of its reads less the culprits, topped up to the
   epoch's length: the step count, the schedule and every other rank are unaffected, and every
   good image of the rank's part is read exactly once in the epoch.

Because what was read before a step is a function of the epoch's plan and the failures so far
(which a checkpoint saves, with the DALI state of the loader in use), a run killed at any point
and resumed is bit-identical to one that was not, failures included. :class:`ValData` does the
same for validation (and ``dalikd eval``), :class:`TrainData` for training (and the tools that
show or probe it). A data source other than a file list plugs in as a :class:`SampleSource`.
"""

from dalikd.recovery.culprits import (
    bisect_failures,
    bytes_failure,
    dali_reason,
    find_culprits,
    first_failure,
    is_decode_failure,
)
from dalikd.recovery.epochs import (
    after_failure,
    epoch_order,
    epoch_reads,
    history_id,
    steps_per_epoch,
)
from dalikd.recovery.report import (
    REPORT,
    RUN_TIME,
    VAL_TIME,
    LeftOutWarning,
    failure_epoch,
    read_report,
    report_rows,
    with_reported,
    write_report,
)
from dalikd.recovery.run import RunFailures
from dalikd.recovery.shards import ShardSource
from dalikd.recovery.source import FileSource, SampleSource, source_of
from dalikd.recovery.train_data import STATE, TrainData, dali_state
from dalikd.recovery.val_data import ValData

__all__ = [
    "REPORT", "RUN_TIME", "STATE", "VAL_TIME", "FileSource", "LeftOutWarning", "RunFailures",
    "SampleSource", "ShardSource", "TrainData", "ValData", "after_failure",
    "bisect_failures", "bytes_failure", "dali_reason", "dali_state", "epoch_order",
    "epoch_reads", "failure_epoch", "find_culprits", "first_failure", "history_id",
    "is_decode_failure", "read_report", "report_rows", "source_of", "steps_per_epoch",
    "with_reported", "write_report",
]  # fmt: skip

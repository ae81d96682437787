"""Stage-by-stage throughput of the data path and the KD step (``dalikd profile``).

Units: every rate is in *training samples per second* (B samples per batch), whatever the stage
handles per sample (x alone, x and x', or x and a pool of k candidates), so any two stages
compare directly. Each stage is timed alone: warm-up batches first, then ``windows`` windows of
at least ``window_seconds`` each; the rate is the median window. CPU time per sample (this
process, all threads; plus the DataLoader workers for the baseline) comes with every stage: it
stays meaningful on a machine that other work shares.

The DALI stages are cumulative (read; + decode and random crop; + resize; + flip = the plain
training pipeline, uint8 out; + the scheme's x'; + the hand-off to torch and the normalization
on the training device), so a stage's own cost is the difference of the inverse rates; the
stage with the largest own cost bounds the scheme. The model stages (teacher forward, student
forward + backward) and the KD step on synthetic tensors in memory are timed alone; the KD step
fed by the pipeline is the real thing.
Data-loading efficiency = fed step / synthetic step.

``ratio`` = DALI hand-off rate / baseline rate per scheme (the headline); ``cpu_ratio`` =
baseline CPU time / DALI CPU time per sample, the same comparison in work done, which a busy
machine disturbs much less.

The torchvision baseline is the usual ImageFolder + DataLoader (PIL) with as many workers as
DALI has threads, the same RandomResizedCrop (antialiased), flip and normalize, and
``torchvision.transforms.v2`` CutMix / MixUp for the mixing schemes. It is timed in windows
interleaved with DALI's hand-off of the same scheme, so a machine that gets busier slows both.
"""

from dalikd.profile.config import ProfileConfig, ProfiledAug, resolve_augs
from dalikd.profile.report import bound, write_plot
from dalikd.profile.run import check, run_profile

__all__ = ["ProfileConfig", "ProfiledAug", "bound", "check", "resolve_augs", "run_profile",
           "write_plot"]  # fmt: skip

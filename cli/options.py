"""Click options that several commands share, defined once: each flag's name, type and help
(:class:`Flag`), used by the standalone commands' decorators and by ``dalikd train``'s table of
options (cli/main.py's TRAIN_OPTIONS, whose defaults come from the config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from dalikd.config import Device, Granularity, Mixing, Resize, choices

# One wording per shared setting, in every command's --help.
SEED_HELP = "random seed of the run (DALI's draws and torch's; the same seed, the same draws)"
THREADS_HELP = "DALI CPU threads (0: one per core, at most 8)"
WEIGHTS_HELP = (
    "a file (state_dict or dalikd checkpoint) or a torchvision weights name (IMAGENET1K_V1)"
)
MODEL_HELP = "torchvision name, timm:NAME, cifar:NAME (dalikd models) or module:function"
MAX_PIXELS_HELP = (
    "leave out images whose header claims more pixels than this (decompression bombs); 0: no limit"
)


@dataclass(frozen=True)
class Flag:
    """A shared flag: its name, click type and help."""

    name: str
    type: Any
    help: str

    def option(self, *names: str, **kw: Any):
        """The click option of this flag (``names``: more flags, then the parameter name)."""
        return click.option(self.name, *names, type=self.type, help=self.help, **kw)


DEVICE = Flag("--device", click.Choice(choices(Device)),
              "where DALI and torch run (auto: gpu when CUDA is available)")  # fmt: skip
MIXING = Flag(
    "--mixing", click.Choice(choices(Mixing)),
    "mixing's pixel work: dalikd's fused operator, stock DALI operators (the same pixels), or "
    "auto (native where it builds; DALIKD_NATIVE=0|1 sets auto); a run resolves it once and "
    "saves it with its data plan",
)  # fmt: skip
RESIZE = Flag(
    "--resize", click.Choice(choices(Resize)),
    "antialiased resize: dalikd's CPU operator or DALI's fn.resize (up to 2 grey levels apart), "
    "or auto (native on CPU where it loads; DALIKD_NATIVE_RESIZE=0 sets auto); resolved once",
)  # fmt: skip
GRANULARITY = Flag(
    "--aug-granularity", click.Choice(choices(Granularity)),
    "random draws per image, or one per batch (the paper's reference code)",
)  # fmt: skip
SEED = Flag("--seed", int, SEED_HELP)
THREADS = Flag("--threads", int, THREADS_HELP)

device_option = DEVICE.option(default="auto", show_default=True)
mixing_option = MIXING.option(default="auto", show_default=True)
resize_option = RESIZE.option(default="auto", show_default=True)


def granularity_option(*flags: str):
    """``--aug-granularity`` (and any other ``flags``) into the parameter ``granularity``."""
    names = flags or (GRANULARITY.name,)
    return click.option(*names, "granularity", type=GRANULARITY.type, default="sample",
                        show_default=True, help=GRANULARITY.help)  # fmt: skip


def seed_option(f):
    return SEED.option(default=0, show_default=True)(f)


def threads_option(help_text: str = THREADS_HELP):
    """``--threads``, its default shown (0, which means one per core, at most 8)."""
    return click.option(THREADS.name, default=0, show_default=True, type=int, help=help_text)

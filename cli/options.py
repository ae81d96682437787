"""Click options that several commands share, defined once (same flag, choices and help)."""

from __future__ import annotations

import click

from dalikd.config import Device, Granularity, Mixing, Resize, choices

device_option = click.option(
    "--device", type=click.Choice(choices(Device)), default="auto", show_default=True
)

mixing_option = click.option(
    "--mixing",
    type=click.Choice(choices(Mixing)),
    default="auto",
    show_default=True,
    help="mixing's pixel work: dalikd's fused operator or stock DALI operators (same pixels)",
)

resize_option = click.option(
    "--resize",
    type=click.Choice(choices(Resize)),
    default="auto",
    show_default=True,
    help="antialiased resize: dalikd's CPU operator or DALI's fn.resize (as `dalikd train`)",
)


def granularity_option(*flags: str):
    """``--aug-granularity`` (and any other ``flags``) into the parameter ``granularity``."""
    return click.option(
        *(flags or ("--aug-granularity",)),
        "granularity",
        type=click.Choice(choices(Granularity)),
        default="sample",
        show_default=True,
        help="random draws per image, or one per batch (the paper's reference code)",
    )


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


def seed_option(f):
    return click.option("--seed", default=0, show_default=True, type=int, help=SEED_HELP)(f)


def threads_option(help_text: str = THREADS_HELP):
    """``--threads``, its default shown (0, which means one per core, at most 8)."""
    return click.option("--threads", default=0, show_default=True, type=int, help=help_text)

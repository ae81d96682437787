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

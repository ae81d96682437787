"""`dalikd preview`: a PNG of x and x' for one training batch (a thin adapter)."""

from __future__ import annotations

import click

from dalikd.cli.options import device_option, granularity_option, resize_option, seed_option


@click.command()
@click.option(
    "--data", required=True, type=click.Path(), help="dataset or shard set: its train split"
)
@click.option(
    "--aug",
    required=True,
    help="second-view recipe: a name (see `dalikd pipelines`), a+b, or file.py:function",
)
@click.option("--out", required=True, type=click.Path(), help="the PNG to write, e.g. grid.png")
@click.option("--batch-size", default=8, show_default=True, type=int, help="images in the grid")
@click.option("--image-size", type=int, help="image side in px  [default: the dataset's, else 224]")
@seed_option
@granularity_option("--granularity", "--aug-granularity")
@resize_option
@device_option
def preview(data, aug, out, batch_size, image_size, seed, granularity, resize, device) -> None:
    """Draw x (top) and x' (below) of the first training batch, as `dalikd train` with the same
    --aug, --seed and sizes would see it; mixing recipes are labelled with λ and the partner."""
    from dalikd.cli.report import console
    from dalikd.preview import write_preview

    summary = write_preview(
        data, aug, out, batch_size=batch_size, image_size=image_size, seed=seed,
        granularity=granularity, device=device, resize=resize,
    )  # fmt: skip
    width, height = summary["size"]
    mixing = ", λ and partner under each x'" if summary["lam"] is not None else ""
    console.print(
        f"wrote {summary['path']}: {summary['n']} samples, x and x' ({aug}){mixing}; "
        f"{width}×{height} px",
        soft_wrap=True,
        markup=False,
    )

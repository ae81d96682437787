from dalikd import ops
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "cutout",
    "one square hole (1/4 of the side), uniform centre, filled with the normalization mean",
    torchvision="RandomErasing",
)
def cutout(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. Hole side image_size // 4 px (the paper's 8 at 32,
    16 at 64, 56 at 224), clipped at the borders, filled with ctx.mean rounded to integers."""
    hole = ctx.image_size // 4
    return View(
        ops.cutout(
            images,
            ctx.image_size,
            hole=hole,
            fill=ctx.mean,
            granularity=ctx.granularity,
            seeds=ctx.seeds,
        )
    )

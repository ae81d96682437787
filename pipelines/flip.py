from dalikd import ops
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "flip",
    "horizontal flip of x with probability 0.5",
    torchvision="RandomHorizontalFlip",
)
def flip(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. Mirrored left-right with p = 0.5, per sample or with one
    coin for the batch (ctx.granularity)."""
    return View(ops.flip(images, ctx.granularity, seeds=ctx.seeds))

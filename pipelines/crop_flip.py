from dalikd import ops
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "crop_flip",
    "zero-pad by 1/8 of the side, random crop back to size, then flip (p 0.5)",
    torchvision="RandomCrop+RandomHorizontalFlip",
)
def crop_flip(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. Padding image_size // 8 px: the paper's 4 px at 32,
    8 at 64, 28 at 224."""
    pad = ctx.image_size // 8
    return View(
        ops.crop_flip(images, ctx.image_size, pad=pad, granularity=ctx.granularity, seeds=ctx.seeds)
    )

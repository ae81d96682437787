from dalikd.autoaugment import autoaugment as apply_policy
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "autoaugment",
    "AutoAugment, torchvision's IMAGENET policy (the reference's, ImageNet)",
    torchvision="AutoAugment(IMAGENET)",
)
def autoaugment(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. torchvision's IMAGENET policy and magnitudes
    (translation relative to the side), nearest pixel, fill 0; dalikd.autoaugment."""
    return View(apply_policy(images, "imagenet", ctx.image_size, ctx.granularity, seeds=ctx.seeds))

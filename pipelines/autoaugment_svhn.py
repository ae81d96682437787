from dalikd.autoaugment import autoaugment as apply_policy
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "autoaugment_svhn", "AutoAugment, torchvision's SVHN policy", torchvision="AutoAugment(SVHN)"
)
def autoaugment_svhn(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. torchvision's SVHN policy; dalikd.autoaugment."""
    return View(apply_policy(images, "svhn", ctx.image_size, ctx.granularity, seeds=ctx.seeds))

from dalikd.autoaugment import autoaugment as apply_policy
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "autoaugment_cifar10",
    "AutoAugment, torchvision's CIFAR10 policy (the reference's, CIFAR)",
    torchvision="AutoAugment(CIFAR10)",
)
def autoaugment_cifar10(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. torchvision's CIFAR10 policy; dalikd.autoaugment."""
    return View(apply_policy(images, "cifar10", ctx.image_size, ctx.granularity, seeds=ctx.seeds))

from dalikd import ops
from dalikd.recipes import AugContext, View, recipe


@recipe("autoaugment", "AutoAugment, ImageNet policy (DALI auto_aug), drawn per sample")
def autoaugment(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. One sub-policy per sample whatever ctx.granularity:
    DALI draws the policy inside auto_augment, so a batch-shared draw is not available."""
    return View(ops.autoaugment(images))

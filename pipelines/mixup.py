from dalikd import ops
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "mixup",
    "x' = lam x + (1 - lam) x[perm], lam ~ Beta(1, 1), partner never the sample itself",
    mixing=True,
    torchvision="MixUp",
)
def mixup(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. λ per sample or one per batch (ctx.granularity)."""
    images, lam, perm = ops.mixup(
        images, alpha=1.0, granularity=ctx.granularity, native=ctx.native, seeds=ctx.seeds
    )
    return View(images, lam, perm)

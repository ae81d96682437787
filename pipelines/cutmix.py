from dalikd import ops
from dalikd.recipes import AugContext, View, recipe


@recipe(
    "cutmix",
    "paste a box of the partner x[perm], side ratio sqrt(1 - lam), lam ~ Beta(1, 1)",
    mixing=True,
    torchvision="CutMix",
)
def cutmix(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. λ and box centre per sample or one per batch
    (ctx.granularity); the returned λ is 1 - box area / image area of the clipped box."""
    images, lam, perm = ops.cutmix(
        images, ctx.image_size, alpha=1.0, granularity=ctx.granularity, native=ctx.native,
        seeds=ctx.seeds,
    )  # fmt: skip
    return View(images, lam, perm)

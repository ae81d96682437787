from dalikd import ops
from dalikd.recipes import AugContext, Pool, View, recipe


@recipe(
    "cutmixpick",
    "CutMix k times (own lam, box, partner each; --pool-size k, default 2), then keep the "
    "candidates the teacher is least sure of (--pick-criterion)",
    mixing=True,
    pool=True,
    torchvision="CutMix pool",
)
def cutmixpick(images, ctx: AugContext) -> Pool:
    """images: uint8 HWC on ctx.device. A pool of ctx.pool_size independent CutMix views; the
    torch side scores the k·B candidates and keeps the top ones (dalikd.pick)."""
    pool = ops.cutmix_pool(
        images,
        ctx.image_size,
        ctx.pool_size,
        alpha=1.0,
        granularity=ctx.granularity,
        native=ctx.native,
        seeds=ctx.seeds,
    )  # natively one operator call writes all k candidates (dalikd.native)
    return Pool(tuple(View(mixed, lam, perm) for mixed, lam, perm in pool))

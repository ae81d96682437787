from dalikd import ops
from dalikd.recipes import AugContext, Pool, View, recipe


@recipe(
    "cutmixpick",
    "CutMix k times (own lam, box, partner each; --pool-size k, default 2), then keep the "
    "candidates the teacher is least sure of (--pick-criterion)",
    mixing=True,
)
def cutmixpick(images, ctx: AugContext) -> Pool:
    """images: uint8 HWC on ctx.device. A pool of ctx.pool_size independent CutMix views; the
    torch side scores the k·B candidates and keeps the top ones (dalikd.pick)."""
    views = []
    for _ in range(ctx.pool_size):
        mixed, lam, perm = ops.cutmix(
            images, ctx.image_size, alpha=1.0, granularity=ctx.granularity
        )
        views.append(View(mixed, lam, perm))
    return Pool(tuple(views))

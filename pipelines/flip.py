from nvidia.dali import fn

from dalikd.recipes import AugContext, View, recipe


@recipe("flip", "horizontal flip of x with probability 0.5, drawn per sample")
def flip(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. Each sample is mirrored left-right with p = 0.5."""
    return View(fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5)))

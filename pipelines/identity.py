from dalikd.recipes import AugContext, View, recipe


@recipe(
    "identity",
    "x' = x: a second KD term on the same view (the paper's Identity scheme)",
    torchvision="identity",
)
def identity(images, ctx: AugContext) -> View:
    """images: uint8 HWC on ctx.device. Returns them unchanged."""
    return View(images)

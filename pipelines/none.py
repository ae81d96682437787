from dalikd.recipes import AugContext, recipe


@recipe("none", "plain KD: no second view, loss = 0.1 CE + 0.9 D_T on x only")
def none(images, ctx: AugContext) -> None:
    """No x'. The library treats this name specially: the student sees only x."""
    return None

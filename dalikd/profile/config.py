"""What ``dalikd profile`` measures: its settings and the schemes (``--aug`` values)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dalikd.errors import DalikdError
from dalikd.recipes import Recipe, builtin_recipes, recipe_info, resolve

BASELINES = ("torchvision", "none")
DALI_RESIZE = "DALI's fn.resize"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileConfig:
    data: str  # dataset root with train/<class>/* (val/ is scanned but not read)
    augs: str = "all"  # comma-separated --aug values; "all" = every built-in recipe
    device: str = "auto"  # auto | cpu | gpu
    batch_size: int = 32  # samples per batch, B
    threads: int = 0  # DALI threads = torchvision workers; 0 = one per core, at most 8
    image_size: int | None = None  # px, side of the square images; None: the dataset's, or 224
    mixing: str = "auto"  # auto | native | composed: the mixing recipes' path (data.mixing)
    antialias: bool = True  # as torchvision's RandomResizedCrop; False is a separate, faster mode
    teacher: str = ""  # model name; empty: no teacher stages
    student: str = ""  # model name; empty: no model stages, no KD step
    baseline: str = "torchvision"  # torchvision | none
    pool_size: int = 2  # k, CutMixPick candidates per sample (the paper: 2)
    windows: int = 5  # timed windows per stage; the median is reported
    window_seconds: float = 1.0  # s, minimum length of one timed window (at least one batch)
    warmup: int = 3  # batches run before timing a stage
    seed: int = 0


@dataclass(frozen=True)
class ProfiledAug:
    """One --aug value to profile."""

    name: str
    recipe: Recipe | None  # None: plain KD, no x'
    mixing: bool = False


# -- schemes -------------------------------------------------------------------------------------


def resolve_augs(spec: str) -> list[ProfiledAug]:
    """The schemes to profile; plain KD ("none") always comes first, as the reference.
    ``all`` = every built-in recipe, so new recipes are profiled without a change here."""
    names = [n.strip() for n in spec.split(",")]
    if any(not n for n in names):
        raise DalikdError(f"--aug '{spec}' has an empty item; write e.g. flip,cutmix")
    if "all" in names:
        names = [n for n in names if n != "all"] + list(builtin_recipes())
    schemes = [ProfiledAug("none", None)]
    for name in dict.fromkeys(names):  # keeps order, drops repeats
        recipe = resolve(name)  # unknown names fail here, with the list of known ones
        if recipe is not None:
            schemes.append(ProfiledAug(name, recipe, mixing=recipe_info(recipe).mixing))
    return schemes


@dataclass
class Timing:
    img_per_s: float  # median window, samples/s
    windows: list[float] = field(default_factory=list)  # every window's rate, samples/s
    cpu_ms_per_img: float | None = None  # CPU time per sample over all windows, ms

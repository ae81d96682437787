"""Augmentation recipes: how the second view x' is made from the decoded images.

A recipe is a plain function ``recipe(images, ctx) -> View | None`` over DALI DataNodes,
marked with :func:`recipe` (metadata only). Built-in recipes live one per file in
``dalikd.pipelines`` (the repository's ``pipelines/`` folder) and are found by scanning that
package, so there is no import-time registry to keep in sync. ``--aug`` accepts a recipe name,
a ``+`` composition (per-image recipes first, at most one mixing recipe, last), or
``path/to/file.py:function`` for a user's own recipe.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dalikd.errors import DalikdError

_ATTR = "__dalikd_recipe__"


class Seeds:
    """Where one graph's random operators take their seeds, handed down by the graph builder
    (as DALI's ``auto_aug`` takes ``seed``: randomness is a graph input, never ambient state).

    Each call gives the next draw of its stream ``{"seed": s}``, s from the builder's ``seed``,
    the stream's name and the draw's number: the same draws made in the same order get the same
    seeds however the pixel work is wired (dalikd's fused operator or stock ones), and
    :meth:`stream` gives an independent sequence (the base view's draws do not shift the
    recipe's). ``seed`` None: ``{}``, DALI's automatic seeding.
    """

    def __init__(self, seed: int | None, name: str = "") -> None:
        self.seed, self.name, self.drawn = seed, name, 0

    def __call__(self) -> dict[str, int]:
        if self.seed is None:
            return {}
        # the recipe's stream ("") keeps the entropy [seed, i] of the seeds drawn before streams
        words = [self.seed, self.drawn]
        if self.name:
            words.insert(1, zlib.crc32(self.name.encode()))
        self.drawn += 1
        return {"seed": int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)}

    def stream(self, name: str) -> Seeds:
        """Another sequence of seeds from the same ``seed``, named ``name``."""
        return Seeds(self.seed, f"{self.name}/{name}" if self.name else name)


@dataclass(frozen=True)
class AugContext:
    """What a recipe may use: static facts, its seeds and mixing's path (the graph builder's,
    from the data plan). Nothing random is drawn here: randomness is graph input."""

    image_size: int  # px, side of the square images the recipe receives
    device: str  # "cpu" | "gpu": where the images live
    mean: tuple[float, float, float]  # dataset mean per RGB channel, 0-255 scale
    granularity: str = "sample"  # "sample": draws per image | "batch": one draw for the batch
    pool_size: int = 2  # k: candidates per image a pool recipe (cutmixpick) makes
    seeds: Seeds = field(default_factory=lambda: Seeds(None))  # pass to every dalikd.ops draw
    native: bool = False  # mixing's pixel work through dalikd's fused operator (else stock ops)


@dataclass(frozen=True)
class View:
    """A recipe's output, all per-sample DataNodes of one batch."""

    images: Any  # DataNode: uint8, HWC, image_size x image_size, on ctx.device
    lam: Any = None  # DataNode float32 per sample: fraction of the sample's own pixels
    perm: Any = None  # DataNode int32 per sample: index of the partner in the batch


@dataclass(frozen=True)
class Pool:
    """A candidate pool: k views per image, each with its own random draws. The torch side
    scores all k·B candidates and keeps the best (dalikd.pick); x' is what it keeps."""

    views: tuple[View, ...]


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    description: str  # one line, shown by `dalikd pipelines`
    mixing: bool = False  # mixes samples of the batch (returns lam and perm) or makes a Pool
    pool: bool = False  # returns a Pool of ctx.pool_size views (its x' is the pick of k·B)
    # its torchvision equivalent, the baseline `dalikd profile` times it against (a name
    # dalikd.profile.baseline.torchvision_parts knows); "": none
    torchvision: str = ""


Recipe = Callable[..., "View | Pool | None"]


def recipe(
    name: str, description: str, *, mixing: bool = False, pool: bool = False,
    torchvision: str = "",
) -> Callable[[Recipe], Recipe]:  # fmt: skip
    """Mark a function as a recipe named ``name``; only attaches metadata. ``pool``: it returns
    a :class:`Pool` of ``ctx.pool_size`` views (the data plan counts on that many)."""

    def mark(fn: Recipe) -> Recipe:
        setattr(fn, _ATTR, RecipeInfo(name, description, mixing, pool, torchvision))
        return fn

    return mark


def recipe_info(fn: Recipe) -> RecipeInfo:
    info = getattr(fn, _ATTR, None)
    if info is None:
        return RecipeInfo(getattr(fn, "__name__", "custom"), "user recipe", mixing=False)
    return info


def builtin_recipes() -> dict[str, Recipe]:
    """Name -> recipe for every recipe file shipped in ``dalikd.pipelines``, sorted by name."""
    package = importlib.import_module("dalikd.pipelines")
    found: dict[str, Recipe] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"dalikd.pipelines.{module_info.name}")
        for value in vars(module).values():
            info = getattr(value, _ATTR, None)
            if info is None or value.__module__ != module.__name__:
                continue
            if info.name in found and found[info.name] is not value:
                raise RuntimeError(f"two built-in recipes are named '{info.name}'")
            found[info.name] = value
    return dict(sorted(found.items()))


def _load_file_recipe(spec: str) -> Recipe:
    path_text, _, func_name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DalikdError(f"recipe file not found: {path} (from --aug {spec})")
    module_name = f"dalikd_user_recipe_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    # DALI's AutoGraph reads the source of recipes that use `if`; it needs a registered module.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise DalikdError(f"cannot import {path}: {type(e).__name__}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise DalikdError(
            f"{path} has no function '{func_name}'; it defines: {', '.join(names) or 'nothing'}"
        )
    return fn


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or ".py:" in spec


def parse_aug(spec: str) -> list[str]:
    """The parts of an ``--aug`` value, in order (``autoaugment+cutmix`` -> two): the one
    place an --aug value is split."""
    spec = spec.strip()
    parts = [p.strip() for p in spec.split("+")]
    if any(not p for p in parts):
        raise DalikdError(f"--aug '{spec}' has an empty part; write e.g. autoaugment+cutmix")
    return parts


def source_files(spec: str) -> list[Path]:
    """The files that define the recipes of ``spec`` (their parameters live there): a file
    recipe's file, a built-in's module file; none for ``none``."""
    if spec.strip() == "none":
        return []
    known = builtin_recipes()
    files = []
    for part in parse_aug(spec):
        if _is_file_spec(part):
            path = Path(part.rpartition(":")[0]).expanduser()
        else:
            fn = known.get(part)
            path = Path(fn.__code__.co_filename) if fn is not None else None
        if path is not None and path.is_file():
            files.append(path)
    return files


def _resolve_one(spec: str, known: dict[str, Recipe]) -> Recipe:
    if _is_file_spec(spec):
        if ":" not in spec or spec.endswith(".py"):
            raise DalikdError(f"--aug {spec}: name the function too, as path/to/file.py:function")
        return _load_file_recipe(spec)
    if spec not in known:
        raise DalikdError(f"unknown augmentation '{spec}'; known: {', '.join(known)}")
    return known[spec]


def resolve(spec: str) -> Recipe | None:
    """Turn an ``--aug`` value into one recipe; ``None`` for plain KD (no second view)."""
    spec = spec.strip()
    known = builtin_recipes()
    parts = parse_aug(spec)
    recipes = [_resolve_one(p, known) for p in parts]
    if len(recipes) == 1:
        return None if spec == "none" else recipes[0]
    infos = [recipe_info(r) for r in recipes]
    if "none" in parts:
        raise DalikdError(f"--aug '{spec}': 'none' (no second view) cannot be composed")
    mixing = [i for i, info in enumerate(infos) if info.mixing]
    if len(mixing) > 1:
        names = " and ".join(infos[i].name for i in mixing)
        raise DalikdError(
            f"--aug '{spec}' has two mixing recipes ({names}); at most one is allowed"
        )
    if mixing and mixing[0] != len(recipes) - 1:
        raise DalikdError(
            f"--aug '{spec}': the mixing recipe '{infos[mixing[0]].name}' must come last "
            "(per-image recipes first)"
        )
    return compose(recipes, name=spec)


def compose(recipes: list[Recipe], name: str) -> Recipe:
    """Apply recipes in order, each to the images the previous one made."""

    def composed(images: Any, ctx: AugContext) -> View | Pool:
        view: View | Pool = View(images)
        for r in recipes:
            out = r(view.images, ctx)
            if out is not None:  # a recipe that declines leaves the images as they are
                view = out  # a Pool only comes from the last (mixing) recipe
        return view

    mixing = any(recipe_info(r).mixing for r in recipes)
    pool = recipe_info(recipes[-1]).pool  # a Pool only comes from the last (mixing) recipe
    setattr(composed, _ATTR, RecipeInfo(name, "composition: " + name, mixing, pool))
    return composed


def recipe_error(recipe: Recipe | None, error: Exception) -> DalikdError | None:
    """An exception a recipe raised while its graph was traced, as one line: its own
    ("KeyError: 'b'"), then the innermost frame of the user's code (file, line, function). None
    where no frame is in the recipe's file (not the recipe's mistake)."""
    import inspect
    import traceback

    from nvidia.dali import fn

    if recipe is None:
        return None
    try:
        source = inspect.getsourcefile(inspect.unwrap(recipe))
    except TypeError:
        return None
    # under conditionals the recipe runs converted: its frames are mapped back by AutoGraph
    # (its translated stack is innermost first): outermost first, as a traceback's
    meta = getattr(error, "ag_error_metadata", None)
    if meta is not None:
        frames = [(f.filename, f.lineno, f.function_name) for f in reversed(meta.translated_stack)]
    else:
        frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(error.__traceback__)]
    if not any(f[0] == source for f in frames):
        return None
    library = (str(Path(__file__).parent), str(Path(inspect.getfile(fn)).parents[1]))
    user = [f for f in frames if not f[0].startswith(library) and "autograph" not in f[0]]
    file, line, function = user[-1] if user else next(f for f in frames if f[0] == source)
    own = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1]}"
    return DalikdError(
        f"recipe {recipe_info(recipe).name} raised {own} ({file}, line {line}, in {function})"
    )


def check_output(recipe: Recipe, out: Any, pool_size: int) -> None:
    """A user recipe's mistakes as one line naming it, at trace time (DALI's own errors come
    later, from deep inside the graph)."""
    from nvidia.dali.data_node import DataNode

    name = f"recipe {recipe_info(recipe).name}"
    if not isinstance(out, View | Pool):
        raise DalikdError(f"{name} returned {type(out).__name__}, not a View or a Pool of Views")
    views = len(out.views) if isinstance(out, Pool) else 1
    if views != pool_size:
        raise DalikdError(
            f"{name} returned {views} view(s) per image; the data plan expects {pool_size} "
            "(a recipe that returns a Pool is marked @recipe(..., pool=True) and makes "
            "ctx.pool_size views)"
        )
    for view in out.views if isinstance(out, Pool) else (out,):
        if not isinstance(view, View):
            raise DalikdError(f"{name}: a Pool holds {type(view).__name__}, not a View")
        for part in ("images", "lam", "perm"):
            value = getattr(view, part)
            if not (value is None and part != "images") and not isinstance(value, DataNode):
                raise DalikdError(
                    f"{name}: View.{part} is {type(value).__name__}, not a DALI DataNode"
                )
        if (view.lam is None) != (view.perm is None):
            raise DalikdError(
                f"{name} returns {'lam without perm' if view.perm is None else 'perm without lam'}"
                "; a mixing recipe returns both (the loss needs the partner of each sample)"
            )

"""The CIFAR model zoo: the architectures of the paper's teacher/student pairs, by name
(``cifar:resnet56``), with the reference's state_dict keys and shapes so that the CRD release
checkpoints (``<name>_vanilla/ckpt_epoch_240.pth``) load as they are.

Written here from the definitions in the reference repository's ``models/`` (Good-DA-in-KD,
derived from CRD/RepDistiller); docs/models.md names each one's source and the reference
quirks reproduced on purpose. Each model is a plain ``forward(images) -> logits`` over float32
NCHW images normalized with the dataset's mean/std; none carries a normalization of its own.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dalikd.cifar_models import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from dalikd.cifar_models.base import CifarModel
from dalikd.errors import DalikdError

__all__ = ["ALIASES", "PAPER_PAIRS", "PREFIX", "CifarModel", "ZooModel", "build", "catalogue",
           "identify", "listing", "lookup", "parameter_count"]  # fmt: skip

PREFIX = "cifar:"  # --teacher/--student cifar:NAME

# The paper's CIFAR-100 / Tiny-ImageNet pairs, (teacher, student) (issue 21; PAPER.md §5).
PAPER_PAIRS = (
    ("vgg13", "vgg8"),
    ("vgg13", "MobileNetV2"),
    ("resnet56", "resnet20"),
    ("resnet56", "ShuffleV2"),
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "vgg8"),
    ("resnet32x4", "resnet8x4"),
    ("ResNet50", "vgg8"),
    ("resnet32x4", "ShuffleV2"),
)

# The reference's builder-function names, accepted for the names its model_dict gives them.
ALIASES = (
    ("vgg8_bn", "vgg8"),
    ("vgg11_bn", "vgg11"),
    ("vgg13_bn", "vgg13"),
    ("vgg16_bn", "vgg16"),
    ("vgg19_bn", "vgg19"),
    ("mobile_half", "MobileNetV2"),
    ("mobile_0_25", "MobileNetV2_0_25"),
)

# (this package's module, the reference's file) per family, in listing order.
_FAMILIES = (
    (resnet, "models/resnet.py"),
    (resnetv2, "models/resnetv2.py"),
    (wrn, "models/wrn.py"),
    (vgg, "models/vgg.py"),
    (mobilenetv2, "models/mobilenetv2.py"),
    (shufflenetv1, "models/ShuffleNetv1.py"),
    (shufflenetv2, "models/ShuffleNetv2.py"),
)


@dataclass(frozen=True)
class ZooModel:
    name: str  # as the reference's model_dict spells it, without the cifar: prefix
    family: str  # the module of this package that defines it
    source: str  # the reference repository's file it is written from
    builder: Callable[..., CifarModel]  # called with num_classes=


def catalogue() -> dict[str, ZooModel]:
    """Every model of the zoo by name, in listing order (built afresh: nothing is shared)."""
    zoo = {}
    for module, source in _FAMILIES:
        family = module.__name__.rsplit(".", 1)[1]
        for name, builder in module.variants().items():
            zoo[name] = ZooModel(name, family, source, builder)
    return zoo


def lookup(name: str) -> ZooModel:
    """The zoo's model ``name`` (``cifar:`` optional, an alias allowed); an unknown name fails
    in one line with the close names, or the list where none is close."""
    zoo = catalogue()
    bare = name.removeprefix(PREFIX)
    bare = dict(ALIASES).get(bare, bare)
    if bare in zoo:
        return zoo[bare]
    by_lower = {n.lower(): n for n in zoo}
    close = [by_lower[c] for c in difflib.get_close_matches(bare.lower(), by_lower, n=3)]
    if close:
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}?"
    else:
        hint = f"known: {', '.join(PREFIX + n for n in zoo)}"
    raise DalikdError(f"unknown CIFAR model '{PREFIX}{bare}'; {hint} (dalikd models lists them)")


def build(name: str, num_classes: int) -> CifarModel:
    """The zoo's model ``name`` (``cifar:resnet56`` or ``resnet56``) with ``num_classes``
    outputs, initialized as the reference initializes it."""
    return lookup(name).builder(num_classes=num_classes)


def parameter_count(name: str, num_classes: int = 100) -> int:
    """Parameters of ``name`` at ``num_classes``; counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = build(name, num_classes)
    return sum(p.numel() for p in model.parameters())


def listing(num_classes: int = 100) -> list[dict[str, Any]]:
    """One row per model: its ``cifar:`` name, family, reference file, parameter count at
    ``num_classes``, and the paper's pairs it is the teacher or the student of."""
    rows = []
    for name, entry in catalogue().items():
        rows.append({
            "name": PREFIX + name,
            "family": entry.family,
            "source": entry.source,
            "params": parameter_count(name, num_classes),
            "teacher_of": [PREFIX + s for t, s in PAPER_PAIRS if t == name],
            "student_of": [PREFIX + t for t, s in PAPER_PAIRS if s == name],
        })  # fmt: skip
    return rows


def _same_architecture(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """``state`` has ``model``'s keys and shapes, but for its classifier's output count."""
    own = model.state_dict()
    if own.keys() != state.keys():
        return False
    head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    for key, tensor in own.items():
        mine, theirs = tuple(tensor.shape), tuple(state[key].shape)
        if mine != theirs and (key.rsplit(".", 1)[0] != head or mine[1:] != theirs[1:]):
            return False
    return True


def identify(state: dict[str, torch.Tensor]) -> str | None:
    """The ``cifar:`` name of the zoo's model whose keys and shapes ``state`` has (at any class
    count), or None. Builds each model on the meta device (about a second of CPU in all): for
    an error message, not for a loop."""
    for name, entry in catalogue().items():
        with torch.device("meta"):
            model = entry.builder(num_classes=1)
        if _same_architecture(model, state):
            return PREFIX + name
    return None

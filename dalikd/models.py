"""Models by name: a torchvision builder name, ``timm:NAME`` (timm installed), ``cifar:NAME``
(the CIFAR models of the paper's pairs, :mod:`dalikd.cifar_models`), or ``module:function`` for
a user's own.

Weights come from a local file (a plain state_dict, a dalikd checkpoint, or a CRD/RepDistiller
checkpoint such as ``resnet56_vanilla/ckpt_epoch_240.pth``: a dict whose ``"model"`` is the
state_dict), a torchvision weights name such as ``IMAGENET1K_V1`` (torchvision downloads it), or
a timm name with a pretrained tag such as ``timm:resnet50.a1_in1k`` (timm downloads it).

Each model sees its own input normalization (:func:`input_norm`): a timm model its pretrained
config's mean/std, a ``cifar:`` model (which has none of its own, :func:`own_norm` None) the
data's, the others ImageNet's; a student gets the data's wherever the data sets one
(:func:`student_norm`); a teacher fed the student's inputs maps them to its own on the device
(:func:`adapt_input`).
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from dalikd import cifar_models
from dalikd.batch import IMAGENET_NORM, InputNorm
from dalikd.config import TIMM_PREFIX, timm_pretrained
from dalikd.errors import DalikdError


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise DalikdError("timm: models need timm: pip install 'dalikd[timm]'") from None
    return timm


def _timm_model(name: str, num_classes: int, pretrained: bool, role: str) -> nn.Module:
    """``timm:ARCH[.TAG]`` with ``num_classes`` outputs; the tag's weights when ``pretrained``."""
    timm = _timm()
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise DalikdError(f"unknown timm model '{arch}'{hint}")
    if pretrained:
        classes = timm.models.get_pretrained_cfg(arch).num_classes
        if role == "teacher" and classes != num_classes:
            raise DalikdError(
                f"{name} predicts {classes} classes but the dataset has {num_classes}: a teacher "
                "needs weights for the dataset's classes (--teacher-weights FILE)"
            )
    try:  # a student's classifier is new where the classes differ (fine-tuning)
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except Exception as e:  # no network, no such tag file, ...
        raise DalikdError(f"cannot build {name}: {str(e).splitlines()[0]}") from None


def own_norm(model: nn.Module) -> InputNorm | None:
    """The normalization ``model`` itself expects its uint8 images turned into: a timm model's
    pretrained-config mean/std, an :func:`adapt_input` wrapper's input one, None for a model
    with none of its own (a ``cifar:`` model: it takes the data's normalization), else
    ImageNet's (torchvision's and a user's models). Looks through DDP (``.module``) and
    torch.compile (``._orig_mod``)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, AdaptInput):
        return model.takes
    if isinstance(model, cifar_models.CifarModel):
        return None
    cfg = getattr(model, "pretrained_cfg", None)  # timm sets it on every model it builds
    if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
        mean, std = (tuple(255.0 * float(v) for v in cfg[k]) for k in ("mean", "std"))
        if len(mean) == 3 and len(std) == 3:
            return InputNorm(mean, std)  # type: ignore[arg-type]
    return IMAGENET_NORM


def input_norm(model: nn.Module, data_norm: InputNorm | None = None) -> InputNorm:
    """The normalization ``model``'s inputs get: its own (:func:`own_norm`), else the data's
    (``data_norm``; ImageNet's where the data sets none)."""
    own = own_norm(model)
    return (data_norm or IMAGENET_NORM) if own is None else own


def student_norm(model: nn.Module, data_norm: InputNorm | None) -> InputNorm:
    """The normalization a student's inputs get: the data's where it sets one (the student is
    trained here, on the data's statistics), else the model's own (:func:`input_norm`). A
    teacher, whose pretrained weights fix its input, gets :func:`input_norm` instead: its own
    where it has one, else the data's."""
    return data_norm if data_norm is not None else input_norm(model)


class AdaptInput(nn.Module):
    """``model`` fed images normalized for another model (``takes``): each channel is mapped
    to the model's own normalization first, on the device. For uint8 ``u``,
    ``(u - m_own) / s_own = x * (s_in / s_own) + (m_in - m_own) / s_own`` with
    ``x = (u - m_in) / s_in``: within float32 rounding of normalizing ``u`` directly."""

    def __init__(self, model: nn.Module, takes: InputNorm, own: InputNorm) -> None:
        super().__init__()
        self.model = model
        self.takes = takes
        s_in, m_in = torch.tensor(takes.std, dtype=torch.float64), torch.tensor(takes.mean)
        s_own, m_own = torch.tensor(own.std, dtype=torch.float64), torch.tensor(own.mean)
        scale, shift = s_in / s_own, (m_in.double() - m_own.double()) / s_own
        self.register_buffer("scale", scale.float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.float().view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.addcmul(self.shift, x, self.scale))


def adapt_input(
    model: nn.Module, takes: InputNorm, data_norm: InputNorm | None = None
) -> nn.Module:
    """``model`` taking inputs normalized with ``takes``: itself when that is its normalization
    (:func:`input_norm` with ``data_norm``), else wrapped in :class:`AdaptInput` (kept in
    ``model``'s train/eval mode)."""
    own = input_norm(model, data_norm)
    if own == takes:
        return model
    return AdaptInput(model, takes, own).train(model.training)


def _builder(name: str):
    if name.startswith(cifar_models.PREFIX):  # before module:function: cifar is no module here
        return cifar_models.lookup(name).builder
    if name.startswith(TIMM_PREFIX):
        return lambda num_classes: _timm_model(name, num_classes, pretrained=False, role="model")
    if ":" in name:
        module_name, _, fn_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise DalikdError(f"model '{name}': cannot import {module_name} ({e})") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise DalikdError(f"model '{name}': {module_name} has no function {fn_name}")
        return fn
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DalikdError(
            f"unknown model '{name}' (not a torchvision classification model){hint} "
            "Use a name from torchvision.models.list_models(), cifar:NAME (dalikd models) or "
            "module:function"
        )
    return lambda num_classes: torchvision.models.get_model(name, num_classes=num_classes)


def classifier_size(model: nn.Module) -> tuple[str, int]:
    """(parameter name, output count) of the model's last Linear layer, its classifier."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (f"{module_name}.weight", module.out_features)
    if last is None:
        raise DalikdError(f"{type(model).__name__} has no Linear classifier dalikd can check")
    return last


def _is_torchvision_weights(name: str, weights: str) -> bool:
    return ":" not in name and not Path(weights).suffix and not Path(weights).exists()


def _torchvision_weights(name: str, weights: str, num_classes: int) -> nn.Module:
    try:
        enum = torchvision.models.get_model_weights(name)
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        raise DalikdError(
            f"weights '{weights}' not found: not a file, nor a torchvision weights name for {name}"
        ) from None
    classes = len(w.meta["categories"])
    if classes != num_classes:
        raise DalikdError(
            f"{name} {weights} predicts {classes} classes but the dataset has {num_classes}"
        )
    return torchvision.models.get_model(name, weights=w)


def _read_weights(path: Path, mmap: bool = False) -> Any:
    """What ``torch.load(weights_only=True)`` reads from ``path``; one-line errors (an empty
    file's EOFError has no message; torch's own advises loading unsafely instead). ``mmap``:
    tensors mapped, not read (to look at a key of a large file), where the format allows."""
    if not path.is_file():
        raise DalikdError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise DalikdError(f"weights file {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # a pickle of another protocol: the line below says it
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # not a zip file
    except OSError as e:
        raise DalikdError(f"cannot read weights file {path}: {e.strerror or e}") from None
    except Exception:  # garbage, a truncated file, pickled objects other than tensors
        raise DalikdError(
            f"{path} is not a weights file torch can load safely (a state_dict or a dalikd "
            "checkpoint of tensors)"
        ) from None


def checkpoint_classes(weights: str | Path) -> tuple[str, ...] | None:
    """The class names a dalikd checkpoint was trained on; None for a torchvision weights name
    or a file that does not carry them (a plain state_dict)."""
    path = Path(weights)
    if not str(weights) or not path.is_file():
        return None
    state = _read_weights(path, mmap=True)  # the weights are read once, where they are used
    classes = state.get("classes") if isinstance(state, dict) else None
    if isinstance(classes, list | tuple) and all(isinstance(c, str) for c in classes):
        return tuple(classes)
    return None


def check_classes(
    known: tuple[str, ...] | None, found: tuple[str, ...], what: str, subset: bool = False
) -> None:
    """Refuse in one line where the class names ``known`` (a checkpoint's) and ``found`` (the
    dataset's) differ: the same count with other names maps every output to the wrong class.
    ``subset``: ``found`` may lack some of ``known`` (a val/ split without train/)."""
    if known is None:
        return
    only_ckpt = [c for c in known if c not in found]
    only_data = [c for c in found if c not in known]
    if only_data or (only_ckpt and not subset):

        def some(names: list[str]) -> str:
            return f"{len(names)} (e.g. {', '.join(names[:3])})" if names else "0"

        raise DalikdError(
            f"{what} were trained on other classes than the dataset's: only in the checkpoint "
            f"{some(only_ckpt)}, only in the dataset {some(only_data)}"
        )


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a weights file: a state_dict, or the 'model' of a checkpoint (a
    dalikd one, or a CRD/RepDistiller one: ``{"model": state_dict, "epoch": ..., ...}``).

    Prefixes added by DDP or DataParallel ('module.') and torch.compile ('_orig_mod.') are
    removed.
    """
    path = Path(path)
    state = _read_weights(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DalikdError(
            f"{path} is neither a state_dict nor a checkpoint with one under 'model' (dalikd's, "
            "CRD's)"
        )
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def check_shapes(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """One line naming the first tensor of ``state`` whose shape is not the model's (PyTorch's
    own message is a multi-line traceback listing every one)."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise DalikdError(
                f"{what}: {key} has shape {tuple(tensor.shape)} in the file, "
                f"{tuple(own[key].shape)} in the model"
            )


def build_model(name: str, num_classes: int, weights: str = "", role: str = "model") -> nn.Module:
    """Build ``name`` with ``num_classes`` outputs and load ``weights`` if given.

    A weights file or name whose classifier size is not ``num_classes`` is refused. A timm
    name with a pretrained tag and no weights file loads the tag's weights.
    """
    if not weights and timm_pretrained(name):
        return _timm_model(name, num_classes, pretrained=True, role=role)
    if weights and _is_torchvision_weights(name, weights):
        _builder(name)  # unknown names fail with the list hint first
        return _torchvision_weights(name, weights, num_classes)
    try:
        model = _builder(name)(num_classes=num_classes)
    except TypeError as e:  # e.g. os:getcwd, a function that is not a model builder
        raise DalikdError(
            f"model '{name}' cannot be built as {name}(num_classes={num_classes}): {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise DalikdError(
            f"model '{name}' did not return a torch.nn.Module (got {type(model).__name__})"
        )
    if weights:
        _load_weights(model, name, weights, num_classes, role)
    return model


def _load_weights(model: nn.Module, name: str, weights: str, num_classes: int, role: str) -> None:
    """``weights`` (a file) into ``model``; one line naming the first mismatch otherwise."""
    state = load_state(weights)
    key, _ = classifier_size(model)
    if key in state and state[key].shape[0] != num_classes:
        raise DalikdError(
            f"{role} weights {weights} predict {state[key].shape[0]} classes "
            f"but the dataset has {num_classes}"
        )
    what = f"{role} weights {weights} do not fit {name}"
    try:
        check_shapes(model, state, what)
        # strict=False: BatchNorm fills in a num_batches_tracked that files of torch < 0.4.1 lack
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            parts = [
                f"{len(keys)} {kind} key{'s' if len(keys) > 1 else ''} (e.g. {keys[0]})"
                for kind, keys in (("missing", result.missing_keys),
                                   ("unexpected", result.unexpected_keys))
                if keys
            ]  # fmt: skip
            raise DalikdError(f"{what}: {', '.join(parts)}")
    except DalikdError as e:
        fits = cifar_models.identify(state) if name.startswith(cifar_models.PREFIX) else None
        if fits:  # the usual slip: another zoo model's checkpoint (CRD names them by folder)
            raise DalikdError(f"{e}; the file's keys and shapes are {fits}'s") from None
        raise

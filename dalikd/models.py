"""Models by name: a torchvision builder name, or ``module:function`` for a user's own.

No model zoo is vendored. Weights come from a local file (a plain state_dict or a dalikd
checkpoint) or a torchvision weights name such as ``IMAGENET1K_V1`` (torchvision downloads it).
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

import torch
import torchvision
from torch import nn

from dalikd.errors import DalikdError


def _builder(name: str):
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
            "Use a name from torchvision.models.list_models() or module:function"
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


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a weights file: a state_dict, or the 'model' of a dalikd checkpoint.

    Prefixes added by DDP ('module.') and torch.compile ('_orig_mod.') are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise DalikdError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DalikdError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DalikdError(f"{path} is neither a state_dict nor a dalikd checkpoint")
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

    A weights file or name whose classifier size is not ``num_classes`` is refused.
    """
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
    if not weights:
        return model
    state = load_state(weights)
    key, _ = classifier_size(model)
    if key in state and state[key].shape[0] != num_classes:
        raise DalikdError(
            f"{role} weights {weights} predict {state[key].shape[0]} classes "
            f"but the dataset has {num_classes}"
        )
    check_shapes(model, state, f"{role} weights {weights} do not fit {name}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DalikdError(
            f"{role} weights {weights} do not fit {name}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:1]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:1]})"
        )
    return model

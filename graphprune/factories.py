"""Constructors a saved model's record may name, other than timm's: torchvision models and user factories.

A record (``graphprune.json``) written by :func:`graphprune.io.save` says how to rebuild the
unpruned base. For a model timm cannot build it names a **factory**, ``"module:function"``,
called with the record's JSON kwargs; the saved plans are then replayed on the result.

Loading a file must not run code its author chose, so a factory is only imported when:

* it is a torchvision model builder, ``"torchvision.models:NAME"`` with ``NAME`` in
  ``torchvision.models.list_models()``, called with ``weights=None`` (nothing downloaded); or
* the caller allowed it by its exact name, ``graphprune.io.load(path, allow_factories=[...])``
  (the factory that :func:`graphprune.io.save` was given is allowed when saving).

Anything else is refused before any import. Keyword arguments that name weights or files
(``weights``, ``pretrained``, ``checkpoint_path``, ...) are refused in a record: the saved
safetensors file holds the weights.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .errors import InvalidArgumentError

TORCHVISION = "torchvision.models"
_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
REFUSED_KWARGS = frozenset({"weights", "weights_backbone", "pretrained", "pretrained_backbone", "pretrained_cfg",
                            "pretrained_cfg_overlay", "checkpoint", "checkpoint_path", "cache_dir", "progress"})


def check_name(name: object) -> str:
    """``name`` if it reads ``"package.module:function"``, else an error saying so.

    Example:
        >>> check_name("torchvision.models:resnet18")
        'torchvision.models:resnet18'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(f'a factory is named "package.module:function", e.g. '
                                   f'"torchvision.models:resnet18"; got {name!r}')
    return name


def check_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse keyword arguments that would make a factory read weights or files.

    Example:
        >>> check_kwargs({"num_classes": 10})
    """
    refused = sorted(set(kwargs) & REFUSED_KWARGS)
    if refused:
        raise InvalidArgumentError(f"factory kwargs may not contain {refused}: the base is always built without "
                                   "weights, and only the saved weights are loaded")


def _torchvision_builder(function: str) -> Callable[..., nn.Module]:
    import difflib

    import torchvision.models

    known = torchvision.models.list_models()
    if function not in known:
        close = difflib.get_close_matches(function, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see torchvision.models.list_models())"
        raise InvalidArgumentError(f"{function!r} is not a torchvision model{hint}")
    builder = torchvision.models.get_model_builder(function)
    parameters = inspect.signature(builder).parameters
    no_weights = {k: None for k in ("weights", "weights_backbone") if k in parameters}

    def build(**kwargs: Any) -> nn.Module:
        return builder(**no_weights, **kwargs)

    return build


def resolve(name: str, *, allowed: Iterable[str] = ()) -> Callable[..., nn.Module]:
    """The constructor ``name`` stands for, if it may be imported.

    Args:
        name: ``"module:function"``.
        allowed: exact factory names the caller trusts, beyond torchvision's builders.

    Raises:
        InvalidArgumentError: a malformed or unknown name, or one that is not allowed
            (nothing was imported).

    Example:
        >>> resolve("torchvision.models:resnet18")(num_classes=3).fc.out_features
        3
    """
    module_name, _, function = check_name(name).partition(":")
    if module_name == TORCHVISION:
        return _torchvision_builder(function)
    allowed = {check_name(a) for a in allowed}
    if name not in allowed:
        raise InvalidArgumentError(
            f"the record names factory {name!r}, which is not allowed: loading never imports code the file chose. "
            f"If you trust it, pass allow_factories=[{name!r}] to graphprune.io.load")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InvalidArgumentError(f"cannot import {module_name!r} for factory {name!r}: {error}") from error
    factory = getattr(module, function, None)
    if not callable(factory):
        raise InvalidArgumentError(f"{module_name} has no callable {function!r} (factory {name!r})")
    return factory

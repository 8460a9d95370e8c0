"""How to build a saved model's unpruned base: the :class:`Architecture` record, read from a timm
model (:func:`infer_architecture`) or given, and :func:`build_model`, which creates it (timm with
``pretrained=False``, or a factory of :mod:`graphprune.factories`) and re-applies plans.

A record comes from a file, so :meth:`Architecture.from_dict` refuses kwargs that would read
files or choose where the model is built, and :func:`build_model` turns whatever a constructor
raises on the kwargs into :class:`~graphprune.io_record.ModelFileError`; with ``max_numel`` it
counts the tensor elements the constructor creates (:class:`~graphprune.io_replay.AllocationLimit`).
"""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import io_replay
from .errors import InvalidArgumentError
from .groups import classifier_names
from .io_record import ModelFileError
from .removal import apply_plan_

Edit = Any  # a channel Plan, a graphprune.blocks.BlockPlan or a KernelPlan: one entry of the structural history

ARCHITECTURE_ATTR = "graphprune_architecture"  # set by load(); save() reuses it
# timm.create_model arguments that would read weights or configs from files or the hub (maybe a pickle)
_FILE_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                          "pruned"})  # pruned=True: timm reads a channel file of its own
# timm.create_model arguments a record may not choose: where and in which precision the model is built
_PLACEMENT_KWARGS = frozenset({"device", "dtype"})
@dataclass(frozen=True)
class Architecture:
    """How to build the unpruned base model: a timm name, or a factory (:mod:`graphprune.factories`).

    Attributes:
        timm: a timm model name, e.g. ``"resnet18"``; ``None`` when ``factory`` builds it.
        kwargs: keyword arguments for ``timm.create_model`` or the factory (JSON values only).
        input_size: ``(C, H, W)`` the model is meant for, or ``None`` for timm's default.
        factory: instead of ``timm``: ``"module:function"``, e.g. ``"torchvision.models:resnet18"``.
    """

    timm: str | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None
    factory: str | None = None

    @property
    def name(self) -> str:
        """What builds the base, for messages: ``timm resnet18`` or ``torchvision.models:resnet18``."""
        return f"timm {self.timm}" if self.timm is not None else str(self.factory)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, the form :func:`save` takes as ``architecture=``.

        Example:
            >>> Architecture("resnet18", {"num_classes": 10}).to_dict()
            {'timm': 'resnet18', 'kwargs': {'num_classes': 10}}
        """
        out: dict[str, Any] = ({"timm": self.timm} if self.timm is not None else {"factory": self.factory})
        out["kwargs"] = dict(self.kwargs)
        if self.input_size is not None:
            out["input_size"] = list(self.input_size)
        return out

    @staticmethod
    def from_dict(data: object) -> Architecture:
        """Validate ``{"timm": name | "factory": "module:function", "kwargs": {...}, "input_size": [C, H, W]}``.

        Example:
            >>> Architecture.from_dict({"timm": "resnet18"}).kwargs
            {}
            >>> Architecture.from_dict({"factory": "torchvision.models:resnet18"}).name
            'torchvision.models:resnet18'
        """
        from . import factories

        named = [k for k in ("timm", "factory") if isinstance(data, Mapping) and k in data]
        if len(named) != 1 or (named == ["timm"] and (not isinstance(data["timm"], str) or not data["timm"])):
            raise InvalidArgumentError(f'architecture must look like {{"timm": "resnet18", "kwargs": {{...}}}} or '
                                       f'{{"factory": "torchvision.models:resnet18", "kwargs": {{...}}}}, got {data!r}')
        unknown = sorted(set(data) - {"timm", "factory", "kwargs", "input_size"})
        if unknown:
            raise InvalidArgumentError(f"architecture has unknown keys {unknown}; known: timm or factory, kwargs, "
                                       "input_size")
        factory = factories.check_name(data["factory"]) if named == ["factory"] else None
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise InvalidArgumentError(f"architecture kwargs must be a dict with string keys, got {kwargs!r}")
        refused = sorted(set(kwargs) & _FILE_KWARGS)
        if refused:
            raise InvalidArgumentError(f"architecture kwargs may not contain {refused}: the base is always built "
                                       "with pretrained=False from no file, and only the saved weights are loaded")
        placed = sorted(set(kwargs) & _PLACEMENT_KWARGS)
        if placed:
            raise InvalidArgumentError(f"architecture kwargs may not contain {placed}: the model is built on the CPU "
                                       "in float32, then given the saved dtypes; move it yourself after loading")
        if factory is not None:
            factories.check_kwargs(kwargs)
        try:
            kwargs = json.loads(json.dumps(dict(kwargs), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise InvalidArgumentError(f"architecture kwargs must be JSON values: {error}") from error
        size = data.get("input_size")
        if size is not None:
            if (not isinstance(size, (list, tuple)) or not size
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
                raise InvalidArgumentError(f"architecture input_size must be positive ints, got {size!r}")
            size = tuple(size)
        return Architecture(data.get("timm"), kwargs, size, factory)


def infer_architecture(model: nn.Module) -> Architecture:
    """Read a timm model's recipe: ``pretrained_cfg["architecture"]`` plus the shape-changing kwargs.

    Recorded are ``num_classes`` (from the classifier module, so a replaced head counts),
    ``in_chans`` and ``img_size`` when they differ from the pretrained config. Anything else
    that changes tensor shapes must be passed as ``save(..., architecture=...)``; :func:`save`
    verifies the recipe and says so when it does not rebuild the model.

    Raises:
        InvalidArgumentError: the model is not a timm model.

    Example:
        >>> import timm
        >>> infer_architecture(timm.create_model("resnet18", pretrained=False, num_classes=10)).to_dict()
        {'timm': 'resnet18', 'kwargs': {'num_classes': 10}}
    """
    recorded = getattr(model, ARCHITECTURE_ATTR, None)
    if recorded is not None:
        return Architecture.from_dict(recorded)
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    if not name:
        raise InvalidArgumentError(
            f"{type(model).__name__} is not a timm model (no pretrained_cfg['architecture']), so graphprune cannot "
            'record how to rebuild it; name what built it, e.g. factory="torchvision.models:resnet18" (kwargs with '
            'architecture={"factory": ..., "kwargs": {...}}), or pass architecture={"timm": name, "kwargs": {...}}')
    kwargs: dict[str, Any] = {}
    num_classes = _num_classes(model)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    default_size = tuple(cfg.get("input_size") or ())
    input_size = None
    first_conv = cfg.get("first_conv")
    with contextlib.suppress(AttributeError, TypeError):
        in_chans = model.get_submodule(first_conv).in_channels
        if default_size and in_chans != default_size[0]:
            kwargs["in_chans"] = in_chans
            input_size = (in_chans, *default_size[1:])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and default_size and tuple(img_size) != tuple(default_size[1:]):
        height, width = (int(s) for s in img_size)
        kwargs["img_size"] = height if height == width else [height, width]
        input_size = (kwargs.get("in_chans", default_size[0]), height, width)
    return Architecture(name, kwargs, input_size)


def _num_classes(model: nn.Module) -> int | None:
    for name in classifier_names(model):
        head = model.get_submodule(name)
        if isinstance(head, nn.Linear):
            return head.out_features
        if isinstance(head, nn.modules.conv._ConvNd):
            return head.out_channels
        if isinstance(head, nn.Identity):
            return 0
    value = getattr(model, "num_classes", None)
    return value if isinstance(value, int) else None


def _constructor(architecture: Architecture, allow_factories: Iterable[str]) -> Callable[..., nn.Module]:
    """What builds the base: ``timm.create_model(name, pretrained=False, ...)`` or an allowed factory."""
    if architecture.factory is not None:
        from . import factories

        try:
            return factories.resolve(architecture.factory, allowed=allow_factories)
        except InvalidArgumentError as error:
            raise ModelFileError(str(error)) from error
    import timm

    if not timm.is_model(architecture.timm):
        close = difflib.get_close_matches(architecture.timm, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ModelFileError(f"unknown timm architecture {architecture.timm!r}{hint}")
    return lambda **kwargs: timm.create_model(architecture.timm, pretrained=False, **kwargs)


def build_model(architecture: Architecture, plans: tuple[Edit, ...] = (), *, device: str = "cpu",
                allow_factories: Iterable[str] = (), max_numel: int | None = None) -> nn.Module:
    """Create the base (``pretrained=False``, or the factory without weights) and re-apply ``plans`` in order.

    Args:
        architecture: the recipe.
        plans: plans to re-apply, oldest first (no tracing).
        device: ``"meta"`` builds shapes only (falls back to CPU for models that cannot).
        allow_factories: factory names that may be imported besides torchvision's builders
            (:func:`graphprune.factories.resolve`).
        max_numel: with ``device="meta"``, the most tensor elements the constructor may create,
            on the meta device or in the CPU fallback (:class:`~graphprune.io_replay.AllocationLimit`);
            ``None``: no bound.

    Raises:
        ModelFileError: unknown architecture or factory, one not allowed, kwargs the
            constructor refuses (whatever it raises), or a plan that does not fit.

    Example:
        >>> build_model(Architecture("resnet18", {"num_classes": 3}), device="meta").fc.out_features
        3
    """
    make = _constructor(architecture, allow_factories)
    kwargs = dict(architecture.kwargs)

    def limit() -> contextlib.AbstractContextManager:
        # counted on the meta device too: a kwarg like depth=10**9 would otherwise build modules forever
        return io_replay.AllocationLimit(max_numel) if max_numel is not None else contextlib.nullcontext()

    try:
        if device == "meta":
            try:
                with torch.device("meta"), limit():
                    model = make(**kwargs)
            except (RuntimeError, NotImplementedError):  # an __init__ that reads tensor values
                with limit():
                    model = make(**kwargs)
        else:
            model = make(**kwargs)
    except ModelFileError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a constructor raises on kwargs from a file is bad input
        raise ModelFileError(f"cannot create {architecture.name} with kwargs {short_repr(kwargs)}: "
                             f"{type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{architecture.name} returned a {type(model).__name__}, not an nn.Module")
    from .blocks import BlockPlan, apply_block_plan_
    from .sparsity.kernel_plan import KernelPlan, apply_kernel_plan_

    for number, plan in enumerate(plans, start=1):
        try:
            with torch.device("meta") if device == "meta" else contextlib.nullcontext():  # proxies: shapes only
                if isinstance(plan, BlockPlan):
                    apply_block_plan_(model, plan, record=False)
                elif isinstance(plan, KernelPlan):
                    apply_kernel_plan_(model, plan)
                else:
                    apply_plan_(model, plan)
        except InvalidArgumentError as error:
            raise ModelFileError(f"plan {number} of {len(plans)} does not fit a fresh {architecture.name} "
                                 f"{short_repr(kwargs)}: {error}") from error
    return model


def short_repr(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

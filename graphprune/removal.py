"""The one removal pass: apply a :class:`~graphprune.plan.Plan` to a model in place.

Every parameter and buffer slice named by the plan is cut with ``index_select``; tied
tensors stay tied; ``requires_grad`` is kept; module attributes that describe shapes
(``in_channels``, ``out_features``, ``num_features``, ``normalized_shape``, ``groups``,
and the attributes the plan patches, such as ``num_heads``) are updated to match, and so
is the timm contract (``num_features``, the head's ``in_features``, ``feature_info``;
:mod:`graphprune.timm_contract`). A channels-last tensor stays channels-last. If
anything fails the model is restored before the error propagates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from . import removal_layers, timm_contract
from .errors import InvalidArgumentError
from .graph import model_fingerprint
from .plan import Plan


def _owner(model: nn.Module, name: str, modules: dict[str, nn.Module] | None = None) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    module = modules.get(module_name) if modules is not None else None
    if module is None:
        try:
            module = model.get_submodule(module_name)
        except AttributeError as error:
            raise InvalidArgumentError(f"the plan names {name!r}, but the model has no module {module_name!r}") from error
    if attr not in module._parameters and attr not in module._buffers:
        raise InvalidArgumentError(f"the plan names {name!r}, but {module_name or 'the model'} has no such tensor")
    return module, attr


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict, dict]]:
    return [(m, dict(m._parameters), dict(m._buffers),
             {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in model.modules()]


@contextlib.contextmanager
def restore_on_error(model: nn.Module) -> Iterator[None]:
    """Put every parameter, buffer and plain attribute back if the block raises.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> try:
        ...     with restore_on_error(m):
        ...         m.in_features = 5
        ...         raise RuntimeError
        ... except RuntimeError:
        ...     pass
        >>> m.in_features
        2
    """
    saved = _snapshot(model)
    try:
        yield
    except BaseException:
        for module, params, buffers, attrs in saved:
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            for key in [k for k in vars(module) if not k.startswith("_") and k not in attrs]:
                delattr(module, key)
            module.__dict__.update(attrs)
            removal_layers.refresh_(module)  # an RNN's _flat_weights hold the tensors themselves
        raise


def _validate(model: nn.Module, plan: Plan, modules: dict[str, nn.Module]) -> None:
    if plan.model is not None:
        found = model_fingerprint(model)
        if found != plan.model:
            raise InvalidArgumentError(
                f"the plan was made for a model with other parameters (parameter names sha256 {plan.model[:12]}..., "
                f"this {type(model).__name__} with {len(list(model.parameters()))} parameters has {found[:12]}...); "
                "a plan applies only to the architecture it was made for, in the state it was made in")
    for edit in plan.edits:
        module, attr = _owner(model, edit.name, modules)
        tensor = getattr(module, attr)
        if tensor is None or edit.dim >= tensor.dim() or tensor.shape[edit.dim] != edit.size:
            shape = None if tensor is None else tuple(tensor.shape)
            raise InvalidArgumentError(
                f"the plan expects {edit.name} to have size {edit.size} in dim {edit.dim}, but its shape is {shape}; "
                "was the plan made for another model, or already applied?")
        if not edit.keep or edit.keep[-1] >= edit.size:
            raise InvalidArgumentError(f"the plan keeps invalid indices of {edit.name}")


def _update_shape_attributes(module: nn.Module, old_shapes: dict[str, torch.Size]) -> None:
    """Make a standard layer's size attributes agree with its new parameter shapes."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        # ``groups`` was set by the plan's patches; derive the channel counts from it
        if module.transposed:
            module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
        else:
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = weight if weight is not None else module.running_mean
        if ref is not None:
            module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        if module.num_groups == module.num_channels:
            module.num_groups = weight.shape[0]
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.Embedding) and weight is not None:
        module.num_embeddings, module.embedding_dim = weight.shape
    if hasattr(module, "normalized_shape") and isinstance(weight, torch.Tensor):
        module.normalized_shape = tuple(weight.shape)
    removal_layers.update_sizes_(module)  # nn.MultiheadAttention, nn.LSTM / GRU / RNN


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """The layout to give a cut copy of ``tensor``: channels-last stays channels-last."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if tensor.dim() == 5 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def apply_plan_(model: nn.Module, plan: Plan) -> nn.Module:
    """Remove the plan's channels from ``model`` in place (trailing underscore: mutates).

    Args:
        model: the model the plan was made for (or a fresh copy of the same architecture).
        plan: from :func:`graphprune.make_plan` or :meth:`Plan.from_json`.

    Returns:
        ``model``, pruned. It trains and evaluates like any module; make a new optimizer.

    Raises:
        InvalidArgumentError: if the plan does not fit the model; the model is unchanged.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
        >>> _ = gp.apply_plan_(net, gp.make_plan(groups, removed={groups[0].id: (0, 1, 2)}))
        >>> net[0].out_features, net[2].in_features
        (5, 5)
    """
    with restore_on_error(model):
        apply_unguarded_(model, plan)
    return model


def apply_unguarded_(model: nn.Module, plan: Plan) -> None:
    """:func:`apply_plan_` without restoring the model on error: for callers that already
    hold a :func:`restore_on_error` block (one snapshot instead of two)."""
    modules = dict(model.named_modules())
    _validate(model, plan, modules)
    witnesses = timm_contract.find_witnesses(model)  # before any cut: tie timm's widths to tensor dims
    replaced: dict[int, torch.Tensor] = {}
    old_shapes: dict[nn.Module, dict[str, torch.Size]] = {}
    current: dict[str, torch.Tensor] = {}
    for edit in plan.edits:
        module, attr = _owner(model, edit.name, modules)
        tensor = current.get(edit.name, getattr(module, attr))
        original = getattr(module, attr)
        old_shapes.setdefault(module, {}).setdefault(attr, original.shape)
        index = torch.tensor(edit.keep, dtype=torch.long, device=tensor.device)
        current[edit.name] = tensor.detach().index_select(edit.dim, index).contiguous(
            memory_format=_memory_format(original))
    for name in dict.fromkeys(edit.name for edit in plan.edits):  # a tensor cut along several dims: once
        module, attr = _owner(model, name, modules)
        original = getattr(module, attr)
        if id(original) in replaced:
            continue
        data = current[name]
        if isinstance(original, nn.Parameter):
            new = nn.Parameter(data, requires_grad=original.requires_grad)
            module._parameters[attr] = new
        else:
            new = data
            module._buffers[attr] = new
        replaced[id(original)] = new
    # tied tensors (the same object under several names) stay tied
    for module in modules.values():
        for store in (module._parameters, module._buffers):
            for key, value in list(store.items()):
                if value is not None and id(value) in replaced and store[key] is not replaced[id(value)]:
                    old_shapes.setdefault(module, {}).setdefault(key, value.shape)  # its sizes follow too
                    store[key] = replaced[id(value)]
    for patch in plan.patches:
        module = modules.get(patch.module)
        module = model.get_submodule(patch.module) if module is None else module
        value = getattr(module, patch.attr, None)
        if value is None:
            raise InvalidArgumentError(f"the plan patches {patch.module}.{patch.attr}, which does not exist")
        new = patch.new
        if isinstance(value, list):
            new = list(new)
        setattr(module, patch.attr, new)
    for module, shapes in old_shapes.items():
        _update_shape_attributes(module, shapes)
    timm_contract.apply_witnesses_(model, witnesses)

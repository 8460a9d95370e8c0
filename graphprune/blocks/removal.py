"""Apply a :class:`~.plan.BlockPlan`: swap each removed branch's children for stand-ins, in place.

The block module keeps its own ``forward``; its branch children become a
:class:`~.modules.ZeroBranch` (or a :class:`~.modules.Proxy`) followed by
:class:`~.modules.Skip` modules, so the branch's parameters and multiply-adds are gone.
On any error every child is put back before the error propagates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..history import record_plan
from ..errors import InvalidArgumentError
from .modules import Proxy, Skip, ZeroBranch
from .plan import BlockPlan


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return (tensor.device, tensor.dtype) if tensor is not None else (torch.device("cpu"), torch.float32)


def apply_block_plan_(model: nn.Module, plan: BlockPlan, *, proxies: Mapping[str, Proxy] | None = None,
                      record: bool = True) -> nn.Module:
    """Remove the plan's blocks from ``model`` in place.

    Args:
        model: the model the plan was made for (or a fresh copy of its architecture).
        plan: what to remove.
        proxies: trained proxies by block name (from gate training); missing ones are built
            fresh (zero output) from the plan's spec.
        record: append the plan to ``model.graphprune_plans`` so :func:`graphprune.save`
            can rebuild the structure.

    Returns:
        ``model``.

    Example:
        >>> import timm, torch
        >>> from graphprune.blocks import find_blocks, make_block_plan
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> plan = make_block_plan(find_blocks(model, torch.randn(1, 3, 64, 64)), ["layer1.1"])
        >>> type(apply_block_plan_(model, plan).layer1[1].conv2).__name__
        'Skip'
    """
    if not isinstance(plan, BlockPlan):
        raise InvalidArgumentError(f"plan must be a BlockPlan, got {type(plan).__name__}")
    proxies = dict(proxies or {})
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for edit in plan.edits:
            try:
                parent = model.get_submodule(edit.module)
            except AttributeError as error:
                raise InvalidArgumentError(f"the block plan names module {edit.module!r}, which the model lacks") from error
            missing = [c for c in edit.children if c not in parent._modules]
            if missing:
                raise InvalidArgumentError(f"{edit.module} has no children {missing}")
            if any(isinstance(parent._modules[c], (Skip, ZeroBranch, Proxy)) for c in edit.children):
                raise InvalidArgumentError(f"block {edit.block!r} was already removed")
            device, dtype = _device_dtype(parent._modules[edit.children[0]])
            if edit.replacement == "proxy":
                first = proxies.pop(edit.block, None)
                if first is None:
                    first = Proxy(*edit.proxy)
                elif first.spec() != dict(zip(("in_channels", "out_channels", "stride"), edit.proxy)):
                    raise InvalidArgumentError(f"the proxy given for {edit.block!r} has spec {first.spec()}, "
                                               f"the plan wants {edit.proxy}")
                first = first.to(device=device, dtype=dtype)
            else:
                first = ZeroBranch()
            first.train(parent.training)  # a fresh proxy follows the model's mode
            for i, child in enumerate(edit.children):
                saved.append((parent, child, parent._modules[child]))
                parent._modules[child] = first if i == 0 else Skip()
        if proxies:
            raise InvalidArgumentError(f"proxies given for blocks the plan does not replace by a proxy: {sorted(proxies)}")
    except BaseException:
        for parent, child, module in reversed(saved):
            parent._modules[child] = module
        raise
    if record:
        record_plan(model, plan)
    return model

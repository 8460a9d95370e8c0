"""Rules for tensors made from another one's dtype and device: ``x.new_zeros(size)`` and friends.

The new tensor does not depend on ``x``'s values, so ``x``'s channels are untouched (without a
rule they were frozen: torchvision's Swin builds its shifted-window mask with
``x.new_zeros((pad_H, pad_W))``). Its own dims carry no channels, except a size that equals a
channel count read from a shape in the same module call (``B, C, H, W = x.shape;
x.new_zeros(B, C, H, W)``): the constant tensor then follows that count, so its dim is given
the read dim's channels and the size is not a literal to patch. Any other size that meets a
channel dim later freezes it there (:func:`graphprune.rules.context.merge_dims`).

A constant other than zero (``new_ones``, ``new_full``, ``ones_like``, ``full_like``) keeps a
channel alive after its producers are zeroed, like a bias no one can zero: its channels stay
prunable but are marked a statistic, since removing them is not invisible.

Example:
    >>> import torch, graphprune as gp
    >>> class Pad(torch.nn.Module):
    ...     def forward(self, x):
    ...         b, c, h, w = x.shape
    ...         return torch.cat([x, x.new_zeros(b, c, 1, w)], dim=2)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), Pad(), torch.nn.Conv2d(8, 2, 1))
    >>> gp.find_groups(gp.trace(net, torch.randn(1, 3, 4, 4)))[0].describe()
    'group 0 "0": 8 channels (8 prunable), 3 members'
"""

from __future__ import annotations

import torch

from . import register_rule
from .context import Call, Context
from ..elements import TensorInfo

SIZED = ["torch.Tensor.new_zeros", "torch.Tensor.new_ones", "torch.Tensor.new_empty", "torch.Tensor.new_full"]


def _size_args(call: Call) -> tuple:
    sizes = call.args[1:2] if call.name.endswith("new_full") else call.args[1:]
    if not sizes and "size" in call.kwargs:
        sizes = (call.kwargs["size"],)
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = tuple(sizes[0])
    return tuple(sizes)


@register_rule(*SIZED)
def _new_sized(ctx: Context, call: Call) -> list[TensorInfo]:
    out = call.outputs[0]
    reads = ctx.shape_reads.get(call.module, [])
    if len(_size_args(call)) != out.dim():  # sizes not given one per dim: nothing to match them with
        return [TensorInfo.free(out.dim())]
    dims = []
    for size in out.shape:
        matching = [r for r in reads if r.size == size] if size > 1 else []
        for other in matching[1:]:  # one count read twice: both reads keep it
            ctx.store.union(matching[0], other)
        dims.append(matching[0] if matching else None)
        if matching:
            call.dynamic.add(int(size))
    info = TensorInfo(tuple(dims))
    _mark_nonzero_fill(ctx, call, info, call.arg(1, "fill_value") if call.name.endswith("new_full") else
                       (1.0 if call.name.endswith("new_ones") else 0.0))
    return [info]


def _mark_nonzero_fill(ctx: Context, call: Call, info: TensorInfo, fill: object) -> None:
    if isinstance(fill, torch.Tensor) or fill != 0:
        for dim in info.dims:
            ctx.store.mark_statistic(dim)


@register_rule("torch.ones_like", "torch.full_like")
def _filled_like(ctx: Context, call: Call) -> list[TensorInfo]:
    info = ctx.info(call.args[0])
    _mark_nonzero_fill(ctx, call, info, call.arg(1, "fill_value") if call.name.endswith("full_like") else 1.0)
    return [info]


@register_rule("torch.Tensor.new_tensor")
def _new_tensor(ctx: Context, call: Call) -> list[TensorInfo]:
    return [TensorInfo.free(o.dim()) for o in call.outputs]

"""Rule for transposed convolutions (``conv_transpose1d/2d/3d``, ``nn.ConvTranspose*d``).

The weight is laid out ``(C_in, C_out / groups, *k)``: dim 0 runs over *all* input
channels, dim 1 over the output channels of one group. So:

* ``groups == 1``: weight dim 0 is coupled with the input's channels, dim 1 is the output;
* *whole groups* (``groups >= C_in / groups``, as for :mod:`~graphprune.rules.layers`'
  forward conv; depthwise): the input channels and output channels of conv group ``k``
  form one removable unit, weight dim 1 (local) stays, and ``groups`` shrinks (the plan
  patches it, :func:`graphprune.patches._conv_groups_patch`);
* *aligned slices* (few wide groups): local input index ``i`` of every group is one unit
  and so is local output index ``j``, so ``groups`` stays and each group narrows.

Stride, padding, ``output_padding`` and dilation act on spatial dims only.

Example:
    >>> import torch, graphprune as gp
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ConvTranspose2d(8, 6, 3, stride=2,
    ...                           output_padding=1), torch.nn.Conv2d(6, 2, 1))
    >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3, 8, 8)))
    >>> sorted((m.name, m.dim) for m in groups[1].members)
    [('1.bias', 0), ('1.weight', 1), ('2.weight', 1)]
"""

from __future__ import annotations

import numpy as np

from . import register_rule
from .context import Call, Context, merge_dims
from ..elements import SLOT, TensorInfo

NAMES = [f"torch.nn.functional.conv_transpose{n}d" for n in (1, 2, 3)] + \
        [f"torch.conv_transpose{n}d" for n in (1, 2, 3)]


@register_rule(*NAMES)
def _conv_transpose(ctx: Context, call: Call) -> list[TensorInfo]:
    x, weight = call.args[0], call.arg(1, "weight")
    bias = call.arg(2, "bias")
    groups = int(call.arg(6, "groups", 1))
    w_in, w_out = ctx.info(weight).dims[0], ctx.info(weight).dims[1]
    ctx.store.mark_role(w_in, "in")  # the default (dim 1 consumes) is a forward conv's layout
    ctx.store.mark_role(w_out, "out")
    c_in, c_out_g = x.shape[1], weight.shape[1]
    c_in_g, c_out = c_in // groups, c_out_g * groups
    x_dim = merge_dims(ctx.store, [(ctx.info(x).dims[1], c_in), (w_in, c_in)], c_in)  # weight rows follow inputs
    if groups == 1:
        out = w_out
    elif groups >= c_in_g:  # whole groups are the unit
        out = _whole_groups(ctx, x_dim, w_out, groups, c_in, c_out)
    else:  # local index i (input) and j (output) of every group are the units
        if x_dim is not None:
            ctx.store.union_rows(x_dim.reshape(groups, c_in_g).T)
        out = None if w_out is None else np.tile(w_out, groups)
    if bias is not None:
        out = merge_dims(ctx.store, [(out, c_out), (ctx.info(bias).dims[0], c_out)], c_out)
    w_dims = ctx.info(weight).dims
    ctx.add_cost(x.numel() * weight[0].numel(), [w_dims[0], w_dims[1]])
    result = call.outputs[0]
    return [TensorInfo((ctx.info(x).dims[0], out) + (None,) * (result.dim() - 2))]


def _whole_groups(ctx: Context, x_dim: np.ndarray | None, w_out: np.ndarray | None, groups: int, c_in: int,
                  c_out: int) -> np.ndarray | None:
    """Couple the input and output channels of each conv group; the per-group weight dim stays."""
    ctx.store.freeze(w_out)
    if x_dim is None:  # fixed inputs fix the group structure
        return None
    out = ctx.new_dim(c_out)
    if out is None:
        return None
    rows = np.concatenate([x_dim.reshape(groups, -1), out.reshape(groups, -1)], axis=1)
    ctx.store.union_rows(rows)
    pinned = (x_dim.reshape(groups, -1) == SLOT).any(axis=1)
    ctx.store.freeze(out.reshape(groups, -1)[pinned])
    return out

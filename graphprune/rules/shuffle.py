"""Rules for the ops that move channels in blocks: ``pixel_shuffle``, ``pixel_unshuffle``,
``channel_shuffle``.

They are data movement, but a position replay (:mod:`~graphprune.rules.movement`) would only
see a fixed permutation and let any channel go, while the op itself recomputes its index map
from the new channel count. The units that keep the map valid:

* ``pixel_shuffle(x, r)``: output channel ``c`` is input channels ``c*r*r ... c*r*r + r*r - 1``
  (one sub-pixel each): the block of ``r*r`` is one unit;
* ``pixel_unshuffle(x, r)``: the reverse: input channel ``c`` becomes that block;
* ``channel_shuffle(x, g)``: output channel ``j*g + i`` is input channel ``i*n + j`` (``n = C/g``):
  the unit is local index ``j`` of every group, so the ``g`` groups stay equal.

Example:
    >>> import torch, graphprune as gp
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.PixelShuffle(2), torch.nn.Conv2d(2, 1, 1))
    >>> group = gp.find_groups(gp.trace(net, torch.randn(1, 3, 4, 4)))[0]
    >>> group.size, group.width.tolist()
    (2, [4, 4])
"""

from __future__ import annotations

import numpy as np

from . import register_rule
from .context import Call, Context
from .names import spellings
from ..elements import SLOT, TensorInfo


def _others(ctx: Context, dims: tuple, keep: int, out_ndim: int) -> list:
    """Dims of the output other than the channel dim at ``keep`` (from the end): leading
    dims pass through; the spatial dims change size, so channels there are frozen."""
    lead = list(dims[:len(dims) + keep])
    for d in dims[len(dims) + keep + 1:]:
        ctx.store.freeze(d)
    return lead + [None] * (out_ndim - len(lead))


def _blocks(ctx: Context, channels: np.ndarray, n_blocks: int) -> np.ndarray:
    """Couple each of ``n_blocks`` consecutive blocks into one unit; a block holding a constant slot stays."""
    rows = channels.reshape(n_blocks, -1)
    ctx.store.union_rows(rows)
    pinned = (rows == SLOT).any(axis=1)
    ctx.store.freeze(rows[pinned])
    return rows.max(axis=1)


def _sub_pixel(ctx: Context, call: Call, factor: str) -> tuple:
    """``(x, r, out, input dims, output dims but the channels)`` of a pixel (un)shuffle call."""
    x, r = call.args[0], int(call.arg(1, factor))
    out = call.outputs[0]
    dims = ctx.info(x).dims
    return x, r, out, dims, _others(ctx, dims, -3, out.dim())


@register_rule(*spellings("pixel_shuffle", functional=True))
def _pixel_shuffle(ctx: Context, call: Call) -> list[TensorInfo]:
    x, r, out, dims, result = _sub_pixel(ctx, call, "upscale_factor")
    channels = dims[-3]
    if channels is not None:
        unit = _blocks(ctx, channels, x.shape[-3] // (r * r))
        result[-3] = unit if out.shape[-3] > 1 and (unit >= 0).any() else None
        if result[-3] is None:
            ctx.store.freeze(channels)
    return [TensorInfo(tuple(result))]


@register_rule(*spellings("pixel_unshuffle", functional=True))
def _pixel_unshuffle(ctx: Context, call: Call) -> list[TensorInfo]:
    _, r, _, dims, result = _sub_pixel(ctx, call, "downscale_factor")
    if dims[-3] is not None:
        result[-3] = np.repeat(dims[-3], r * r)
    return [TensorInfo(tuple(result))]


@register_rule(*spellings("channel_shuffle", "native_channel_shuffle", functional=True))
def _channel_shuffle(ctx: Context, call: Call) -> list[TensorInfo]:
    x, groups = call.args[0], int(call.arg(1, "groups"))
    dims = list(ctx.info(x).dims)
    channels = dims[1]
    if channels is not None:
        local = channels.reshape(groups, -1)  # (g, n): input channel i*n + j
        ctx.store.union_rows(local.T)  # unit: local index j of every group
        pinned = (local == SLOT).any(axis=0)
        ctx.store.freeze(local[:, pinned])
        dims[1] = local.T.reshape(-1)  # output channel j*g + i
    return [TensorInfo(tuple(dims))]

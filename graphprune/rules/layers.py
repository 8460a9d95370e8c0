"""Rules for parametric layers: convolution, linear, normalisation, embedding.

A layer's weight dims are coupled to the activation dims they multiply; its output
channels are the weight's output dim. Grouped convolutions are coupled in one of two
exact ways, chosen by shape:

* *whole groups* (``groups >= in_channels / groups``; depthwise, ResNeXt): input and
  output channels of conv group ``k`` form one removable unit and ``groups`` shrinks;
* *aligned slices* (few wide groups): local index ``j`` is removed from every group
  at once, so ``groups`` stays and each group narrows.
"""

from __future__ import annotations

import numpy as np

from . import register_rule
from .context import Call, Context, merge_dims
from ..elements import TensorInfo


def _couple(ctx: Context, weight_dim: np.ndarray | None, act_dim: np.ndarray | None, size: int) -> np.ndarray | None:
    return merge_dims(ctx.store, [(weight_dim, size), (act_dim, size)], size)


@register_rule("torch.nn.functional.conv1d", "torch.nn.functional.conv2d", "torch.nn.functional.conv3d",
               "torch.conv1d", "torch.conv2d", "torch.conv3d")
def _conv(ctx: Context, call: Call) -> list[TensorInfo]:
    x, weight = call.args[0], call.arg(1, "weight")
    bias = call.arg(2, "bias")
    groups = int(call.arg(6, "groups", 1))
    x_dim = ctx.info(x).dims[1]
    w_out, w_in = ctx.info(weight).dims[0], ctx.info(weight).dims[1]
    c_in, c_out, c_in_g = x.shape[1], weight.shape[0], weight.shape[1]
    c_out_g = c_out // groups
    if groups == 1:
        _couple(ctx, w_in, x_dim, c_in)
        out = w_out
    else:
        if x_dim is None:  # the input's channels are fixed, so is the group structure
            x_dim = np.full(c_in, -1, dtype=np.int64)
        if w_out is None:
            w_out = np.full(c_out, -1, dtype=np.int64)
        if groups >= c_in_g:  # whole groups are the unit
            ctx.store.freeze(w_in)
            rows = np.concatenate([x_dim.reshape(groups, c_in_g), w_out.reshape(groups, c_out_g)], axis=1)
            ctx.store.union_rows(rows)
            pinned = (x_dim.reshape(groups, c_in_g) == -1).any(axis=1)
            ctx.store.freeze(w_out.reshape(groups, c_out_g)[pinned])
        else:  # local index j of every group is the unit
            x_local = x_dim.reshape(groups, c_in_g)
            for k in range(groups):
                _couple(ctx, w_in, x_local[k], c_in_g)
            ctx.store.union_rows(w_out.reshape(groups, c_out_g).T)
        out = w_out if (w_out >= 0).any() else None
    if bias is not None:
        out = _couple(ctx, out, ctx.info(bias).dims[0], c_out)
    result = call.outputs[0]
    w_dims = ctx.info(weight).dims
    ctx.add_cost(result.numel() * weight[0].numel(), [w_dims[0], w_dims[1]])
    dims = [ctx.info(x).dims[0], out] + [None] * (x.dim() - 2)
    return [TensorInfo(tuple(dims))]


@register_rule("torch.nn.functional.linear", "torch._C._nn.linear")
def _linear(ctx: Context, call: Call) -> list[TensorInfo]:
    x, weight = call.args[0], call.arg(1, "weight")
    bias = call.arg(2, "bias")
    x_info, w_info = ctx.info(x), ctx.info(weight)
    if weight.dim() == 1:  # a dot product: contraction only
        _couple(ctx, w_info.dims[0], x_info.dims[-1], x.shape[-1])
        return [TensorInfo(x_info.dims[:-1])]
    _couple(ctx, w_info.dims[1], x_info.dims[-1], x.shape[-1])
    ctx.add_cost(x.numel() // max(x.shape[-1], 1) * weight.numel(), [w_info.dims[0], w_info.dims[1]])
    out = w_info.dims[0]
    if bias is not None:
        out = _couple(ctx, out, ctx.info(bias).dims[0], weight.shape[0])
    return [TensorInfo(x_info.dims[:-1] + (out,))]


def _affine(ctx: Context, x_dim: np.ndarray | None, size: int, vectors: list) -> np.ndarray | None:
    column = [(x_dim, size)] + [(ctx.info(v).dims[0], v.shape[0]) for v in vectors if v is not None]
    return merge_dims(ctx.store, column, size)


def _norm_channels(ctx: Context, call: Call) -> list:
    """A batch / instance norm's input dims, dim 1 coupled with its four vectors (in either order)."""
    x = call.args[0]
    names = ["running_mean", "running_var", "weight", "bias"]
    vectors = [call.arg(1 + i, n) for i, n in enumerate(names)]
    dims = list(ctx.info(x).dims)
    dims[1] = _affine(ctx, dims[1], x.shape[1], vectors)
    return dims


@register_rule("torch.nn.functional.instance_norm", "torch.instance_norm")
def _instance_norm(ctx: Context, call: Call) -> list[TensorInfo]:
    return [TensorInfo(tuple(_norm_channels(ctx, call)))]


@register_rule("torch.nn.functional.batch_norm")
def _batch_norm(ctx: Context, call: Call) -> list[TensorInfo]:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)``."""
    return _batch_norm_dims(ctx, call, bool(call.arg(5, "training", False)) or call.arg(1, "running_mean") is None)


@register_rule("torch.batch_norm")
def _aten_batch_norm(ctx: Context, call: Call) -> list[TensorInfo]:
    """``torch.batch_norm(input, weight, bias, running_mean, running_var, training, ...)``."""
    return _batch_norm_dims(ctx, call, bool(call.arg(5, "training", False)) or call.arg(3, "running_mean") is None)


def _batch_norm_dims(ctx: Context, call: Call, batch_statistics: bool) -> list[TensorInfo]:
    dims = _norm_channels(ctx, call)
    if batch_statistics:  # training mode or no running stats: normalized with the input's statistics
        # the mean and variance are taken over every dim but 1: in weight standardization
        # (timm's StdConv2d / ScaledStdConv2d: batch_norm of weight.reshape(1, C_out, -1)) that
        # is each filter's fan-in, so removing an input channel re-standardizes the filter
        for d, elems in enumerate(dims):
            if d != 1:
                ctx.store.mark_statistic(elems)
    return [TensorInfo(tuple(dims))]


@register_rule("torch.nn.functional.layer_norm", "torch.layer_norm", "torch.nn.functional.rms_norm",
               "torch.rms_norm")
def _layer_norm(ctx: Context, call: Call) -> list[TensorInfo]:
    x = call.args[0]
    shape = call.arg(1, "normalized_shape")
    weight, bias = call.arg(2, "weight"), call.arg(3, "bias")
    dims = list(ctx.info(x).dims)
    k = len(shape) if isinstance(shape, (list, tuple, type(x.shape))) else 1
    for j in range(k):
        d = x.dim() - k + j
        column = [(dims[d], x.shape[d])]
        for v in (weight, bias):
            if v is not None:
                column.append((ctx.info(v).dims[j], v.shape[j]))
        dims[d] = merge_dims(ctx.store, column, x.shape[d])
        ctx.store.mark_statistic(dims[d])
    return [TensorInfo(tuple(dims))]


@register_rule("torch.nn.functional.group_norm", "torch.group_norm")
def _group_norm(ctx: Context, call: Call) -> list[TensorInfo]:
    x, groups = call.args[0], int(call.arg(1, "num_groups"))
    weight, bias = call.arg(2, "weight"), call.arg(3, "bias")
    dims = list(ctx.info(x).dims)
    channel = _affine(ctx, dims[1], x.shape[1], [weight, bias])
    per_group = x.shape[1] // groups
    if channel is not None and groups > 1 and per_group > 1:
        # remove local index j from every group, keeping num_groups (with one channel per group,
        # removing the channel removes its group)
        local = channel.reshape(groups, per_group)
        for k in range(1, groups):
            ctx.store.union(local[0], local[k])
    dims[1] = channel
    ctx.store.mark_statistic(channel)
    return [TensorInfo(tuple(dims))]


@register_rule("torch.nn.functional.embedding", "torch.embedding")
def _embedding(ctx: Context, call: Call) -> list[TensorInfo]:
    index, weight = call.args[0], call.arg(1, "weight")
    return [TensorInfo(ctx.info(index).dims + (ctx.info(weight).dims[1],))]


@register_rule("torch.nn.functional.prelu", "torch.prelu")
def _prelu(ctx: Context, call: Call) -> list[TensorInfo]:
    x, weight = call.args[0], call.arg(1, "weight")
    dims = list(ctx.info(x).dims)
    if weight.numel() > 1:
        dims[1] = merge_dims(ctx.store, [(dims[1], x.shape[1]), (ctx.info(weight).dims[0], weight.shape[0])], x.shape[1])
    return [TensorInfo(tuple(dims))]

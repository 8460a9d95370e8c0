"""Reductions and spatial ops.

Reducing over a channel dim consumes it (the sum over fewer channels is well defined);
reducing over other dims drops them. Pooling and resampling keep dims 0 and 1 (batch,
channels) and change only spatial dims.
"""

from __future__ import annotations

from . import register_rule
from .context import Call, Context
from .names import spellings
from ..elements import TensorInfo

# a reduction over fewer channels is not the same statistic: these mark the reduced dims
STATISTICS = spellings("mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nansum",
                       "nanmean", "argmax", "argmin", "all", "any", "std_mean", "var_mean")
SUMS = spellings("sum")  # a zeroed channel adds nothing to a sum

SPATIAL = spellings(
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool2d_with_indices", "lp_pool2d", "interpolate",
    "upsample", "upsample_nearest", "upsample_bilinear", "fractional_max_pool2d",
    functional=True,
)


def _reduced_dims(call: Call, ndim: int) -> list[int]:
    dim = call.arg(1, "dim")
    if dim is None or isinstance(dim, bool):
        return list(range(ndim))
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return [d % ndim for d in dims if isinstance(d, int)]


@register_rule(*STATISTICS)
def _statistic(ctx: Context, call: Call) -> list[TensorInfo]:
    x = call.tensor_args[0]
    info = ctx.info(x)
    for d in _reduced_dims(call, x.dim()):
        ctx.store.mark_statistic(info.dims[d])
    return _sum(ctx, call)


@register_rule(*SUMS)
def _sum(ctx: Context, call: Call) -> list[TensorInfo]:
    x = call.tensor_args[0]
    info = ctx.info(x)
    reduced = set(_reduced_dims(call, x.dim()))
    infos = []
    for out in call.outputs:
        if out.dim() == x.dim():  # keepdim
            dims = tuple(None if d in reduced else info.dims[d] for d in range(x.dim()))
        elif out.dim() == x.dim() - len(reduced):
            dims = tuple(info.dims[d] for d in range(x.dim()) if d not in reduced)
        else:
            ctx.freeze_all([x])
            dims = (None,) * out.dim()
        infos.append(TensorInfo(dims))
    return infos


@register_rule(*SPATIAL)
def _spatial(ctx: Context, call: Call) -> list[TensorInfo]:
    x = call.tensor_args[0]
    info = ctx.info(x)
    return [TensorInfo(info.dims[:2] + (None,) * (out.dim() - 2)) if out.dim() >= 2 else TensorInfo.free(out.dim())
            for out in call.outputs]


@register_rule("torch.nn.functional.normalize")
def _normalize(ctx: Context, call: Call) -> list[TensorInfo]:
    """``x / max(||x||_p, eps)`` along ``dim``: a zeroed channel adds nothing to a p-norm with
    ``p >= 0`` (``inf`` included), so removing it leaves every other value unchanged; a
    negative ``p`` (``-inf``: the smallest magnitude) is changed by zeros, so it is a statistic.

    Example:
        >>> import torch, graphprune as gp
        >>> class Embed(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.proj = torch.nn.Linear(4, 8)
        ...     def forward(self, x):
        ...         return torch.nn.functional.normalize(self.proj(x), dim=-1).sum(-1)
        >>> group = gp.find_groups(gp.trace(Embed(), torch.randn(2, 4)))[0]
        >>> group.size, bool(group.statistic.any())
        (8, False)
    """
    x = call.args[0]
    p, dim = float(call.arg(1, "p", 2.0)), int(call.arg(2, "dim", 1))
    info = ctx.info(x)
    if p < 0:
        ctx.store.mark_statistic(info.dims[dim % x.dim()])
    return [info]

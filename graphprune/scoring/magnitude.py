"""Data-free magnitude scorers: L1 and L2 norms summed over every member of a group.

Sums run in float64 whatever the parameters' dtype: summed in bfloat16, a 512-wide slice
rounds at the third digit and reorders close channels (51 of 864 choices on a bf16 resnet18).
"""

from __future__ import annotations

import torch
from torch import nn

from ..groups import ChannelGroup, Groups
from .registry import Scores, register_scorer
from .sums import add_index_sums_


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by qualified name (tied ones under each name). Buffers such as BatchNorm's
    running statistics describe activations, not weights, and do not count toward magnitude."""
    return dict(model.named_parameters(remove_duplicate=False))


@torch.no_grad()
def member_norms(group: ChannelGroup, model: nn.Module, p: int,
                 tensors: dict[str, torch.Tensor] | None = None,
                 cache: dict[tuple[str, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over members of each channel's slice norm (``p``-th power summed: |w| or w^2), in float64.

    Every member counts, depthwise convs and norm layers included. ``cache`` (one dict shared
    over the groups of one scoring pass) keeps every tensor's per-index sums along its first two
    dims, so a weight that is a member of two groups (its outputs and its inputs) is read once.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).bfloat16()
        >>> group = gp.find_groups(gp.trace(net, torch.randn(1, 2, dtype=torch.bfloat16)))[0]
        >>> member_norms(group, net, 1).dtype
        torch.float64
    """
    tensors = tensors if tensors is not None else state_tensors(model)
    cache = cache if cache is not None else {}
    score = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        if member.name not in tensors:
            continue  # a buffer
        if (member.name, member.dim) not in cache:
            cache.update(_index_sums(member.name, tensors[member.name].detach(), p, member.dim))
        add_index_sums_(score, member, cache[member.name, member.dim])
    return score


def _index_sums(name: str, tensor: torch.Tensor, p: int, dim: int) -> dict[tuple[str, int], torch.Tensor]:
    """``{(name, d): float64 sums of |w|^p over every dim but d}`` for ``dim`` and the first two dims."""
    if p == 1:  # |w| is exact in any dtype; the sums accumulate in float64 without a float64 copy
        values, dtype = tensor.abs(), torch.float64
    else:  # w^2 rounds in a low dtype: square in float64
        values, dtype = tensor.to(torch.float64).square(), None
    out = {}
    for d in sorted({dim, *range(min(2, tensor.dim()))}):
        other = [o for o in range(tensor.dim()) if o != d]
        out[name, d] = torch.sum(values, other, dtype=dtype) if other else values.to(torch.float64)
    return out


@register_scorer("l1")
def l1(groups: Groups, model: nn.Module) -> Scores:
    """L1 magnitude: sum of |w| over every parameter slice of the channel.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 2)))
        >>> l1(groups, net)[groups[0].id].shape
        torch.Size([3])
    """
    tensors, cache = state_tensors(model), {}
    return {g.id: member_norms(g, model, 1, tensors, cache) for g in groups}


@register_scorer("l2")
def l2(groups: Groups, model: nn.Module) -> Scores:
    """L2 magnitude: square root of the sum of w^2 over every parameter slice of the channel."""
    tensors, cache = state_tensors(model), {}
    return {g.id: member_norms(g, model, 2, tensors, cache).sqrt() for g in groups}

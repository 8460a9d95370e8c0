"""Data-free baselines beside magnitude: seeded random scores and BatchNorm scale (Network Slimming)."""

from __future__ import annotations

import torch
from torch import nn

from ..groups import Groups
from .registry import Scores, register_scorer
from .sums import add_member_

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@register_scorer("random", seeded=True)
def random_scores(groups: Groups, model: nn.Module, *, seed: int = 0) -> Scores:
    """Uniform random scores from a seeded generator (a strong baseline after transfer).

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 2)))
        >>> a, b = random_scores(groups, net, seed=1), random_scores(groups, net, seed=1)
        >>> torch.equal(a[0], b[0])
        True
    """
    generator = torch.Generator().manual_seed(seed)
    return {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups}


@register_scorer("bn_scale")
def bn_scale(groups: Groups, model: nn.Module) -> Scores:
    """Sum of |gamma| over the group's normalization layers (Network Slimming).

    Groups without a normalization layer carrying the channel fall back to zero scores
    for it; pair this scorer with ``ignore`` or a local ratio when that matters.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.tensor([1.0, -3.0, 0.5, 2.0]))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3, 4, 4)))
        >>> bn_scale(groups, net)[groups[0].id].tolist()
        [1.0, 3.0, 0.5, 2.0]
    """
    modules = dict(model.named_modules())
    tensors = dict(model.named_parameters(remove_duplicate=False))
    scores = {}
    for group in groups:
        score = torch.zeros(group.size, dtype=torch.float64)
        for member in group.members:
            if not member.name.endswith(".weight") or not isinstance(modules.get(member.module), _NORMS):
                continue
            add_member_(score, member, tensors[member.name].detach().to(torch.float64).abs())
        scores[group.id] = score
    return scores

"""FLOPs budgets: find the pruning ratio that removes a target fraction of the MACs.

The research this project follows states budgets in FLOPs, not channel ratios. The
search runs on the graph's closed-form MAC estimate (:meth:`TraceGraph.estimate_macs`,
no forward pass per step); the caller verifies the result with fvcore.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .errors import InvalidArgumentError
from .groups import Groups
from .plan import PlanConfig, select_channels


def check_flops_reduction(value: float) -> float:
    """Validate a FLOPs reduction target in ``(0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value < 1:
        raise InvalidArgumentError(f"flops_reduction must be a number in (0, 1), got {value!r}")
    return float(value)


def removed_classes(groups: Groups, removed: Mapping[int, tuple[int, ...]]) -> np.ndarray:
    """Boolean mask over classes for a selection ``{group_id: channels}``."""
    gone = np.zeros(groups.graph.frozen.size, dtype=bool)
    for gid, channels in removed.items():
        gone[groups.by_id(gid).classes[np.asarray(channels, dtype=np.int64)]] = True
    return gone


def select_for_flops(groups: Groups, scores: Mapping[int, torch.Tensor], flops_reduction: float, *,
                     config: PlanConfig | None = None, exclude: frozenset[int] = frozenset(),
                     steps: int = 30) -> tuple[float, dict[int, tuple[int, ...]], float]:
    """Bisect the per-group ratio until the estimated MACs drop by ``flops_reduction``.

    Returns:
        ``(ratio, selection, estimated_reduction)``.

    Raises:
        InvalidArgumentError: if even the largest ratio cannot reach the target.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 8)))
        >>> ratio, _, reached = select_for_flops(groups, gp.get_scorer("l1")(groups, net), 0.5)
        >>> round(ratio, 2), round(reached, 2)
        (0.5, 0.5)
    """
    check_flops_reduction(flops_reduction)
    graph = groups.graph
    base = graph.estimate_macs()

    def reduction(ratio: float) -> tuple[float, dict[int, tuple[int, ...]]]:
        chosen = select_channels(groups, scores, ratio=ratio, config=config, exclude=exclude)
        return 1.0 - graph.estimate_macs(removed_classes(groups, chosen)) / base, chosen

    high = 0.99
    best, chosen = reduction(high)
    if best < flops_reduction:
        raise InvalidArgumentError(
            f"a {flops_reduction:.0%} FLOPs reduction is out of reach: removing 99% of every prunable group "
            f"saves only {best:.1%} (the rest is frozen; see find_groups(...).report())")
    low, found, found_chosen = 0.0, best, chosen
    high_ratio, low_chosen = high, {}
    for _ in range(steps):
        mid = (low + high_ratio) / 2
        value, picked = reduction(mid)
        if value >= flops_reduction:
            high_ratio, found, found_chosen = mid, value, picked
        else:
            low, low_chosen = mid, picked
    # a uniform ratio moves in jumps where many groups gain a channel at once (6 heads each
    # lose 3 at ratio 0.5): take the higher count group by group until the target is met
    selection = dict(low_chosen)
    for gid in sorted(set(found_chosen) - {g for g in found_chosen if found_chosen[g] == low_chosen.get(g)}):
        selection[gid] = found_chosen[gid]
        value = 1.0 - graph.estimate_macs(removed_classes(groups, selection)) / base
        if value >= flops_reduction:
            return high_ratio, selection, value
    return high_ratio, found_chosen, found

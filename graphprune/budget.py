"""FLOPs budgets: find the pruning ratio that removes a target fraction of the MACs.

The research this project follows states budgets in FLOPs, not channel ratios. The
search (:func:`select_for_flops`) runs on the graph's closed-form MAC estimate
(:meth:`TraceGraph.estimate_macs`, no forward pass per step); :func:`plan_for_flops` then
verifies it on a trial copy, measured with fvcore.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ._runtime import sorted_unique
from .errors import InvalidArgumentError, PruneError
from .groups import Groups
from .latency.config import check_latency_reduction
from .measurement import count_macs
from .plan import Plan, make_plan
from .selection import PlanConfig, check_ratio, select_channels
from .verify import Examples, apply_verified_, as_example_list


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


class FlopsSelection(NamedTuple):
    """What :func:`select_for_flops` found.

    Attributes:
        ratio: the per-group ratio the bisection settled on (the refinement may move some groups past it).
        selection: ``{group id: removed channel positions}``, for :func:`graphprune.make_plan`.
        estimated_reduction: the fraction of MACs the graph's estimate says it removes.
    """

    ratio: float
    selection: dict[int, tuple[int, ...]]
    estimated_reduction: float


def select_for_flops(groups: Groups, scores: Mapping[int, torch.Tensor], flops_reduction: float, *,
                     config: PlanConfig | None = None, exclude: frozenset[int] = frozenset(),
                     steps: int = 30) -> FlopsSelection:
    """Bisect the per-group ratio until the estimated MACs drop by ``flops_reduction``.

    Returns:
        A :class:`FlopsSelection`: ``(ratio, selection, estimated_reduction)``, by name or unpacked.

    Raises:
        InvalidArgumentError: if even the largest ratio cannot reach the target.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 8)))
        >>> found = select_for_flops(groups, gp.get_scorer("l1")(groups, net), 0.5)
        >>> round(found.ratio, 3), round(found.estimated_reduction, 2)  # 32 of 64 from ratio 31.5 / 64 on
        (0.492, 0.5)
        >>> ratio, selection, reached = found  # a tuple too
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
        scale = (config or PlanConfig()).residual_scale
        kept = "" if scale == 1 else f", or on residual streams kept by residual_scale={scale:g}"
        raise InvalidArgumentError(
            f"a {flops_reduction:.0%} FLOPs reduction is out of reach: removing 99% of every prunable group "
            f"saves only {best:.1%} (the rest is frozen{kept}; see find_groups(...).report())")
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
    # lose 3 at ratio 0.5, or 8 channels everywhere with round_to=8): refine between the two
    refined = _refine_between(groups, low_chosen, found_chosen, flops_reduction, base)
    if refined is not None:
        return FlopsSelection(high_ratio, *refined)
    return FlopsSelection(high_ratio, found_chosen, found)


def _refine_between(groups: Groups, low_chosen: dict[int, tuple[int, ...]], found_chosen: dict[int, tuple[int, ...]],
                    flops_reduction: float, base: int) -> tuple[dict[int, tuple[int, ...]], float] | None:
    """From the selection just below the target, move groups one by one to the one above:
    largest saving first while it fits, then the smallest step that crosses the target, then give
    back what overshoots. ``None`` when nothing differs or no mix reaches the target."""
    graph = groups.graph

    def estimate(chosen: dict[int, tuple[int, ...]]) -> float:
        return 1.0 - graph.estimate_macs(removed_classes(groups, chosen)) / base

    low_value = estimate(low_chosen)
    differing = sorted(g for g in found_chosen if found_chosen[g] != low_chosen.get(g))
    if not differing:
        return None
    deltas = _MacsDeltas(groups).savings(low_chosen, {g: found_chosen[g] for g in differing})
    need = flops_reduction - low_value
    selection, taken, rest = dict(low_chosen), 0.0, []
    for gid in sorted(differing, key=lambda g: (-deltas[g], g)):
        if taken + deltas[gid] <= need:
            selection[gid], taken = found_chosen[gid], taken + deltas[gid]
        else:
            rest.append(gid)
    # savings interact a little (a product scales with its input and output widths), so the
    # predictions steer and the whole-graph estimate decides, a bounded number of times
    value = estimate(selection)
    for gid in sorted(rest, key=lambda g: (deltas[g], g)):  # the smallest move that crosses
        if value >= flops_reduction:
            break
        if value + deltas[gid] >= flops_reduction:
            selection[gid] = found_chosen[gid]
            value = estimate(selection)
    if value < flops_reduction:  # none crosses alone: add the rest, smallest first, then check
        for gid in sorted(rest, key=lambda g: (deltas[g], g)):
            if selection.get(gid) != found_chosen[gid] and value < flops_reduction:
                selection[gid] = found_chosen[gid]
                value += deltas[gid]
        value = estimate(selection)
    # overshot: give back the largest moves the margin allows
    trial, margin = dict(selection), value - flops_reduction
    for gid in sorted(differing, key=lambda g: (-deltas[g], g)):
        if trial.get(gid) == found_chosen[gid] and deltas[gid] <= margin:
            trial[gid] = low_chosen.get(gid, ())
            margin -= deltas[gid]
    if trial != selection:
        trial = {k: v for k, v in trial.items() if v}
        trial_value = estimate(trial)
        if flops_reduction <= trial_value < value:
            selection, value = trial, trial_value
    return (selection, value) if value >= flops_reduction else None


class _MacsDeltas:
    """MACs saved by changing one group's selection, from the products that group's channels
    enter only: linear in the graph, where re-estimating the whole graph per group is not."""

    def __init__(self, groups: Groups):
        graph = groups.graph
        self.groups, self.graph = groups, graph
        self.cost_classes = []  # per cost: per dim, (class per index, slot mask)
        pairs_class, pairs_cost = [], []
        for c, (_, dims) in enumerate(graph.costs):
            entry = []
            for elems in dims:
                cls = graph.classes[np.maximum(elems, 0)]
                entry.append((cls, elems < 0))
                valid = cls[elems >= 0]
                pairs_class.append(valid)
                pairs_cost.append(np.full(valid.size, c, dtype=np.int64))
            self.cost_classes.append(entry)
        pair_class = np.concatenate(pairs_class) if pairs_class else np.zeros(0, np.int64)
        pair_cost = np.concatenate(pairs_cost) if pairs_cost else np.zeros(0, np.int64)
        order = np.argsort(pair_class, kind="stable")  # costs by class, as index ranges
        self.sorted_cost = pair_cost[order]
        self.starts = np.searchsorted(pair_class[order], np.arange(graph.frozen.size + 1))

    def _scale(self, c: int, gone: np.ndarray) -> float:
        scale = 1.0
        for cls, slot in self.cost_classes[c]:
            scale *= float((slot | ~gone[cls]).mean())
        return scale

    def savings(self, base: dict[int, tuple[int, ...]], changes: dict[int, tuple[int, ...]]) -> dict[int, float]:
        """For each group in ``changes``: the fraction of all MACs saved by giving it that selection
        instead of its selection in ``base`` (the other groups as in ``base``)."""
        total = float(self.graph.estimate_macs())
        gone = removed_classes(self.groups, base)
        result = {}
        for gid, channels in changes.items():
            classes = self.groups.by_id(gid).classes
            costs = sorted_unique(np.concatenate(
                [self.sorted_cost[self.starts[c]:self.starts[c + 1]] for c in classes.tolist()])).tolist()
            before_scales = [self._scale(c, gone) for c in costs]
            before = gone[classes].copy()
            gone[classes] = False
            gone[classes[np.asarray(channels, dtype=np.int64)]] = True
            after_scales = [self._scale(c, gone) for c in costs]
            gone[classes] = before
            saved = sum(self.graph.costs[c][0] * (b - a) for c, b, a in zip(costs, before_scales, after_scales))
            result[gid] = saved / total if total else 0.0
        return result


def check_target(ratio: float | None, flops_reduction: float | None, latency_reduction: float | None = None) -> None:
    """Exactly one pruning target, in its range: a channel ``ratio``, a ``flops_reduction`` or a ``latency_reduction``.

    Example:
        >>> check_target(None, 0.3)
        >>> check_target(0.3, 0.3)
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: give exactly one of ratio= (channel fraction), ...
    """
    if sum(t is not None for t in (ratio, flops_reduction, latency_reduction)) != 1:
        raise InvalidArgumentError("give exactly one of ratio= (channel fraction), flops_reduction= (MACs fraction) "
                                   "or latency_reduction= (measured latency fraction)")
    if ratio is not None:
        check_ratio(ratio)
    elif flops_reduction is not None:
        check_flops_reduction(flops_reduction)
    else:
        check_latency_reduction(latency_reduction)


def plan_for_flops(model: nn.Module, groups: Groups, scores, args: Examples, flops_reduction: float,
                    config: PlanConfig, tolerance: float = 0.01) -> Plan:
    """The verified plan that removes ``flops_reduction`` of ``model``'s MACs as fvcore measures them.

    Searches on the graph's MAC estimate (:func:`select_for_flops`), then applies the plan to a
    trial copy and measures it. Groups the verification drops (see :func:`apply_verified_`) are
    excluded and the search repeated, so the measured reduction lands within ``tolerance`` of
    the target. With several example inputs, MACs are summed over them (as the graph's estimate
    is). ``model`` is not modified.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from graphprune import apply_plan_, find_groups, trace
        >>> from graphprune.scoring import get_scorer
        >>> model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
        >>> x = torch.randn(1, 3, 16, 16)
        >>> groups = find_groups(trace(model, (x,)))
        >>> base = count_macs(model, x)
        >>> plan = plan_for_flops(model, groups, get_scorer("l1")(groups, model), (x,), 0.5, PlanConfig())
        >>> abs(1 - count_macs(apply_plan_(model, plan), x) / base - 0.5) <= 0.01
        True
    """

    def macs(net: nn.Module) -> int:
        return sum(count_macs(net, one) for one in as_example_list(args))

    base = macs(model)
    exclude: frozenset[int] = frozenset()
    for _ in range(3):
        chosen = select_for_flops(groups, scores, flops_reduction, config=config, exclude=exclude).selection
        plan = make_plan(groups, removed=chosen)
        trial = copy.deepcopy(model)
        applied, dropped = apply_verified_(trial, groups, plan, args)
        measured = 1.0 - macs(trial) / base
        if abs(measured - flops_reduction) <= tolerance:
            return applied
        if not dropped:
            break
        exclude = exclude | frozenset(dropped)
    raise PruneError(f"could not reach a {flops_reduction:.1%} FLOPs reduction: fvcore measured {measured:.1%} "
                     "for the closest plan")

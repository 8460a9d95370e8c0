"""Latency-targeted selection: keep the most importance for the predicted latency, then measure.

:func:`select_for_latency` is the HALP-style step (Shen et al., NeurIPS 2022): every group
can shed channels in steps of ``width_step`` (its lowest-scoring channels first); each step
saves the predicted milliseconds of the layers that group's channels run through (the
:class:`~graphprune.latency.predict.LatencyModel` lookup, other groups as they stand) and
loses the step's normalized scores. A greedy knapsack takes, step after step, the move with
the least importance lost per millisecond saved until the predicted time fits the budget.
A step that the table says saves nothing (a width below a multiple of the vector width that
runs no faster) is never taken on its own: the move is to the next width that is faster.

:func:`plan_for_latency` then measures each candidate end to end, in rounds alternating with the
unpruned model (so a load that changes moves both), and refines the budget
(a secant step, kept inside the bracket of budgets measured below and above the target)
until the measured reduction is within ``tolerance`` of the target or ``max_steps`` is hit.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..groups import Groups
from ..plan import Plan, make_plan
from ..selection import (NORMALIZERS, PlanConfig, checked_scores, keep_members_nonempty, removal_cap,
                         residual_policy)
from .config import LatencyConfig, LatencyRecord, check_latency_reduction
from .predict import LatencyModel
from .table import LatencyTable

_ROUNDS = 3  # alternating rounds of the model and a trial per measured try
# cached timings are retimed when the layers they model add up to more than this share of the measured model
_STALE_SHARE = 1.5

__all__ = ["plan_for_latency", "select_for_latency"]


@dataclass(eq=False)
class _GroupMoves:
    """One group's removal order and candidate removal counts."""

    order: list[int]                 # prunable channels, lowest score first
    counts: list[int]                # candidate removal counts, increasing, counts[0] == 0
    cost: np.ndarray                 # cumulative normalized score of order[:n]
    layers: list[int] = field(default_factory=list)
    pos: int = 0


def _moves(groups: Groups, scores: Mapping[int, torch.Tensor], config: PlanConfig, width_step: int,
           exclude: frozenset[int]) -> dict[int, _GroupMoves]:
    checked = checked_scores(groups, scores)
    normalize = NORMALIZERS[config.normalize]
    step_default = max(width_step, config.round_to)
    exclude, residual = residual_policy(groups, config, exclude)
    moves = {}
    for group in groups:
        if group.id in exclude:
            continue
        cap = removal_cap(group, config)
        if cap <= 0:
            continue
        score = normalize(checked[group.id].clone())
        if group.id in residual:  # ranked as if its scores were divided by residual_scale
            score = score / config.residual_scale
        masked = score.clone()
        masked[torch.from_numpy(~group.prunable)] = math.inf
        order = torch.argsort(masked, stable=True)[:cap].tolist()
        step = config.round_to if int(group.width.max()) > 1 else step_default  # heads: one at a time
        counts = sorted({0} | {n for n in range(1, cap + 1) if (group.size - n) % step == 0})
        if len(counts) < 2:
            continue
        cost = np.concatenate([[0.0], np.cumsum(score[order].numpy())])
        moves[group.id] = _GroupMoves(order, counts, cost)
    return moves


def select_for_latency(groups: Groups, scores: Mapping[int, torch.Tensor], model: LatencyModel, target_ms: float, *,
                       config: PlanConfig | None = None, exclude: frozenset[int] = frozenset()
                       ) -> tuple[dict[int, tuple[int, ...]], float]:
    """Greedy knapsack: remove the steps with least importance per predicted millisecond saved.

    Args:
        groups: the groups to prune.
        scores: ``{group_id: Tensor[group.size]}``.
        model: the latency model of the traced model.
        target_ms: stop once the modelled latency is at most this.
        config: normalization, ``round_to`` (a coarser step than ``model.width_step``),
            ``max_group_ratio``, ``residual_scale``; ``scope`` does not apply (the ranking is global by construction).
        exclude: groups left whole.

    Returns:
        ``(selection, modelled_ms)``; the selection may miss ``target_ms`` when every group
        is at its cap.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> graph = gp.trace(net, torch.randn(1, 8))
        >>> groups = gp.find_groups(graph)
        >>> table = LatencyTable(path=False, timer=lambda spec, threads: 1e-3 * spec.in_width * spec.out_width)
        >>> lm = LatencyModel(net, graph, torch.randn(1, 8), table)
        >>> chosen, ms = select_for_latency(groups, {0: torch.arange(64.0)}, lm, 0.5 * lm.predict_ms())
        >>> len(chosen[0]), ms <= 0.5 * lm.predict_ms()
        (32, True)
    """
    config = config or PlanConfig()
    moves = _moves(groups, scores, config, model.width_step, exclude)
    graph = groups.graph
    gone = np.zeros(graph.frozen.size, dtype=bool)
    group_of = np.full(graph.frozen.size, -1, dtype=np.int64)
    for gid in moves:
        group_of[groups.by_id(gid).classes] = gid
    touching: dict[int, set[int]] = {gid: set() for gid in moves}  # group -> the layers its channels run through
    for index, layer in enumerate(model.layers):
        cls = np.concatenate([c[c >= 0] for c in layer.dims]) if layer.dims else np.zeros(0, np.int64)
        for gid in set(group_of[cls].tolist()) - {-1}:
            touching[gid].add(index)
    for gid, mv in moves.items():
        mv.layers = sorted(touching[gid])
    neighbours = {gid: {other for index in mv.layers for other in moves if index in touching[other]}
                  for gid, mv in moves.items()}
    rate = model.rate_ms_per_mac
    layer_ms = [layer.ms(gone, rate) for layer in model.layers]
    total = sum(layer_ms)

    def set_removed(gid: int, n: int) -> None:
        classes = groups.by_id(gid).classes
        gone[classes] = False
        gone[classes[moves[gid].order[:n]]] = True

    def best_move(gid: int) -> tuple[float, int, float] | None:
        """(importance per ms, new position, ms saved) of the group's next step that saves time."""
        mv = moves[gid]
        before = sum(layer_ms[i] for i in mv.layers)
        found = None
        for pos in range(mv.pos + 1, len(mv.counts)):
            set_removed(gid, mv.counts[pos])
            saved = before - sum(model.layers[i].ms(gone, rate) for i in mv.layers)
            if saved > 1e-12 * max(total, 1.0):
                lost = mv.cost[mv.counts[pos]] - mv.cost[mv.counts[mv.pos]]
                found = (lost / saved, pos, saved)
                break
        set_removed(gid, mv.counts[mv.pos])
        return found

    candidates = {gid: best_move(gid) for gid in moves}
    while total > target_ms:
        live = [(c[0], gid) for gid, c in candidates.items() if c is not None]
        if not live:
            break
        _, gid = min(live)
        mv = moves[gid]
        mv.pos = candidates[gid][1]
        set_removed(gid, mv.counts[mv.pos])
        for index in mv.layers:
            layer_ms[index] = model.layers[index].ms(gone, rate)
        total = sum(layer_ms)
        for other in neighbours[gid]:
            candidates[other] = best_move(other)
    selection = _selection_at(groups, scores, moves)
    return selection, model.predict_ms(_gone(groups, selection))


def _selection_at(groups: Groups, scores: Mapping[int, torch.Tensor], moves: Mapping[int, _GroupMoves]
                  ) -> dict[int, tuple[int, ...]]:
    """The channels each group's moves reached, no member emptied (``{group id: sorted positions}``)."""
    selection = {}
    checked = checked_scores(groups, scores)
    for gid, mv in moves.items():
        n = mv.counts[mv.pos]
        if n:
            chosen = keep_members_nonempty(groups.by_id(gid), set(mv.order[:n]), checked[gid])
            if chosen:
                selection[gid] = tuple(sorted(chosen))
    return selection


def _gone(groups: Groups, selection: Mapping[int, tuple[int, ...]]) -> np.ndarray:
    gone = np.zeros(groups.graph.frozen.size, dtype=bool)
    for gid, channels in selection.items():
        gone[groups.by_id(gid).classes[np.asarray(channels, dtype=np.int64)]] = True
    return gone


def _next_budget(target: float, budget: float, measured: float, low: tuple[float, float], high: tuple[float, float],
                 modelled_share: float) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """The next modelled budget to try, and the (budget, measured) pair bracketing the target on each side.

    A secant inside the bracket once both sides are known (the low end may be ``(0, 0)``: nothing
    removed); with one side, the budget corrected by the miss. Kept inside the bracket and below
    the share of the latency the model covers (``modelled_share``).

    Example:
        >>> budget, low, high = _next_budget(0.3, 0.3, 0.2, (0.0, 0.0), (1.0, 1.0), 0.9)  # measured short
        >>> round(budget, 3), low, high
        (0.4, (0.3, 0.2), (1.0, 1.0))
    """
    if measured < target:
        low = max(low, (budget, measured))
    else:
        high = min(high, (budget, measured))
    if high[0] < 1.0:
        budget = low[0] + (target - low[1]) * (high[0] - low[0]) / max(high[1] - low[1], 1e-9)
    else:
        budget = budget + (target - measured)
    budget = min(max(budget, low[0] + 1e-3), min(high[0], 0.99) - 1e-3)
    if budget >= modelled_share:  # more than the modelled part can give
        budget = min(high[0], 0.99) - 1e-3
    return budget, low, high


def _latency_model(model: nn.Module, groups: Groups, example: tuple, latency: LatencyConfig, threads: int,
                   base_ms: float) -> tuple[LatencyTable, LatencyModel]:
    """The table and the layer model; cached timings are timed again when the modelled layers alone
    exceed ``_STALE_SHARE`` of the whole model measured now (recorded under another load or machine)."""
    def build(refresh: bool) -> tuple[LatencyTable, LatencyModel]:
        table = LatencyTable(latency.cache, threads=threads, timer=latency.timer, refresh=refresh)
        return table, LatencyModel(model, groups.graph, example, table, batch_size=latency.batch_size,
                                   width_step=latency.width_step, grid_points=latency.grid_points)

    table, lm = build(refresh=False)
    if table.hits and lm.predict_ms() > _STALE_SHARE * base_ms:
        table, lm = build(refresh=True)
    return table, lm


def plan_for_latency(model: nn.Module, groups: Groups, scores: Mapping[int, torch.Tensor], args: list,
                     latency_reduction: float, config: PlanConfig | None = None,
                     latency: LatencyConfig | None = None) -> tuple[Plan, LatencyRecord]:
    """Plan for a measured latency reduction: model, select, measure, refine the budget.

    Args:
        model: the model to prune (not modified: each try runs on a copy).
        groups: its groups.
        scores: ``{group_id: Tensor[group.size]}``.
        args: the example inputs, a list of positional-argument tuples; the first is timed.
        latency_reduction: target fraction of the measured median latency to remove, in ``(0, 1)``.
        config: selection options.
        latency: batch size, threads, cache, tolerance, step cap.

    Returns:
        The verified plan closest to the target, and its :class:`LatencyRecord`. When no try
        lands within ``tolerance`` (a loaded machine, a target the frozen part makes
        unreachable), the closest is returned with ``reached=False`` and a warning.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
        >>> x = torch.randn(64, 256)
        >>> groups = gp.find_groups(gp.trace(net, x))
        >>> plan, record = plan_for_latency(net, groups, gp.get_scorer("l1")(groups, net), [(x,)], 0.3,
        ...                                 latency=LatencyConfig(cache=False, threads=1))
        >>> record.target, record.steps[0][0]
        (0.3, 0.3)
    """
    from ..measurement.latency import measure_latency
    from ..verify import apply_verified_

    target = check_latency_reduction(latency_reduction)
    latency = latency or LatencyConfig()
    threads = latency.threads or torch.get_num_threads()
    example = tuple(args[0])

    def measure(net: nn.Module, repeats: int) -> float:
        return measure_latency(net, example, batch_size=latency.batch_size, threads=threads,
                               warmup=latency.warmup, repeats=repeats).median_ms

    def paired(trial: nn.Module) -> tuple[float, float]:
        """Medians of the model and the trial, timed in alternating rounds: a load that
        changes between the two (another process starting) moves both, not the ratio."""
        per_round = max(3, -(-latency.repeats // _ROUNDS))
        base, pruned = [], []
        for _ in range(_ROUNDS):
            base.append(measure(model, per_round))
            pruned.append(measure(trial, per_round))
        return float(np.median(base)), float(np.median(pruned))

    base_ms = measure(model, latency.repeats)
    table, lm = _latency_model(model, groups, example, latency, threads, base_ms)
    modelled = lm.predict_ms()
    steps: list[tuple[float, float, float]] = []
    tries: list[tuple[float, Plan, float, float, float]] = []  # (|error|, plan, predicted, base ms, pruned ms)
    low, high = (0.0, 0.0), (1.0, 1.0)  # (budget, measured) bracketing the target
    budget = target
    exclude: frozenset[int] = frozenset()
    for _ in range(latency.max_steps):
        chosen, ms = select_for_latency(groups, scores, lm, modelled - budget * base_ms, config=config,
                                        exclude=exclude)
        trial = copy.deepcopy(model)
        applied, dropped = apply_verified_(trial, groups, make_plan(groups, removed=chosen), args)
        if dropped:  # plan again without the groups that break the model
            exclude = exclude | frozenset(dropped)
        base_ms, pruned_ms = paired(trial)
        measured = 1.0 - pruned_ms / base_ms
        predicted = (modelled - ms) / base_ms
        steps.append((budget, predicted, measured))
        tries.append((abs(measured - target), applied, predicted, base_ms, pruned_ms))
        if abs(measured - target) <= latency.tolerance and not dropped:
            break
        budget, low, high = _next_budget(target, budget, measured, low, high, modelled / base_ms)
    error, plan, predicted, base_ms, pruned_ms = min(tries, key=lambda t: t[0])
    record = LatencyRecord(target, predicted, 1.0 - pruned_ms / base_ms, base_ms, pruned_ms, modelled,
                           error <= latency.tolerance, tuple(steps), latency.batch_size, threads, table.timed)
    if not record.reached:
        warnings.warn(f"latency_reduction={target:.0%}: the closest plan measured {record.measured:.1%} "
                      f"(predicted {record.predicted:.1%}) after {len(steps)} tries; timings on a loaded machine "
                      "vary, or the frozen part of the model holds the rest", stacklevel=3)
    return plan, record

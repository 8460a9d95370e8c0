"""Selection: which channels of each group a ratio removes, from their scores.

:class:`PlanConfig` holds the policy (local or global ranking, per-group normalization,
rounding, caps, how hard residual streams are pruned); :func:`select_channels` applies it,
never selecting a frozen channel and never emptying a group or one of its members. A
selection (``{group_id: channels}``) becomes a :class:`~graphprune.plan.Plan` through
:func:`graphprune.make_plan`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from ._runtime import sorted_unique
from .errors import InvalidArgumentError
from .groups import ChannelGroup, Groups
from .residual import residual_groups


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 <= ratio < 1:
        raise InvalidArgumentError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


@dataclass(frozen=True)
class PlanConfig:
    """How scores become a selection.

    Attributes:
        scope: ``"local"`` removes the same fraction of every group; ``"global"`` ranks all
            channels of all groups together (after ``normalize``), so layers lose different
            fractions (known to strip some layers bare: see ``max_group_ratio``).
        normalize: per-group score normalization before a global ranking: ``"none"`` (scores
            already comparable, e.g. ``target_taylor``), ``"mean"``, ``"max"``, ``"sum"`` or ``"l2"``.
        round_to: keep a multiple of this many channels per group (SIMD-friendly widths).
        max_group_ratio: never remove more than this fraction of one group's prunable channels (``None``: no cap
            beyond keeping at least one channel per group and per member).
        residual_scale: how hard to prune the groups on a residual stream
            (:func:`graphprune.residual.residual_groups`) relative to the others, in ``[0, 1]``: local scope
            removes ``ratio * residual_scale`` of them; global scope ranks their scores as if divided by it.
            ``1``: no difference; ``0``: residual streams keep every channel (a FLOPs target is then met
            inside the blocks alone).
    """

    scope: str = "local"
    normalize: str = "mean"
    round_to: int = 1
    max_group_ratio: float | None = None
    residual_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scope not in ("local", "global"):
            raise InvalidArgumentError(f"scope must be 'local' or 'global', got {self.scope!r}")
        if self.normalize not in NORMALIZERS:
            raise InvalidArgumentError(f"normalize must be one of {sorted(NORMALIZERS)}, got {self.normalize!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise InvalidArgumentError(f"round_to must be a positive integer, got {self.round_to!r}")
        if self.max_group_ratio is not None and not 0 < self.max_group_ratio < 1:
            raise InvalidArgumentError(f"max_group_ratio must be in (0, 1), got {self.max_group_ratio!r}")
        scale = self.residual_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or math.isnan(scale) or not 0 <= scale <= 1:
            raise InvalidArgumentError(f"residual_scale must be a number in [0, 1], got {scale!r}")


NORMALIZERS = {
    "none": lambda s: s,
    "mean": lambda s: s / s.mean().clamp_min(1e-30),
    "max": lambda s: s / s.max().clamp_min(1e-30),
    "sum": lambda s: s / s.sum().clamp_min(1e-30),
    "l2": lambda s: s / s.norm().clamp_min(1e-30),
}


def checked_scores(groups: Groups, scores: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    checked = {}
    for group in groups:
        score = scores.get(group.id)
        if score is None:
            raise InvalidArgumentError(f"no score for group {group.id} ({group.name})")
        score = torch.as_tensor(score, dtype=torch.float64).detach().flatten().cpu()
        if score.numel() != group.size:
            raise InvalidArgumentError(f"group {group.id} has {group.size} channels but {score.numel()} scores")
        if torch.isnan(score).any():
            raise InvalidArgumentError(f"scores of group {group.id} ({group.name}) contain NaN")
        checked[group.id] = score
    return checked


def removal_cap(group: ChannelGroup, config: PlanConfig) -> int:
    """Most channels one group may lose."""
    prunable = int(group.prunable.sum())
    cap = min(prunable, group.size - 1)
    if config.max_group_ratio is not None:
        cap = min(cap, int(math.floor(config.max_group_ratio * prunable + 1e-9)))
    if config.round_to > 1:
        cap = min(cap, group.size - config.round_to) if group.size > config.round_to else 0
    return max(cap, 0)


def removal_count(ratio: float, size: int) -> int:
    """Units to remove from a group of ``size`` at ``ratio``: the count nearest ``ratio * size``
    (halves round down).

    Nearest, not floor: a group of 3 attention heads at ratio 0.3 loses 1 head (33 %), the
    closest a 3-unit group can come; with floor it would never lose any below ratio 1/3.

    Example:
        >>> removal_count(0.3, 3), removal_count(0.3, 64), removal_count(0.25, 2)
        (1, 19, 0)
    """
    return int(math.floor(ratio * size + 0.5 - 1e-9))


def _round(group: ChannelGroup, n: int, round_to: int) -> int:
    """Remove fewer so the kept count is a multiple of ``round_to``."""
    if round_to <= 1:
        return n
    keep = group.size - n
    keep = int(math.ceil(keep / round_to)) * round_to
    return max(0, group.size - keep)


def select_channels(groups: Groups, scores: Mapping[int, torch.Tensor], *, ratio: float,
                    config: PlanConfig | None = None, round_to: int | None = None,
                    exclude: frozenset[int] = frozenset()) -> dict[int, tuple[int, ...]]:
    """Choose the lowest-scoring channels: ``ratio`` of each group's prunable channels (local) or
    of all prunable channels (global).

    Counts are taken on the prunable channels, not the group's size: a group whose channels are
    mostly frozen (the zero-padded channels of an option-A shortcut) loses ``ratio`` of what it
    can lose, not all of it. Frozen channels are never selected, no group or member is emptied,
    groups in ``exclude`` are skipped. Within a group whose channels come from different
    producers (a concatenation), scores are normalized per producer segment first (see
    :func:`producer_segments`), unless ``config.normalize`` is ``"none"``.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
        >>> scores = {groups[0].id: torch.arange(8.0)}
        >>> select_channels(groups, scores, ratio=0.25)
        {0: (0, 1)}
    """
    ratio = check_ratio(ratio)
    config = config or PlanConfig()
    if round_to is not None:
        config = replace(config, round_to=round_to)
    checked = checked_scores(groups, scores)
    exclude, residual = residual_policy(groups, config, exclude)
    active = [g for g in groups if g.id not in exclude]
    checked = {g.id: _per_segment(g, checked[g.id], config.normalize) for g in active}
    counts: dict[int, int] = {}
    if config.scope == "local":
        for group in active:
            share = ratio * config.residual_scale if group.id in residual else ratio
            n = _round(group, removal_count(share, int(group.prunable.sum())), config.round_to)
            counts[group.id] = min(n, removal_cap(group, config))
    else:
        counts = _global_counts(active, checked, ratio, config, residual)
    removed: dict[int, tuple[int, ...]] = {}
    for group in active:
        n = counts.get(group.id, 0)
        if n <= 0:
            continue
        masked = checked[group.id].clone()
        masked[torch.from_numpy(~group.prunable)] = math.inf
        order = torch.argsort(masked, stable=True)[:n]
        chosen = keep_members_nonempty(group, set(order.tolist()), checked[group.id])
        if chosen:
            removed[group.id] = tuple(sorted(chosen))
    return removed


def producer_segments(group: ChannelGroup) -> np.ndarray:
    """For every channel of ``group``, the index of its producer segment: channels made by the
    same set of producing (``"out"``) members share a segment.

    A concatenation group holds one segment per input (SqueezeNet's ``expand1x1`` and
    ``expand3x3``; every layer of a DenseNet block); a conv, its norm and its consumers, one.
    Magnitudes of different segments are not comparable: a 3x3 producer's filters hold 9x the
    weights of a 1x1's, and a DenseNet layer's output feeds every later layer of its block.

    Example:
        >>> import torch, graphprune as gp
        >>> class Cat(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b, self.head = torch.nn.Linear(4, 2), torch.nn.Linear(4, 3), torch.nn.Linear(5, 1)
        ...     def forward(self, x):
        ...         return self.head(torch.cat([self.a(x), self.b(x)], 1))
        >>> producer_segments(gp.find_groups(gp.trace(Cat(), torch.randn(1, 4)))[0]).tolist()
        [0, 0, 1, 1, 1]
    """
    cached = _SEGMENTS.get(group)
    if cached is not None:
        return cached
    makers = [m for m in group.members if m.role == "out"] or list(group.members)
    owned = np.zeros((len(makers), group.size), dtype=bool)
    for row, member in zip(owned, makers):
        row[member.channel[member.channel >= 0]] = True
    if owned.all(axis=1).all():
        segments = np.zeros(group.size, dtype=np.int64)
    else:  # one row of bits per channel, numbered in order of first appearance
        keys = np.ascontiguousarray(np.packbits(owned, axis=0).T)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first, kind="stable"), kind="stable")
        segments = order[inverse.ravel()].astype(np.int64)
    segments.setflags(write=False)
    _SEGMENTS[group] = segments
    return segments


_SEGMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> producer_segments(group)


def _per_segment(group: ChannelGroup, score: torch.Tensor, normalize: str) -> torch.Tensor:
    """``score`` normalized within each producer segment of ``group``, so segments compete on
    relative, not raw, magnitude; unchanged for a group of one segment."""
    segments = producer_segments(group)
    if normalize == "none" or not segments.any():
        return score
    normalized = score.clone()
    for segment in range(int(segments.max()) + 1):
        inside = torch.from_numpy(segments == segment)
        normalized[inside] = NORMALIZERS[normalize](score[inside])
    return normalized


def residual_policy(groups: Groups, config: PlanConfig, exclude: frozenset[int] = frozenset()
                    ) -> tuple[frozenset[int], frozenset[int]]:
    """``config.residual_scale`` as ``(groups to skip, residual groups weighed by the scale)``:
    at 0 the residual groups join ``exclude``; at 1 nothing changes.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
        >>> residual_policy(groups, PlanConfig(residual_scale=0.5))  # no skip connection
        (frozenset(), frozenset())
    """
    if config.residual_scale == 1:
        return exclude, frozenset()
    residual = residual_groups(groups)
    if config.residual_scale == 0:
        return exclude | residual, frozenset()
    return exclude, residual


def _global_counts(active: list[ChannelGroup], scores: dict[int, torch.Tensor], ratio: float,
                   config: PlanConfig, residual: frozenset[int] = frozenset()) -> dict[int, int]:
    """How many channels each group loses when all channels are ranked together (the scores of
    ``residual`` groups divided by ``config.residual_scale``)."""
    normalize = NORMALIZERS[config.normalize]
    owners, values = [], []
    for group in active:
        prunable = torch.from_numpy(group.prunable.copy())
        normalized = normalize(scores[group.id].clone())
        if group.id in residual:
            normalized = normalized / config.residual_scale
        owners.append(torch.full((int(prunable.sum()),), group.id, dtype=torch.long))
        values.append(normalized[prunable])
    if not owners:
        return {}
    owner, value = torch.cat(owners), torch.cat(values)
    target = int(math.floor(ratio * sum(int(g.prunable.sum()) for g in active) + 1e-9))
    caps = {g.id: removal_cap(g, config) for g in active}
    counts = dict.fromkeys(caps, 0)
    taken = 0
    for index in torch.argsort(value, stable=True).tolist():
        if taken >= target:
            break
        gid = int(owner[index])
        if counts[gid] < caps[gid]:
            counts[gid] += 1
            taken += 1
    by_id = {g.id: g for g in active}
    return {gid: _round(by_id[gid], n, config.round_to) for gid, n in counts.items()}


def removal_table(groups: Groups, removed: Mapping[int, tuple[int, ...]]) -> str:
    """Per-group report of a selection: name, channels, removed, fraction removed.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
        >>> print(removal_table(groups, {0: (1, 2)}))
        group  channels  removed  ratio  name
            0         8        2  25.0%  0
    """
    lines = [f"{'group':>5}  {'channels':>8}  {'removed':>7}  {'ratio':>5}  name"]
    for group in groups:
        n = len(removed.get(group.id, ()))
        lines.append(f"{group.id:>5}  {group.size:>8}  {n:>7}  {n / group.size:>5.1%}  {group.name}")
    return "\n".join(lines)


def keep_members_nonempty(group: ChannelGroup, chosen: set[int], score: torch.Tensor) -> set[int]:
    """Give back, per member that would lose every index, its best-scoring channel."""
    mask = np.zeros(group.size, dtype=bool)
    mask[list(chosen)] = True
    values = score.numpy()
    for member in group.members:
        channels = member.channel[member.channel >= 0]
        if channels.size and mask[channels].all():
            channels = sorted_unique(channels)  # ties go to the lowest channel, as max() over sorted ones did
            best = int(channels[np.argmax(values[channels])])
            chosen.discard(best)
            mask[best] = False
    return chosen

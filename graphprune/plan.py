"""Plans: which channels to remove, resolved down to parameter slices.

A :class:`Plan` is plain data. It names, for every parameter dimension that shrinks, the
indices to keep, and the module attributes (``num_heads``, ``attn_dim``, split sizes)
whose values must follow. It serializes to JSON and re-applies to a fresh copy of the
same architecture without tracing again. Only :func:`graphprune.apply_plan_` mutates.
"""

from __future__ import annotations

import itertools
import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ._runtime import json_record, paused_gc, sorted_unique
from .errors import InvalidArgumentError
from .groups import ChannelGroup, Groups
from .residual import residual_groups

PLAN_FORMAT = "graphprune.plan/2"


@dataclass(frozen=True)
class ParamEdit:
    """Keep only ``keep`` (sorted indices) along ``dim`` of parameter/buffer ``name`` (of size ``size``)."""

    name: str
    dim: int
    size: int
    keep: tuple[int, ...]


@dataclass(frozen=True)
class AttrPatch:
    """Set ``module.attr`` from ``old`` to ``new`` (an int or a tuple/list of ints)."""

    module: str
    attr: str
    old: object
    new: object


@dataclass(frozen=True)
class Plan:
    """What one removal pass does.

    Attributes:
        removed: group id -> removed channel positions (for reports; not needed to apply).
        edits: parameter slices to keep.
        patches: module attributes to update.
        model: :func:`graphprune.graph.model_fingerprint` of the model the plan was made for
            (``None``: not recorded, as in plans written before it was); :func:`graphprune.apply_plan_`
            refuses a model with other parameter names.
    """

    removed: Mapping[int, tuple[int, ...]]
    edits: tuple[ParamEdit, ...]
    patches: tuple[AttrPatch, ...] = field(default=())
    model: str | None = None

    @property
    def num_removed(self) -> int:
        """Channels removed over all groups."""
        return sum(len(v) for v in self.removed.values())

    def to_json(self) -> str:
        """Serialize (round-trips through :meth:`from_json`).

        Example:
            >>> plan = Plan({0: (1,)}, (ParamEdit("fc.weight", 0, 3, (0, 2)),))
            >>> Plan.from_json(plan.to_json()) == plan
            True
        """
        with paused_gc():
            return self._dumps()

    def _dumps(self) -> str:
        data = {
            "format": PLAN_FORMAT,
            "removed": {str(k): list(v) for k, v in self.removed.items()},
            "edits": [{"name": e.name, "dim": e.dim, "size": e.size, "keep": _to_runs(e.keep)} for e in self.edits],
            "patches": [asdict(p) for p in self.patches],
        }
        if self.model is not None:
            data["model"] = self.model
        return json.dumps(data)

    @staticmethod
    def from_json(text: str, *, max_size: int | None = None) -> Plan:
        """Parse a plan written by :meth:`to_json`; raises ``InvalidArgumentError`` on anything else.

        Every field is checked before anything is expanded: index runs must lie inside their
        edit's ``size`` (and ``size`` at most ``max_size``, when given), so the memory spent is
        bounded by the sizes the plan claims, not by what its runs say.

        Args:
            text: the JSON.
            max_size: the largest dimension size an edit may claim (e.g. the largest tensor
                dimension of the model it is for); ``None``: no bound beyond the runs' own.

        Example:
            >>> Plan.from_json('{"format": "graphprune.plan/2", "removed": {}, "patches": [], '
            ...                '"edits": [{"name": "fc.weight", "dim": 0, "size": 4, "keep": [[0, 2], [3, 4]]}]}').edits
            (ParamEdit(name='fc.weight', dim=0, size=4, keep=(0, 1, 3)),)
            >>> Plan.from_json('{"format": "graphprune.plan/2", "removed": {}, "patches": [], '
            ...                '"edits": [{"name": "w", "dim": 0, "size": 4, "keep": [[0, 9]]}]}')
            Traceback (most recent call last):
            ...
            graphprune.errors.InvalidArgumentError: not a graphprune plan: edit of 'w': run [0, 9] is not inside [0, 4)
        """
        try:
            data = json_record(text, PLAN_FORMAT, "plan")
            edits = tuple(_edit_from(e, max_size) for e in _list(data["edits"], "edits"))
            patches = tuple(_patch_from(p) for p in _list(data["patches"], "patches"))
            removed = _removed_from(data["removed"], max_size)
            model = _fingerprint_from(data.get("model"))
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
            raise InvalidArgumentError(f"not a graphprune plan: {error}") from error
        return Plan(removed, edits, patches, model)


_MAX_DIM = 64  # no tensor has more dims than this
_MAX_PATCH_INTS = 16  # a patched attribute is an int or a short shape


def _fingerprint_from(value: object) -> str | None:
    if value is not None and not (isinstance(value, str) and len(value) == 64 and
                                  all(c in "0123456789abcdef" for c in value)):
        raise ValueError(f"model must be a sha256 hex digest, got {value!r:.80}")
    return value


def _list(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _int(value: object, what: str, low: int = 0, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{what} must be an int {bound}, got {value!r}")
    return value


def _edit_from(entry: object, max_size: int | None) -> ParamEdit:
    if not isinstance(entry, dict):
        raise ValueError(f"an edit is a JSON object, got {entry!r:.80}")
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"edit name must be a non-empty string, got {name!r:.80}")
    dim = _int(entry["dim"], f"dim of {name!r}", 0, _MAX_DIM - 1)
    size = _int(entry["size"], f"size of {name!r}", 1, max_size)
    return ParamEdit(name, dim, size, _from_runs(_list(entry["keep"], "keep"), size, name))


def _patch_from(entry: object) -> AttrPatch:
    if not isinstance(entry, dict):
        raise ValueError(f"a patch is a JSON object, got {entry!r:.80}")
    module, attr = entry["module"], entry["attr"]
    if not isinstance(module, str) or not isinstance(attr, str) or not attr.isidentifier():
        raise ValueError(f"a patch names a module (string) and an attribute (identifier), got {module!r:.80}, "
                         f"{attr!r:.80}")
    return AttrPatch(module, attr, _ints(entry["old"]), _ints(entry["new"]))


def _removed_from(value: object, max_size: int | None) -> dict[int, tuple[int, ...]]:
    if not isinstance(value, dict):
        raise ValueError(f"removed must be an object, got {type(value).__name__}")
    removed = {}
    for key, channels in value.items():
        channels = _list(channels, f"removed[{key!r}]")
        if max_size is not None and len(channels) > max_size:
            raise ValueError(f"group {key} removes {len(channels)} channels, more than any dimension holds")
        removed[int(key)] = tuple(_int(i, "a removed channel", 0, max_size) for i in channels)
    return removed


def _to_runs(indices: tuple[int, ...]) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs: ``(0, 1, 2, 5)`` -> ``[[0, 3], [5, 6]]``."""
    if not indices:
        return []
    array = np.asarray(indices, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(array) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [array.size]])
    return np.stack([array[starts], array[stops - 1] + 1], axis=1).tolist()


def _from_runs(runs: list, size: int, name: str = "") -> tuple[int, ...]:
    """``[start, stop)`` runs inside ``[0, size)``, increasing and disjoint, back to indices;
    checked before expanding, so the result never exceeds ``size`` entries."""
    previous = 0
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(type(v) is int for v in run)):
            raise ValueError(f"edit of {name!r}: {run!r:.80} is not a run [start, stop] of ints")
        start, stop = run
        if 0 <= start < previous:
            raise ValueError(f"edit of {name!r}: index runs overlap or are out of order")
        if not 0 <= start < stop <= size:
            raise ValueError(f"edit of {name!r}: run {run} is not inside [0, {size})")
        previous = stop
    return tuple(itertools.chain.from_iterable(range(start, stop) for start, stop in runs))


def _ints(value: object) -> object:
    if isinstance(value, list):
        if len(value) > _MAX_PATCH_INTS:
            raise ValueError(f"a patched value has at most {_MAX_PATCH_INTS} ints, got {len(value)}")
        return tuple(_int(v, "a patched value", -1) for v in value)
    return _int(value, "a patched value", -1)


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
    residual = residual_groups(groups) if config.residual_scale < 1 else frozenset()
    if config.residual_scale == 0:
        exclude = exclude | residual
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


def make_plan(groups: Groups, scores: Mapping[int, torch.Tensor] | None = None, *, ratio: float = 0.0,
              config: PlanConfig | None = None, round_to: int | None = None,
              removed: Mapping[int, tuple[int, ...]] | None = None) -> Plan:
    """Turn per-channel scores (or an explicit selection) into a :class:`Plan`.

    Args:
        groups: from :func:`graphprune.find_groups`.
        scores: group id -> one score per channel (lower is removed first).
        ratio: fraction of the prunable channels to remove, in ``[0, 1)`` (per group, or overall
            with a global ``config.scope``).
        config: selection options (:class:`PlanConfig`); default local, no rounding.
        round_to: shortcut for ``config.round_to``.
        removed: group id -> channels to remove, instead of ``scores``/``ratio``.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
        >>> plan = make_plan(groups, removed={groups[0].id: (0, 1)})
        >>> [(e.name, e.dim, len(e.keep)) for e in plan.edits]
        [('0.weight', 0, 6), ('0.bias', 0, 6), ('2.weight', 1, 6)]
    """
    if removed is None:
        if scores is None:
            raise InvalidArgumentError("make_plan needs scores (with a ratio) or an explicit removed selection")
        removed = select_channels(groups, scores, ratio=ratio, config=config, round_to=round_to)
    removed = {int(k): tuple(sorted(int(i) for i in v)) for k, v in removed.items() if len(v)}
    graph = groups.graph
    gone = np.zeros(graph.frozen.size, dtype=bool)
    for gid, channels in removed.items():
        group = groups.by_id(gid)
        channels_arr = np.asarray(channels, dtype=np.int64)
        if channels_arr.size and (channels_arr.min() < 0 or channels_arr.max() >= group.size):
            raise InvalidArgumentError(f"group {gid} has {group.size} channels; cannot remove {channels}")
        if not group.prunable[channels_arr].all():
            raise InvalidArgumentError(f"group {gid} ({group.name}): channels {channels} include frozen ones")
        if channels_arr.size >= group.size:
            raise InvalidArgumentError(f"group {gid} ({group.name}) would be emptied")
        gone[group.classes[channels_arr]] = True
    edits = []
    for gid in sorted(removed):
        group = groups.by_id(gid)
        going = np.zeros(group.size + 1, dtype=bool)  # the extra last slot stands for -1: never removed
        going[list(removed[gid])] = True
        for member in group.members:
            keep = np.flatnonzero(~going[member.channel])
            if keep.size < member.channel.size:
                edits.append(ParamEdit(member.name, member.dim, int(member.channel.size), tuple(keep.tolist())))
    return Plan(removed, tuple(edits), _attribute_patches(graph, gone), graph.fingerprint or None)


def _new_size(elems: np.ndarray, classes: np.ndarray, gone: np.ndarray) -> int:
    alive = elems < 0
    alive |= ~gone[classes[np.maximum(elems, 0)]]
    return int(alive.sum())


def _conv_groups_patch(op, patches: dict, old_sizes: list[int], new_sizes: list[int]) -> None:
    """A grouped conv that lost whole groups (see :mod:`graphprune.rules.layers`) has fewer groups."""
    attrs = dict(op.module_ints)
    groups, c_in, c_out = attrs["groups"], attrs.get("in_channels"), attrs.get("out_channels")
    if not (c_in and c_out and old_sizes and old_sizes[0] == c_out):
        return
    if groups >= c_in // groups and new_sizes[0] != c_out:
        new_groups = groups * new_sizes[0] // c_out
        patches.setdefault((op.module, "groups"), AttrPatch(op.module, "groups", groups, new_groups))


def _attribute_patches(graph, gone: np.ndarray) -> tuple[AttrPatch, ...]:
    """Module attributes that hold a size which the removal changes (reshape targets, split sizes)."""
    if not gone.any():
        return ()
    patches: dict[tuple[str, str], AttrPatch] = {}
    shapes: dict[tuple[int, ...], list[tuple[str, str]]] = {}  # a sequence attribute -> (module, attr)
    for module, ints in graph.module_ints.items():
        for attr, value in ints:
            if isinstance(value, (list, tuple)) and len(value) > 1:
                shapes.setdefault(tuple(value), []).append((module, attr))
    for op in graph.ops:
        if op.int_args:
            _shape_attribute_patches(op, graph, gone, shapes, patches)
        if not op.int_args or not op.module_ints:
            continue
        changes: dict[int, int] = {}
        out_sizes_old, out_sizes_new = [], []
        for info in op.out_infos:
            for elems in info.dims:
                if elems is None:
                    continue
                old, new = int(elems.size), _new_size(elems, graph.classes, gone)
                out_sizes_old.append(old)
                out_sizes_new.append(new)
                if old != new and old in op.int_args:
                    changes[old] = new
        if op.name.startswith("torch.nn.functional.conv") and dict(op.module_ints).get("groups", 1) > 1:
            _conv_groups_patch(op, patches, out_sizes_old, out_sizes_new)
            continue
        parts = len(op.out_infos)
        if parts > 1 and len(set(out_sizes_old)) == 1:  # equal split parts: the total may be stored instead
            changes.update({old * parts: new * parts for old, new in list(changes.items())})
        for attr, value in op.module_ints:
            if isinstance(value, int) and value in changes:
                patches.setdefault((op.module, attr), AttrPatch(op.module, attr, value, changes[value]))
            elif isinstance(value, (list, tuple)) and list(value) == out_sizes_old and out_sizes_old != out_sizes_new:
                patches.setdefault((op.module, attr), AttrPatch(op.module, attr, tuple(value), tuple(out_sizes_new)))
    return tuple(patches.values())


def _shape_attribute_patches(op, graph, gone: np.ndarray, shapes: dict, patches: dict) -> None:
    """A whole target shape kept as an attribute of the module running the op or of one of its
    submodules (``x.view(self.rel_pos.bias_shape)`` in a helper method): patch the changed dims."""
    shape_old, shape_new = _target_shape(op, graph.classes, gone)
    if shape_old == shape_new:
        return
    prefix = op.module + "." if op.module else ""
    for module, attr in shapes.get(tuple(shape_old), ()):
        if module == op.module or module.startswith(prefix):
            value = dict(graph.module_ints[module])[attr]
            patches.setdefault((module, attr), AttrPatch(module, attr, tuple(value), tuple(shape_new)))


def _target_shape(op, classes: np.ndarray, gone: np.ndarray) -> tuple[list[int], list[int]]:
    """The op's integer arguments read as its output shape, before and after removal, when
    they are exactly that (one output, one integer per dim, channel dims of matching size)."""
    if len(op.out_infos) != 1 or len(op.int_args) != len(op.out_infos[0].dims):
        return [], []
    old, new = list(op.int_args), list(op.int_args)
    for d, elems in enumerate(op.out_infos[0].dims):
        if elems is None:
            continue
        if elems.size != old[d]:
            return [], []
        new[d] = _new_size(elems, classes, gone)
    return old, new

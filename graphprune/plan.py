"""Plans: which channels to remove, resolved down to parameter slices.

A :class:`Plan` is plain data. It names, for every parameter dimension that shrinks, the
indices to keep, and the module attributes (``num_heads``, ``attn_dim``, split sizes)
whose values must follow. It serializes to JSON and re-applies to a fresh copy of the
same architecture without tracing again. Only :func:`graphprune.apply_plan_` mutates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import InvalidArgumentError
from .groups import ChannelGroup, Groups

PLAN_FORMAT = "graphprune.plan/1"


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
    """

    removed: Mapping[int, tuple[int, ...]]
    edits: tuple[ParamEdit, ...]
    patches: tuple[AttrPatch, ...] = field(default=())

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
        return json.dumps({
            "format": PLAN_FORMAT,
            "removed": {str(k): list(v) for k, v in self.removed.items()},
            "edits": [asdict(e) | {"keep": list(e.keep)} for e in self.edits],
            "patches": [asdict(p) for p in self.patches],
        })

    @staticmethod
    def from_json(text: str) -> Plan:
        """Parse a plan written by :meth:`to_json`; raises ``InvalidArgumentError`` on anything else."""
        try:
            data = json.loads(text)
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
            edits = tuple(ParamEdit(str(e["name"]), int(e["dim"]), int(e["size"]), tuple(int(i) for i in e["keep"]))
                          for e in data["edits"])
            patches = tuple(AttrPatch(str(p["module"]), str(p["attr"]), _ints(p["old"]), _ints(p["new"]))
                            for p in data["patches"])
            removed = {int(k): tuple(int(i) for i in v) for k, v in data["removed"].items()}
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgumentError(f"not a graphprune plan: {error}") from error
        return Plan(removed, edits, patches)


def _ints(value: object) -> object:
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return int(value)


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 <= ratio < 1:
        raise InvalidArgumentError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


def _count_to_remove(group: ChannelGroup, ratio: float, round_to: int) -> int:
    prunable = int(group.prunable.sum())
    size = group.size
    n = int(math.floor(ratio * size + 1e-9))
    if round_to > 1:
        keep = size - n
        keep = max(round_to, int(round(keep / round_to)) * round_to)
        n = size - keep
    return max(0, min(n, prunable, size - 1))


def select_channels(groups: Groups, scores: Mapping[int, torch.Tensor], *, ratio: float,
                    round_to: int = 1, exclude: frozenset[int] = frozenset()) -> dict[int, tuple[int, ...]]:
    """Local selection: remove the lowest-scoring ``ratio`` of every group's channels.

    Frozen channels are never selected, no group is emptied, groups in ``exclude`` are skipped.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
        >>> scores = {groups[0].id: torch.arange(8.0)}
        >>> select_channels(groups, scores, ratio=0.25)
        {0: (0, 1)}
    """
    ratio = _check_ratio(ratio)
    removed: dict[int, tuple[int, ...]] = {}
    for group in groups:
        if group.id in exclude:
            continue
        score = scores.get(group.id)
        if score is None:
            raise InvalidArgumentError(f"no score for group {group.id} ({group.name})")
        score = torch.as_tensor(score, dtype=torch.float64).flatten()
        if score.numel() != group.size:
            raise InvalidArgumentError(f"group {group.id} has {group.size} channels but {score.numel()} scores")
        if torch.isnan(score).any():
            raise InvalidArgumentError(f"scores of group {group.id} ({group.name}) contain NaN")
        n = _count_to_remove(group, ratio, round_to)
        if n == 0:
            continue
        masked = score.clone()
        masked[torch.from_numpy(~group.prunable)] = math.inf
        order = torch.argsort(masked, stable=True)[:n]
        chosen = _keep_members_nonempty(group, set(int(i) for i in order), score)
        if chosen:
            removed[group.id] = tuple(sorted(chosen))
    return removed


def _keep_members_nonempty(group: ChannelGroup, chosen: set[int], score: torch.Tensor) -> set[int]:
    """Give back, per member that would lose every index, its best-scoring channel."""
    for member in group.members:
        channels = np.unique(member.channel[member.channel >= 0])
        if channels.size and all(int(c) in chosen for c in channels):
            best = max(channels, key=lambda c: float(score[int(c)]))
            chosen.discard(int(best))
    return chosen


def make_plan(groups: Groups, scores: Mapping[int, torch.Tensor] | None = None, *, ratio: float = 0.0,
              round_to: int = 1, removed: Mapping[int, tuple[int, ...]] | None = None) -> Plan:
    """Turn per-channel scores (or an explicit selection) into a :class:`Plan`.

    Args:
        groups: from :func:`graphprune.find_groups`.
        scores: group id -> one score per channel (lower is removed first).
        ratio: fraction of each group's channels to remove, in ``[0, 1)``.
        round_to: keep a multiple of this many channels per group.
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
        removed = select_channels(groups, scores, ratio=ratio, round_to=round_to)
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
        for member in groups.by_id(gid).members:
            keep = np.flatnonzero(~np.isin(member.channel, np.asarray(removed[gid])) | (member.channel < 0))
            if keep.size < member.channel.size:
                edits.append(ParamEdit(member.name, member.dim, int(member.channel.size), tuple(int(i) for i in keep)))
    return Plan(removed, tuple(edits), _attribute_patches(graph, gone))


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
    for op in graph.ops:
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

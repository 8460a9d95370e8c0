"""Plans: which channels to remove, resolved down to parameter slices.

A :class:`Plan` is plain data. It names, for every parameter dimension that shrinks, the
indices to keep, and the module attributes (``num_heads``, ``attn_dim``, split sizes)
whose values must follow. It serializes to JSON and re-applies to a fresh copy of the
same architecture without tracing again. Only :func:`graphprune.apply_plan_` mutates.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ._runtime import json_record, paused_gc
from .errors import InvalidArgumentError
from .groups import Groups
from .patches import AttrPatch, attribute_patches
from .selection import PlanConfig, select_channels

PLAN_FORMAT = "graphprune.plan/2"


@dataclass(frozen=True)
class ParamEdit:
    """Keep only ``keep`` (sorted indices) along ``dim`` of parameter/buffer ``name`` (of size ``size``)."""

    name: str
    dim: int
    size: int
    keep: tuple[int, ...]


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
    return Plan(removed, tuple(edits), attribute_patches(graph, gone), graph.fingerprint or None)

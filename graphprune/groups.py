"""Channel groups: parameter slices that must be removed together.

A *channel* is a class of coupled elements (see :mod:`graphprune.elements`); removing it
removes, in every parameter that carries it, the indices that belong to it. A
:class:`ChannelGroup` bundles the channels that share parameters (the residual stream of
a ResNet stage, a conv and its BatchNorm, the heads of one attention layer), so a scorer
emits one score per channel of each group and a plan removes channels group by group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from ._runtime import sorted_unique
from .errors import InvalidArgumentError
from .graph import TraceGraph


@dataclass(frozen=True, eq=False)
class Member:
    """One parameter dimension in a group.

    Attributes:
        name: qualified parameter or buffer name, e.g. ``layer1.0.conv1.weight``.
        dim: the dimension that loses indices.
        channel: for every index along ``dim``, the group channel it belongs to
            (read-only ``int64`` array; ``-1`` for an index no channel of this group owns).
        role: ``"out"`` where the parameter produces the channel (conv/linear output
            rows, biases, norm affine, embeddings), ``"in"`` where it consumes it
            (conv/linear input columns).
    """

    name: str
    dim: int
    channel: np.ndarray
    role: str

    @property
    def module(self) -> str:
        """Qualified name of the module that owns the parameter."""
        return self.name.rpartition(".")[0]


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that share parameters, with everything needed to score and remove them.

    Attributes:
        id: position in :class:`Groups`.
        members: every parameter dimension that loses indices when a channel goes.
        prunable: read-only bool array, one per channel: False where the channel is frozen
            (coupled to an input, an output, an unsupported op, an ignored module, ...).
        width: read-only int array, one per channel: indices the channel spans in its
            widest member (1 for a plain channel, ``head_dim`` for a head, the group width
            for a whole conv group).
        classes: read-only int array, one per channel: its class id in the trace.
        statistic: read-only bool array, one per channel: True where a normalization or
            mean is taken over the channel (zeroing it is then not invisible downstream).
    """

    id: int
    members: tuple[Member, ...]
    prunable: np.ndarray
    width: np.ndarray
    classes: np.ndarray
    statistic: np.ndarray

    @property
    def size(self) -> int:
        """Number of channels."""
        return int(self.prunable.size)

    @property
    def name(self) -> str:
        """A readable name: the first producing member's module."""
        producers = [m for m in self.members if m.role == "out"] or list(self.members)
        return producers[0].module

    def describe(self) -> str:
        """One line for humans.

        Example:
            >>> import torch, graphprune as gp
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> gp.find_groups(gp.trace(net, torch.randn(1, 4)))[0].describe()
            'group 0 "0": 8 channels (8 prunable), 3 members'
        """
        return (f'group {self.id} "{self.name}": {self.size} channels ({int(self.prunable.sum())} prunable), '
                f"{len(self.members)} members")


@dataclass(frozen=True, eq=False)
class Groups:
    """All groups of a traced model, plus the trace they came from.

    Iterating yields the groups with at least one prunable channel.
    """

    all: tuple[ChannelGroup, ...]
    graph: TraceGraph
    frozen_reasons: dict[str, str]
    ignored_classes: dict[int, str] = None  # class -> the ignore entry that froze it

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(g for g in self.all if g.prunable.any())

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __getitem__(self, index: int) -> ChannelGroup:
        return list(self)[index]

    def by_id(self, group_id: int) -> ChannelGroup:
        return self.all[group_id]

    def report(self) -> str:
        """Multi-line summary: prunable groups, frozen ones, unsupported ops.

        Example:
            >>> import torch, graphprune as gp
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> print(gp.find_groups(gp.trace(net, torch.randn(1, 4))).report().splitlines()[0])
            1 prunable groups, 8 prunable channels; 1 groups fully frozen
        """
        prunable = list(self)
        lines = [f"{len(prunable)} prunable groups, {sum(int(g.prunable.sum()) for g in prunable)} prunable channels; "
                 f"{len(self.all) - len(prunable)} groups fully frozen"]
        lines += ["  " + g.describe() for g in prunable]
        if self.graph.unsupported:
            lines.append("unsupported ops (their channels are frozen):")
            lines += [f"  {name}: {count}x" for name, count in self.graph.unsupported.items()]
        frozen = [g for g in self.all if not g.prunable.any()]
        if frozen:
            lines.append("fully frozen groups, with the first reason recorded:")
            reasons = dict(self.ignored_classes or {})
            for c, why in self.graph.store.frozen_reasons(self.graph.classes).items():
                reasons.setdefault(c, why)
            for g in frozen:
                why = next((reasons[int(c)] for c in g.classes if int(c) in reasons), "no parameter outside it carries it")
                lines.append(f"  {g.describe()}: {why}")
        return "\n".join(lines)


def _role(graph: TraceGraph, name: str, dim: int, elems: np.ndarray) -> str:
    """``"in"`` for a dim that consumes its channels: the one a rule marked so (an ``(in, out)``
    weight in ``addmm``), else dim 1 of a 2-d+ weight; ``"out"`` otherwise."""
    marked = graph.store.role_of(elems)
    if marked is not None:
        return marked
    return "in" if dim == 1 and len(graph.state_infos[name].dims) >= 2 and name.endswith("weight") else "out"


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Modules named by timm's ``pretrained_cfg["classifier"]`` that exist in ``model``.

    Example:
        >>> import timm
        >>> classifier_names(timm.create_model("resnet18", pretrained=False))
        ('fc',)
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    modules = dict(model.named_modules())
    return tuple(n for n in names if n in modules)


def check_ignore(model: nn.Module, ignore: Any) -> tuple[str, ...]:
    """``ignore`` as a tuple of names, each a module or parameter of ``model``; anything else raises.

    Example:
        >>> from torch import nn
        >>> check_ignore(nn.Sequential(nn.Linear(2, 2)), ["0"])
        ('0',)
        >>> check_ignore(nn.Sequential(nn.Linear(2, 2)), "0")
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: ignore is a list of module names; got the string '0' (write ignore=['0'])
    """
    if isinstance(ignore, str):
        raise InvalidArgumentError(f"ignore is a list of module names; got the string {ignore!r} "
                                   f"(write ignore=[{ignore!r}])")
    try:
        names = tuple(ignore)
    except TypeError:
        raise InvalidArgumentError(f"ignore must be a list of module names, got {type(ignore).__name__}") from None
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise InvalidArgumentError(f"ignore holds {bad[0]!r}: each entry names a module or parameter (the whole "
                                   "model cannot be ignored; ratio=0 keeps every channel)")
    known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidArgumentError(f"ignore names no module or parameter of the model: {unknown}")
    return names


def find_groups(graph: TraceGraph, *, ignore: Iterable[str] = (), model: nn.Module | None = None) -> Groups:
    """Group the traced model's coupled channels.

    Args:
        graph: from :func:`graphprune.trace`.
        ignore: module names (or parameter names) whose parameters must keep every
            index; their channels, and everything coupled to them, are frozen.
        model: the traced model, used only to check that ``ignore`` names exist.

    Returns:
        :class:`Groups`.

    Raises:
        InvalidArgumentError: if an ``ignore`` name matches no module or parameter.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 1))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3, 8, 8)))
        >>> [(m.name, m.dim) for m in groups[0].members]  # doctest: +NORMALIZE_WHITESPACE
        [('0.weight', 0), ('0.bias', 0), ('1.running_mean', 0), ('1.running_var', 0), ('1.weight', 0),
         ('1.bias', 0), ('3.weight', 1)]
    """
    frozen, reasons, ignored_classes = _freeze_ignored(graph, tuple(ignore), model)
    entries = _entries(graph)
    pairs = _member_pairs(entries, frozen.size)
    if pairs is None:
        return Groups((), graph, reasons, ignored_classes)
    return Groups(_build_groups(graph, entries, frozen, *pairs), graph, reasons, ignored_classes)


def _freeze_ignored(graph: TraceGraph, ignore: tuple[str, ...], model: nn.Module | None
                    ) -> tuple[np.ndarray, dict[str, str], dict[int, str]]:
    """The frozen mask with every class an ``ignore`` entry's parameters carry added, the
    ignored parameter names, and the entry that froze each class."""
    frozen = graph.frozen.copy()
    reasons: dict[str, str] = {}
    ignored_classes: dict[int, str] = {}
    if model is not None and ignore:
        known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
        unknown = [n for n in ignore if n not in known]
        if unknown:
            raise InvalidArgumentError(f"ignore names no module or parameter of the model: {unknown}")
    for name in graph.state_infos:
        matched = next((i for i in ignore if name == i or name.startswith(i + ".")), None)
        if matched is not None:
            for d in graph.state_infos[name].dims:
                if d is not None:
                    hit = graph.classes[d[d >= 0]]
                    frozen[hit] = True
                    for c in sorted_unique(hit):
                        ignored_classes.setdefault(int(c), f"ignore={matched!r}")
            reasons[name] = "ignored"
    return frozen, reasons, ignored_classes


def _entries(graph: TraceGraph) -> list[tuple[str, int, np.ndarray]]:
    """Every (parameter, dim) that carries elements, with the class of each index (-1: none)."""
    entries = []
    for name, info in graph.state_infos.items():
        for dim, elems in enumerate(info.dims):
            if elems is not None:
                entries.append((name, dim, np.where(elems >= 0, graph.classes[np.maximum(elems, 0)], -1)))
    return entries


def _member_pairs(entries: list[tuple[str, int, np.ndarray]], n_classes: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """One (entry, class) pair per class an entry carries, for the entries that are members,
    with the kept-entry mask and how many entries carry each class (``None``: no member at all).
    Every step is linear in the pairs."""
    if not entries:
        return None
    n_entries = len(entries)
    valid = [cls[cls >= 0] for _, _, cls in entries]
    pair_entry = np.repeat(np.arange(n_entries, dtype=np.int64), [v.size for v in valid])
    pair_class = np.concatenate(valid) if valid else np.zeros(0, np.int64)
    key = sorted_unique(pair_entry * n_classes + pair_class)
    pair_entry, pair_class = key // n_classes, key % n_classes
    # a class carried by no parameter, or by parameters only once, cannot be removed meaningfully
    carried = np.bincount(pair_class, minlength=n_classes)
    # a dim whose classes are all carried by it alone (kernel taps, token positions) is no member
    kept_entry = np.bincount(pair_entry, weights=carried[pair_class] >= 2, minlength=n_entries) > 0
    if not kept_entry.any():
        return None
    keep_pair = kept_entry[pair_entry]
    return pair_entry[keep_pair], pair_class[keep_pair], kept_entry, carried


def _build_groups(graph: TraceGraph, entries: list[tuple[str, int, np.ndarray]], frozen: np.ndarray,
                  pair_entry: np.ndarray, pair_class: np.ndarray, kept_entry: np.ndarray,
                  carried: np.ndarray) -> tuple[ChannelGroup, ...]:
    """Connect classes that share a member: each connected component is one group."""
    n_classes, n_entries = frozen.size, len(entries)
    adjacency = coo_matrix((np.ones(pair_entry.size, np.int8), (pair_entry, n_entries + pair_class)),
                           shape=(n_entries + n_classes, n_entries + n_classes))
    _, component = connected_components(adjacency, directed=False)
    kept_ids = np.flatnonzero(kept_entry)
    # entries per group in entry order, groups in order of their first entry (as before)
    order = np.argsort(component[kept_ids], kind="stable")
    first_entry = {}
    for k in kept_ids[order].tolist():
        first_entry.setdefault(int(component[k]), []).append(k)
    by_component = dict(sorted(first_entry.items(), key=lambda item: item[1][0]))
    # classes per group: pairs sorted by their group, split once
    pair_group = component[pair_entry]
    order = np.argsort(pair_group, kind="stable")
    bounds = np.searchsorted(pair_group[order], np.array(list(by_component), dtype=np.int64)[:, None] + [0, 1])
    sorted_classes = pair_class[order]
    lookup = np.full(n_classes, -1, dtype=np.int64)
    groups = []
    for entry_ids, (lo, hi) in zip(by_component.values(), bounds.tolist()):
        group_classes = sorted_unique(sorted_classes[lo:hi])
        lookup[group_classes] = np.arange(group_classes.size)
        members = []
        width = np.ones(group_classes.size, dtype=np.int64)
        for k in entry_ids:
            name, dim, cls = entries[k]
            channel = np.where(cls >= 0, lookup[np.maximum(cls, 0)], -1)
            channel.setflags(write=False)
            members.append(Member(name, dim, channel, _role(graph, name, dim, graph.state_infos[name].dims[dim])))
            width = np.maximum(width, np.bincount(channel[channel >= 0], minlength=group_classes.size))
        lookup[group_classes] = -1
        prunable = ~frozen[group_classes] & (carried[group_classes] >= 2)
        statistic = graph.statistic[group_classes].copy()
        for array in (prunable, width, group_classes, statistic):
            array.setflags(write=False)
        groups.append(ChannelGroup(len(groups), tuple(members), prunable, width, group_classes, statistic))
    return tuple(groups)

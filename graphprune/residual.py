"""Residual streams: the channels a skip connection adds onto.

A channel of a residual stream is carried by every block of a stage (the add couples the
block's output with its input), so removing it narrows all of them at once and removes a
feature every later block reads. On transfer tasks such channels are the costly ones to
lose (benchmarks/README.md: EfficientNet-Lite0 -> Flowers-17); :class:`graphprune.PlanConfig`'s
``residual_scale`` prunes them at a fraction of the ratio of the other groups.

A *residual add* is a traced ``add`` / ``sub`` whose two operands are both computed from the
data: at least two of its producing ops have producers themselves. ``x + bias.view(...)``
(one operand made from a parameter alone) is not one.

Example:
    >>> import torch, graphprune as gp
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem, self.body = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)
    ...         self.mlp, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    ...     def forward(self, x):
    ...         x = torch.relu(self.stem(x))
    ...         x = x + self.body(torch.relu(x))
    ...         return self.out(torch.relu(self.mlp(x)))
    >>> groups = gp.find_groups(gp.trace(Block(), torch.randn(2, 4)))
    >>> sorted(groups.by_id(g).name for g in residual_groups(groups))
    ['stem']
"""

from __future__ import annotations

import weakref

import numpy as np

from .graph import TraceGraph
from .groups import Groups

_ADDS = frozenset({"add", "add_", "sub", "sub_", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__"})
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_residual_add(graph: TraceGraph, index: int) -> bool:
    if graph.ops[index].name.rpartition(".")[2] not in _ADDS:
        return False
    computed = [p for p in graph.graph.predecessors(index) if graph.graph.in_degree(p) > 0]
    return len(computed) >= 2


def residual_classes(graph: TraceGraph) -> np.ndarray:
    """Boolean mask over the trace's classes: True for a channel some residual add carries.

    Example:
        >>> import torch, graphprune as gp
        >>> g = gp.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.randn(1, 4))
        >>> bool(residual_classes(g).any())  # no skip connection
        False
    """
    cached = _CACHE.get(graph)
    if cached is not None:
        return cached
    mask = np.zeros(graph.frozen.size, dtype=bool)
    for op in graph.ops:
        if not _is_residual_add(graph, op.index):
            continue
        for info in op.out_infos:
            for elems in info.dims:
                if elems is not None:
                    mask[graph.classes[elems[elems >= 0]]] = True
    mask.setflags(write=False)
    _CACHE[graph] = mask
    return mask


def residual_groups(groups: Groups) -> frozenset[int]:
    """Ids of the groups with a channel on a residual stream (see the module docstring's example)."""
    mask = residual_classes(groups.graph)
    return frozenset(g.id for g in groups.all if mask[g.classes].any())

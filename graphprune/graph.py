"""The traced dependency graph: what ran, on which tensors, and what it couples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .elements import ElementStore, TensorInfo


@dataclass(frozen=True)
class OpRecord:
    """One traced torch function call.

    Attributes:
        index: position in execution order (also the node id in the graph).
        name: the function's resolved name, e.g. ``torch.nn.functional.conv2d``.
        module: qualified name of the innermost module executing it (``""`` for the root).
        int_args: the integer arguments it was called with, flattened (reshape sizes,
            split sizes, ...), used to find module attributes to update on removal.
        out_infos: element infos of its output tensors.
        rule: whether a coupling rule handled it (False: its channels were frozen).
        module_ints: integer (and integer-sequence) attributes of the executing module,
            the candidates to update when a size in ``int_args`` changes.
    """

    index: int
    name: str
    module: str
    int_args: tuple[int, ...]
    out_infos: tuple[TensorInfo, ...]
    rule: bool
    module_ints: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, eq=False)
class TraceGraph:
    """Result of :func:`graphprune.trace`.

    Attributes:
        graph: ``networkx.DiGraph`` whose nodes are op indices (attributes ``name``,
            ``module``) and whose edges follow the tensors from producer to consumer.
        ops: the :class:`OpRecord` of every node, in execution order.
        store: the element store (unions, freezes, links) built by the coupling rules.
        classes: class (removable channel) of every element.
        frozen: boolean mask over classes; True where removal is not allowed.
        state_infos: element infos of every parameter and buffer the forward used,
            keyed by qualified name (``layer1.0.conv1.weight``).
        unsupported: functions with no coupling rule that touched channels, with counts;
            their channels are frozen.
        output_infos: element infos of the model outputs (frozen).
        output_shapes: shapes of the model outputs.
        statistic: boolean mask over classes: True where a statistic (layer norm, mean,
            softmax) is taken over the class, so zeroing it changes other outputs.
    """

    graph: nx.DiGraph
    ops: tuple[OpRecord, ...]
    store: ElementStore
    classes: np.ndarray
    frozen: np.ndarray
    state_infos: dict[str, TensorInfo]
    unsupported: Counter = field(default_factory=Counter)
    output_infos: tuple[TensorInfo, ...] = ()
    output_shapes: tuple[tuple[int, ...], ...] = ()
    statistic: np.ndarray | None = None

    def summary(self) -> str:
        """One line: ops traced, elements, classes, frozen classes, unsupported ops.

        Example:
            >>> import torch, graphprune as gp
            >>> g = gp.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.randn(1, 4))
            >>> g.summary().split(",")[0]
            '2 ops'
        """
        n_classes = int(self.frozen.size)
        return (f"{len(self.ops)} ops, {self.store.size} elements, {n_classes} classes, "
                f"{int(self.frozen.sum())} frozen, unsupported: {dict(self.unsupported) or 'none'}")

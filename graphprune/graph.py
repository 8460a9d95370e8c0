"""The traced dependency graph: what ran, on which tensors, and what it couples."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from torch import nn

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


@dataclass(frozen=True)
class TracedOutput:
    """What the forward pass returned for one example input.

    Attributes:
        structure: the output's ``torch.utils._pytree`` structure (a ``TreeSpec``).
        shapes: shape of every output tensor, in :func:`~graphprune.rules.context.flat_tensors` order.
        infos: element info of every output tensor (channel dims are frozen).
        data_sized: per output tensor, whether its leading dim follows the data: an op whose
            output size does (``nonzero``, a boolean mask, ``nms``, ...) ran upstream of it, or
            its leading dim is channel-free and such an op ran in the same forward. That dim
            may differ after pruning (a detector's box count) without anything being wrong.
    """

    structure: Any
    shapes: tuple[tuple[int, ...], ...]
    infos: tuple[TensorInfo, ...]
    data_sized: tuple[bool, ...]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's parameter names, in order: what a plan records about the model it is for.

    Names, not shapes: a plan still fits after ``reset_classifier`` (only the head's class dim
    changes, which no plan edits), and :func:`graphprune.apply_plan_` checks every size it cuts.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3))
        >>> model_fingerprint(net) == model_fingerprint(torch.nn.Sequential(torch.nn.Linear(5, 1)))
        True
        >>> model_fingerprint(net) == model_fingerprint(torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False)))
        False
    """
    names = "\n".join(name for name, _ in model.named_parameters())
    return hashlib.sha256(names.encode()).hexdigest()


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
        output_infos: element infos of the model outputs (frozen), over all example inputs.
        output_shapes: shapes of the model outputs, over all example inputs.
        statistic: boolean mask over classes: True where a statistic (layer norm, mean,
            softmax) is taken over the class, so zeroing it changes other outputs.
        costs: multiply-adds of every traced product with the channel dims it scales with.
        module_ints: integer (and integer-sequence) attributes of every module, by qualified
            name, as in :attr:`OpRecord.module_ints`: a helper module's method (not its
            forward) runs under its parent's name, so its attributes are found here.
        outputs: per example input, what the forward returned (:class:`TracedOutput`).
        untraced: floating-point parameters no traced forward used, by name: the trace
            says nothing about them, so removal leaves them unchanged (and
            :func:`graphprune.prune` refuses unless ``ignore`` names them).
        fingerprint: :func:`model_fingerprint` of the traced model; plans record it.
        forward: ``"meta"`` when the traced forward ran on meta copies of the weights and inputs
            (shapes without compute), ``"real"`` when it ran on the real tensors (a forward whose
            ops need values, see :mod:`graphprune.verify_meta`).
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
    costs: tuple[tuple[int, tuple[np.ndarray, ...]], ...] = ()
    module_ints: dict[str, tuple[tuple[str, object], ...]] = field(default_factory=dict)
    outputs: tuple[TracedOutput, ...] = ()
    untraced: tuple[str, ...] = ()
    fingerprint: str = ""
    forward: str = "real"

    def estimate_macs(self, removed_classes: np.ndarray | None = None) -> int:
        """Multiply-adds of the traced products (conv, linear, matmul, attention) after removal.

        Each product's count is scaled by the kept fraction of every channel dim it runs
        over, so this is exact for the ops it covers and costs no forward pass; fvcore
        verifies it (see :mod:`graphprune.measurement`).

        Args:
            removed_classes: boolean mask over classes (None: nothing removed).

        Example:
            >>> import torch, graphprune as gp
            >>> g = gp.trace(torch.nn.Linear(4, 8), torch.randn(3, 4))
            >>> g.estimate_macs()
            96
        """
        total = 0.0
        for macs, dims in self.costs:
            scale = 1.0
            if removed_classes is not None:
                for elems in dims:
                    alive = (elems < 0) | ~removed_classes[self.classes[np.maximum(elems, 0)]]
                    scale *= alive.sum() / elems.size
            total += macs * scale
        return int(round(total))

    def summary(self) -> str:
        """One line: ops traced, elements, classes, frozen classes, unsupported ops, untraced parameters.

        Example:
            >>> import torch, graphprune as gp
            >>> g = gp.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.randn(1, 4))
            >>> g.summary().split(",")[0]
            '2 ops'
        """
        n_classes = int(self.frozen.size)
        untraced = f", untraced parameters: {list(self.untraced)}" if self.untraced else ""
        return (f"{len(self.ops)} ops, {self.store.size} elements, {n_classes} classes, "
                f"{int(self.frozen.sum())} frozen, unsupported: {dict(self.unsupported) or 'none'}{untraced}")

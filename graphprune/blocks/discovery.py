"""Block discovery: every residual branch of the traced graph becomes a removable :class:`Block`.

A residual add ``shortcut + branch`` is found in the trace as an ``add`` whose two inputs
come from ops of which one is an ancestor of the other (identity shortcut: the earlier op
is the fork) or which share a nearest common ancestor (projection shortcut, e.g. a strided
1x1 convolution). The branch is every op between the fork and the add on the branch side.
It becomes a block when the graph proves it self-contained:

* no tensor computed in the branch is read outside it (so removing it changes nothing else);
* the ops run in child modules of one block module, which run nothing outside the branch
  (so the children can be swapped without touching the block's own ``forward``);
* the block module's own ops in the branch are cheap glue (permutes, scales), not products.

Each block is then checked by running the model: the branch children swapped for
:class:`~.modules.ZeroBranch` / :class:`~.modules.Skip` must give exactly the output of the
original model with the branch's last module zeroed (``removable``), and a zero-initialized
:class:`~.modules.Proxy` must do the same (``proxy``). Residual adds that fail a check are
reported in :attr:`Blocks.skipped` with the reason, never guessed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from ..graph import TraceGraph
from ..inputs import ExampleInputs, as_args
from ..measurement.flops import analyze_macs
from ..rules.names import spellings
from ..tracer import preserved_state, trace
from .checks import branch_removal_exact, module_shapes, zeroed_output
from .modules import Proxy, ZeroBranch

ADD_OPS = frozenset(spellings("add"))
# products: a block module computing one of these itself is not glue around its children
_PRODUCT_OPS = frozenset(
    spellings("conv1d", "conv2d", "conv3d", "linear", "matmul", "bmm", "einsum", "scaled_dot_product_attention",
              functional=True) + ["torch.Tensor.__matmul__", "torch.Tensor.__rmatmul__", "torch.addmm", "torch.baddbmm"])


@dataclass(frozen=True)
class Block:
    """One removable residual branch.

    Attributes:
        name: ``module`` when the module holds one branch, else ``module:first_child``
            (a ViT block has two: ``blocks.0:norm1`` and ``blocks.0:norm2``).
        module: qualified name of the block module whose ``forward`` does the add.
        children: the block module's children the branch runs in, in execution order.
        end_module: the module with parameters whose op last produces the branch output,
            through parameter-free ops such as dropout (zero its parameters to zero the
            branch, see :func:`graphprune.testing.zero_branch_`).
        kind: ``"identity"`` (the shortcut is the block input) or ``"projection"`` (the
            shortcut has its own ops, e.g. a strided 1x1 conv; input and output shapes differ).
        input_shape: shape of the branch input in the traced pass.
        output_shape: shape of the branch output in the traced pass.
        macs: multiply-adds of the branch children (fvcore, traced input).
        params: parameter elements of the branch children.
        removable: replacing the branch by zeros is exact (identity blocks only).
        proxy: a :class:`~.modules.Proxy` can stand in for the branch (4-D convolutional
            branches whose block module adds no glue ops of its own).
        order: position of the block in execution order (0 = first).
    """

    name: str
    module: str
    children: tuple[str, ...]
    end_module: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    params: int
    removable: bool
    proxy: bool
    order: int

    def proxy_spec(self) -> dict[str, int]:
        """Channels and stride of the :class:`~.modules.Proxy` that bridges this branch.

        Example:
            >>> b = Block("b", "b", ("conv",), "b.conv", "projection", (1, 8, 8, 8), (1, 16, 4, 4), 0, 0, False, True, 0)
            >>> b.proxy_spec()
            {'in_channels': 8, 'out_channels': 16, 'stride': 2}
        """
        stride = self.input_shape[-1] // self.output_shape[-1]
        return {"in_channels": self.input_shape[1], "out_channels": self.output_shape[1], "stride": max(stride, 1)}


@dataclass(frozen=True)
class Blocks:
    """Result of :func:`find_blocks`.

    Attributes:
        blocks: the blocks, in execution order.
        skipped: ``(where, why)`` for every residual add that did not become a removable block.
        macs: multiply-adds of the whole model on the traced input.
        params: parameter elements of the whole model.
    """

    blocks: tuple[Block, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    macs: int = 0
    params: int = 0
    _by_name: dict[str, Block] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({b.name: b for b in self.blocks})

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def by_name(self, name: str) -> Block:
        """The block called ``name``; raises ``KeyError`` listing the known names."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no block {name!r}; blocks: {sorted(self._by_name)}") from None

    def candidates(self, replacement: str) -> tuple[Block, ...]:
        """Blocks that ``replacement`` (``"identity"`` or ``"proxy"``) can remove.

        Example:
            >>> Blocks(()).candidates("identity")
            ()
        """
        if replacement == "identity":
            return tuple(b for b in self.blocks if b.removable)
        return tuple(b for b in self.blocks if b.proxy)

    def report(self) -> str:
        """A table of the blocks (MACs share, params, kind, what can replace them) and the skipped adds.

        Example:
            >>> print(Blocks(()).report())
            0 blocks
        """
        lines = [f"{len(self.blocks)} blocks"]
        for b in self.blocks:
            share = b.macs / self.macs if self.macs else 0.0
            ways = "+".join(w for w, ok in (("identity", b.removable), ("proxy", b.proxy)) if ok) or "none"
            lines.append(f"  {b.name:<28} {b.kind:<10} macs {b.macs:>12,d} ({share:6.2%})  params {b.params:>10,d}"
                         f"  {tuple(b.input_shape)} -> {tuple(b.output_shape)}  removable by: {ways}")
        if self.skipped:
            lines.append(f"{len(self.skipped)} residual adds skipped:")
            lines += [f"  {where}: {why}" for where, why in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Candidate:
    add: int
    module: str
    children: tuple[str, ...]
    end_module: str
    kind: str
    glue: bool  # the block module runs ops of its own inside the branch


def _ancestors(graph: nx.DiGraph, start: int, floor: int) -> set[int]:
    """``start`` and its ancestors with index >= ``floor`` (ops run in index order)."""
    seen, stack = {start}, [start]
    while stack:
        for p in graph.predecessors(stack.pop()):
            if p >= floor and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") if n else [] for n in names]
    prefix: list[str] = []
    for level in zip(*parts):
        if any(p != level[0] for p in level):
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _child_of(module: str, parent: str) -> str | None:
    if module == parent:
        return None
    rest = module[len(parent) + 1:] if parent else module
    return rest.split(".", 1)[0]


def _candidate(graph: TraceGraph, add: int, ops_by_child: dict[str, set[int]], owners: set[str]) -> _Candidate | str:
    """The branch ending at residual add ``add``, or why it is not a block."""
    g, ops = graph.graph, graph.ops
    inputs = sorted(set(g.predecessors(add)))
    if len(inputs) != 2:
        return "not a sum of two traced tensors"
    early, late = inputs
    late_side = _ancestors(g, late, early)
    if early in late_side:  # identity shortcut: the earlier input is the fork
        fork, branch, end, kind = early, late_side - {early}, late, "identity"
        shortcut: set[int] = set()
    else:
        left, right = nx.ancestors(g, early) | {early}, nx.ancestors(g, late) | {late}
        common = left & right
        if not common:
            return "the two inputs share no traced ancestor"
        fork = max(common)
        left, right = {n for n in left if n > fork}, {n for n in right if n > fork}
        # the branch is the heavier side; the shortcut (downsample) the lighter one
        (branch, end), (shortcut, _) = sorted(((left, early), (right, late)), key=lambda s: -len(s[0]))
        kind = "projection"
    if not branch:
        return "empty branch"
    inside = branch | {add}
    for n in branch:
        if n != end and not set(g.successors(n)) <= inside:
            return f"the branch's {ops[n].name} in {ops[n].module or 'the model'} is also read outside the branch"
    if set(g.successors(end)) != {add}:
        return "the branch output is also read outside the add"
    module = _common_prefix([ops[n].module for n in inside | shortcut])
    if not module:
        return "the branch is not inside one block module"
    children: list[str] = []
    glue = False
    for n in sorted(branch):
        child = _child_of(ops[n].module, module)
        if child is None:
            if ops[n].name in _PRODUCT_OPS:
                return f"the block module computes {ops[n].name} itself"
            glue = True
        elif child not in children:
            children.append(child)
    if not children:
        return "the branch runs in no child module"
    shortcut_children = {_child_of(ops[n].module, module) for n in shortcut}
    for child in children:
        if child in shortcut_children or not ops_by_child[f"{module}.{child}"] <= branch:
            return f"{module}.{child} also runs outside the branch"
    producer = end  # walk back through parameter-free ops (dropout, identity activations)
    while ops[producer].module not in owners:
        earlier = [p for p in g.predecessors(producer) if p in branch]
        if not earlier:
            break
        producer = max(earlier)
    return _Candidate(add, module, tuple(children), ops[producer].module, kind, glue)


def _ops_by_module_prefix(graph: TraceGraph) -> dict[str, set[int]]:
    """Every module prefix -> the ops run inside it (itself or below)."""
    found: dict[str, set[int]] = defaultdict(set)
    for op in graph.ops:
        parts = op.module.split(".") if op.module else []
        for depth in range(1, len(parts) + 1):
            found[".".join(parts[:depth])].add(op.index)
    return found


def find_blocks(model: nn.Module, example_inputs: ExampleInputs = None, *, graph: TraceGraph | None = None
                ) -> Blocks:
    """Find every residual branch of ``model`` that can be removed, with its cost.

    Args:
        model: any ``nn.Module``; it is left as it was (weights, modules, mode).
        example_inputs: as for :func:`graphprune.trace` (``None``: one image of the timm
            model's default input size).
        graph: a trace of ``model`` on ``example_inputs`` to reuse.

    Returns:
        The :class:`Blocks`, in execution order, with the residual adds that were skipped.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> blocks = find_blocks(model, torch.randn(1, 3, 64, 64))
        >>> [b.name for b in blocks.candidates("identity")]
        ['layer1.0', 'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
        >>> [b.name for b in blocks if b.kind == "projection"]
        ['layer2.0', 'layer3.0', 'layer4.0']
    """
    args = as_args(model, example_inputs)
    graph = graph if graph is not None else trace(model, args)
    by_prefix = _ops_by_module_prefix(graph)
    owners = {name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    skipped: list[tuple[str, str]] = []
    candidates: list[_Candidate] = []
    for op in graph.ops:
        if op.name not in ADD_OPS:
            continue
        found = _candidate(graph, op.index, by_prefix, owners)
        if isinstance(found, str):
            if len(set(graph.graph.predecessors(op.index))) == 2:  # one-input adds (biases) are not residuals
                skipped.append((f"add in {op.module or 'the model'}", found))
        else:
            candidates.append(found)
    with preserved_state(model), torch.no_grad():
        model.eval()
        counts = analyze_macs(model, args)
        children = {f"{c.module}.{child}" for c in candidates for child in c.children}
        shapes = module_shapes(model, args, children)
        per_module = defaultdict(int)
        for c in candidates:
            per_module[c.module] += 1
        blocks = []
        for c in candidates:
            where = f"{c.module} ({', '.join(c.children)})"
            first, last = f"{c.module}.{c.children[0]}", f"{c.module}.{c.children[-1]}"
            if first not in shapes or last not in shapes or any(shapes[f"{c.module}.{k}"][2] != 1 for k in c.children):
                skipped.append((where, "a branch module is called more than once or returns no tensor"))
                continue
            in_shape, out_shape = shapes[first][0], shapes[last][1]
            macs = sum(counts.macs_by_module.get(f"{c.module}.{k}", 0) for k in c.children)
            if macs == 0:
                skipped.append((where, "the branch has no multiply-adds"))
                continue
            reference = zeroed_output(model, last, args)
            removable = c.kind == "identity" and branch_removal_exact(model, args, c, ZeroBranch(), reference)
            proxy = False
            if not c.glue and len(in_shape) == 4 and len(out_shape) == 4 and in_shape[-1] % out_shape[-1] == 0:
                spec = Proxy(in_shape[1], out_shape[1], max(in_shape[-1] // out_shape[-1], 1))
                proxy = branch_removal_exact(model, args, c, spec.to(next(model.parameters())).eval(), reference)
            if not (removable or proxy):
                skipped.append((where, "replacing the branch did not reproduce the zeroed-branch output"))
                continue
            params = sum(p.numel() for p in {id(p): p for k in c.children
                                             for p in model.get_submodule(f"{c.module}.{k}").parameters()}.values())
            name = c.module if per_module[c.module] == 1 else f"{c.module}:{c.children[0]}"
            blocks.append(Block(name, c.module, c.children, c.end_module, c.kind, in_shape, out_shape, macs, params,
                                removable, proxy, len(blocks)))
    return Blocks(tuple(blocks), tuple(skipped), counts.macs, sum(p.numel() for p in model.parameters()))

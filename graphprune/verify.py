"""Verification: a pruned model must still run on every example input and give outputs
of the structure the trace recorded; what the example inputs never reached is refused.

:func:`apply_verified_` is what :func:`graphprune.prune` applies a plan with. A group whose
removal breaks the model (its size is also computed where the graph cannot see it: a
literal in the forward code) is dropped from the plan and reported, the rest is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._runtime import sorted_unique
from .errors import InvalidArgumentError, PruneError, UntracedCodeError
from .graph import TracedOutput, TraceGraph
from .groups import Groups
from .plan import Plan, make_plan
from .removal import apply_unguarded_, restore_on_error
from .rules.context import flat_tensors
from .tracer import preserved_state

Examples = tuple[Any, ...] | list[tuple[Any, ...]]  # one call's positional arguments, or several calls'


def as_example_list(args: Examples) -> list[tuple[Any, ...]]:
    """A tuple of positional arguments is one example input; a list holds several.

    Example:
        >>> x = torch.zeros(1)
        >>> len(as_example_list((x,))), len(as_example_list([(x,), (x,)]))
        (1, 2)
    """
    return list(args) if isinstance(args, list) else [tuple(args)]


def check_coverage(graph: TraceGraph, ignore: Iterable[str] = ()) -> None:
    """Refuse to prune when the example inputs left parameters unused that ``ignore`` does not name.

    A parameter no traced forward used is coupled to nothing the graph knows: removal would
    leave it as it is and break the code path that uses it (a data-dependent branch).

    Raises:
        UntracedCodeError: naming the parameters and their modules, and what to do.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
        >>> net.forward = lambda x: net["a"](x)
        >>> graph = gp.trace(net, torch.randn(1, 2))
        >>> graph.untraced
        ('b.weight', 'b.bias')
        >>> check_coverage(graph, ignore=["b"])  # declared unused: no error
    """
    ignore = tuple(ignore)
    left = [n for n in graph.untraced if not any(n == i or n.startswith(i + ".") for i in ignore)]
    if not left:
        return
    modules = list(dict.fromkeys(n.rpartition(".")[0] or "(the model)" for n in left))
    shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    raise UntracedCodeError(
        f"the example inputs never reached {len(left)} parameters ({shown}; modules {modules[:8]}): pruning "
        "would leave them as they are and break the code that uses them. Pass example inputs that take every "
        "branch of the forward, as a list (example_inputs=[x1, x2]), or, if that code never runs at inference, "
        f"name it in ignore= (ignore={modules[:3]!r})")


def _describe(out: Any) -> tuple[Any, list[tuple[int, ...]]]:
    from torch.utils._pytree import tree_structure

    return tree_structure(out), [tuple(t.shape) for t in flat_tensors(out)]


def _compare(traced: TracedOutput, out: Any) -> str | None:
    """None if ``out`` has the traced structure and shapes, else what differs."""
    structure, shapes = _describe(out)
    if structure != traced.structure:
        return f"the output structure changed from {traced.structure} to {structure}"
    if tuple(shapes) != traced.shapes:
        return f"output shapes changed from {list(traced.shapes)} to {shapes}"
    return None


def check_outputs(model: nn.Module, examples: Examples, expected: tuple[TracedOutput, ...]) -> str | None:
    """Run ``model`` (eval mode, no grad, left as found) on each example; None if every output
    matches the traced one, else what went wrong (on which example).

    Example:
        >>> import torch, graphprune as gp
        >>> net, x = torch.nn.Linear(4, 2), torch.randn(1, 4)
        >>> print(check_outputs(net, (x,), gp.trace(net, x).outputs))
        None
        >>> check_outputs(torch.nn.Linear(4, 3), (x,), gp.trace(net, x).outputs)
        'output shapes changed from [(1, 2)] to [(1, 3)]'
    """
    examples = as_example_list(examples)
    if len(examples) != len(expected):
        raise InvalidArgumentError(f"{len(examples)} example inputs to verify, but the trace ran {len(expected)}")
    for number, (args, traced) in enumerate(zip(examples, expected), start=1):
        where = f" (example input {number} of {len(examples)})" if len(examples) > 1 else ""
        try:
            with preserved_state(model), torch.no_grad():
                model.eval()
                out = model(*args)
        except Exception as error:  # the pruned model's own failure is the report
            return f"{type(error).__name__}: {error}{where}"
        problem = _compare(traced, out)
        if problem is not None:
            return problem + where
    return None


def _suspects(groups: Groups, plan: Plan) -> list[int]:
    """Groups whose sizes appear as integer arguments of traced ops (reshape targets, split sizes)."""
    graph = groups.graph
    owner = np.full(graph.frozen.size, -1, dtype=np.int64)
    for g in groups.all:
        owner[g.classes] = g.id
    found: set[int] = set()
    for op in graph.ops:
        if not op.int_args:
            continue
        for info in op.out_infos:
            for elems in info.dims:
                if elems is not None and elems.size in op.int_args:
                    ids = owner[graph.classes[elems[elems >= 0]]]
                    found.update(int(i) for i in sorted_unique(ids) if i >= 0)
    return sorted(found & set(plan.removed))


def apply_verified_(model: nn.Module, groups: Groups, plan: Plan, args: Examples) -> tuple[Plan, dict[int, str]]:
    """Apply ``plan`` and check the pruned model still runs on every example; drop groups that break it.

    If the full plan fails, each suspect group (one whose size is an integer argument of a
    traced op) is tried alone on the model and undone; the plan is rebuilt without the
    failing ones and applied once more.

    Args:
        model: pruned in place.
        groups: the groups the plan was made from (their trace holds the expected outputs).
        plan: the plan to apply.
        args: the positional arguments of the traced call, or a list of them, one per
            example input the graph was traced on.

    Returns:
        The plan actually applied, and ``{group_id: error}`` for the groups left unpruned.

    Raises:
        PruneError: if the model still does not run; it is left unchanged.

    Example:
        >>> import torch, graphprune as gp
        >>> net, x = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), torch.randn(1, 4)
        >>> groups = gp.find_groups(gp.trace(net, x))
        >>> applied, dropped = apply_verified_(net, groups, gp.make_plan(groups, removed={0: (0, 1)}), (x,))
        >>> net[0].out_features, dropped
        (6, {})
    """
    expected = groups.graph.outputs
    failing: dict[int, str] = {}
    for attempt in range(2):
        error = _try_apply(model, plan, args, expected, keep=True)
        if error is None:
            return plan, failing
        if attempt == 1:
            break
        for gid in _suspects(groups, plan):
            alone = make_plan(groups, removed={gid: plan.removed[gid]})
            alone_error = _try_apply(model, alone, args, expected, keep=False)
            if alone_error is not None:
                failing[gid] = alone_error
        if not failing:
            break
        plan = make_plan(groups, removed={k: v for k, v in plan.removed.items() if k not in failing})
    raise PruneError(f"the pruned model does not run ({error}); the model was left unchanged")


def _try_apply(model: nn.Module, plan: Plan, args: Examples, expected, *, keep: bool) -> str | None:
    """Apply ``plan``; undo it if the model then fails (or always, unless ``keep``). Returns the failure."""
    try:
        with restore_on_error(model):
            apply_unguarded_(model, plan)
            error = check_outputs(model, args, expected)
            if error is not None or not keep:
                raise _Undo(error)
    except _Undo as undo:
        return undo.args[0]
    return None


class _Undo(Exception):
    pass

"""Verification: a pruned model must still run on every example input and give outputs
of the structure the trace recorded; what the example inputs never reached is refused.

What "the same outputs" means: the same pytree structure, the same number of tensors, each
of the same rank and of the same size in every dim, except the leading dim of a tensor the
trace found to follow the data (:attr:`graphprune.graph.TracedOutput.data_sized`: an op whose
output size follows the values, ``nonzero``, a boolean mask, ``nms``, ran before it), as in
detection heads, whose box count changes with any change of weights.

:func:`apply_verified_` is what :func:`graphprune.prune` applies a plan with. A group whose
removal breaks the model (its size is also computed where the graph cannot see it: a
literal in the forward code, an index kept in a buffer) is found by bisection over the
plan's groups, dropped and reported; the rest is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError, PruneError, UntracedCodeError
from .graph import TracedOutput, TraceGraph
from .groups import Groups
from .plan import Plan, make_plan
from .removal import apply_unguarded_, restore_on_error
from .rules.context import flat_tensors
from .tracer import preserved_state
from .verify_meta import meta_is_cheaper, meta_outputs

Examples = tuple[Any, ...] | list[tuple[Any, ...]]  # one call's positional arguments, or several calls'
VERIFICATION_ATTR = "graphprune_verification"  # how the applied plan was verified: "meta" or "real"


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
    """None if ``out`` matches the traced output (see the module docstring), else what differs."""
    structure, shapes = _describe(out)
    if structure != traced.structure:
        return f"the output structure changed from {traced.structure} to {structure}"
    if len(shapes) != len(traced.shapes):
        return f"the model returned {len(shapes)} tensors instead of {len(traced.shapes)}"
    for number, (old, new, info, data_sized) in enumerate(zip(traced.shapes, shapes, traced.infos,
                                                              traced.data_sized)):
        if len(old) != len(new):
            return f"output tensor {number} has {len(new)} dims instead of {len(old)}"
        for dim, (a, b, elems) in enumerate(zip(old, new, info.dims)):
            if a != b and (dim > 0 or not data_sized):
                kind = "channel" if elems is not None else "channel-free"
                return (f"output shapes changed from {list(traced.shapes)} to {shapes} (tensor {number}, {kind} "
                        f"dim {dim}: {a} -> {b})")
    return None


def check_outputs(model: nn.Module, examples: Examples, expected: tuple[TracedOutput, ...], *,
                  meta: bool = True, modes: list[str] | None = None) -> str | None:
    """Run ``model`` (eval mode, no grad, left as found) on each example; None if every output
    matches the traced one, else what went wrong (on which example).

    With ``meta``, each example runs on the meta device first
    (:func:`graphprune.verify_meta.meta_outputs`: shapes without compute); only when that cannot
    confirm the model (an error, an op reading integer tensors, a mismatch) does the real forward
    run and decide. ``modes``, if given, gets ``"meta"`` or ``"real"`` for each example checked.

    Example:
        >>> import torch, graphprune as gp
        >>> net, x = torch.nn.Linear(4, 2), torch.randn(1, 4)
        >>> print(check_outputs(net, (x,), gp.trace(net, x).outputs))
        None
        >>> check_outputs(torch.nn.Linear(4, 3), (x,), gp.trace(net, x).outputs)
        'output shapes changed from [(1, 2)] to [(1, 3)] (tensor 0, channel dim 1: 2 -> 3)'
    """
    examples = as_example_list(examples)
    if len(examples) != len(expected):
        raise InvalidArgumentError(f"{len(examples)} example inputs to verify, but the trace ran {len(expected)}")
    for number, (args, traced) in enumerate(zip(examples, expected), start=1):
        where = f" (example input {number} of {len(examples)})" if len(examples) > 1 else ""
        out = meta_outputs(model, args) if meta else None
        if out is not None and _compare(traced, out) is None:
            if modes is not None:
                modes.append("meta")
            continue
        if modes is not None:
            modes.append("real")
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


def apply_verified_(model: nn.Module, groups: Groups, plan: Plan, args: Examples) -> tuple[Plan, dict[int, str]]:
    """Apply ``plan`` and check the pruned model still runs on every example; drop groups that break it.

    If the full plan fails, its groups are bisected: a half that runs (with the groups
    already accepted) is kept, a half that fails is split again, down to the single groups
    that fail; only those are dropped. Each trial is undone before the next.

    Args:
        model: pruned in place.
        groups: the groups the plan was made from (their trace holds the expected outputs).
        plan: the plan to apply.
        args: the positional arguments of the traced call, or a list of them, one per
            example input the graph was traced on.

    Returns:
        The plan actually applied, and ``{group_id: error}`` for the groups left unpruned. The
        model's ``graphprune_verification`` says how the applied plan was checked: ``"meta"``
        (shapes on the meta device, chosen where :func:`~graphprune.verify_meta.meta_is_cheaper`
        says so for the traced graph's MACs and ops) or ``"real"``.

    Raises:
        PruneError: if no group can be removed without breaking the model (with the full
            plan's error); the model is left unchanged.

    Example:
        >>> import torch, graphprune as gp
        >>> net, x = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), torch.randn(1, 4)
        >>> groups = gp.find_groups(gp.trace(net, x))
        >>> applied, dropped = apply_verified_(net, groups, gp.make_plan(groups, removed={0: (0, 1)}), (x,))
        >>> net[0].out_features, dropped
        (6, {})
    """
    expected = groups.graph.outputs
    modes: list[str] = []
    meta = meta_is_cheaper(groups.graph.estimate_macs(), len(groups.graph.ops))
    error = _try_apply(model, plan, args, expected, keep=True, modes=modes, meta=meta)
    if error is None:
        _note_verification(model, modes)
        return plan, {}
    accepted: dict[int, tuple[int, ...]] = {}
    failing: dict[int, str] = {}
    ids = sorted(plan.removed)
    if len(ids) > 1:
        _bisect(model, groups, plan, args, ids[:len(ids) // 2], accepted, failing, meta)
        _bisect(model, groups, plan, args, ids[len(ids) // 2:], accepted, failing, meta)
    if accepted:
        kept = make_plan(groups, removed=accepted)
        modes.clear()
        if _try_apply(model, kept, args, expected, keep=True, modes=modes, meta=meta) is None:
            _note_verification(model, modes)
            return kept, failing
    raise PruneError(f"the pruned model does not run ({error}); the model was left unchanged")


def _bisect(model: nn.Module, groups: Groups, plan: Plan, args: Examples, ids: list[int],
            accepted: dict[int, tuple[int, ...]], failing: dict[int, str], meta: bool) -> None:
    """Accept the groups ``ids`` if the model runs with them and those already accepted; else halve."""
    trial = {**accepted, **{gid: plan.removed[gid] for gid in ids}}
    error = _try_apply(model, make_plan(groups, removed=trial), args, groups.graph.outputs, keep=False, meta=meta)
    if error is None:
        accepted.update((gid, plan.removed[gid]) for gid in ids)
    elif len(ids) == 1:
        failing[ids[0]] = error
    else:
        _bisect(model, groups, plan, args, ids[:len(ids) // 2], accepted, failing, meta)
        _bisect(model, groups, plan, args, ids[len(ids) // 2:], accepted, failing, meta)


def _note_verification(model: nn.Module, modes: list[str]) -> None:
    """``model.graphprune_verification``: ``"meta"`` if every example was confirmed on the meta
    device, else ``"real"`` (at least one needed the real forward)."""
    setattr(model, VERIFICATION_ATTR, "meta" if modes and all(m == "meta" for m in modes) else "real")


def _try_apply(model: nn.Module, plan: Plan, args: Examples, expected, *, keep: bool,
               modes: list[str] | None = None, meta: bool = True) -> str | None:
    """Apply ``plan``; undo it if the model then fails (or always, unless ``keep``). Returns the failure."""
    try:
        with restore_on_error(model):
            apply_unguarded_(model, plan)
            error = check_outputs(model, args, expected, meta=meta, modes=modes)
            if error is not None or not keep:
                raise _Undo(error)
    except _Undo as undo:
        return undo.args[0]
    return None


class _Undo(Exception):
    pass

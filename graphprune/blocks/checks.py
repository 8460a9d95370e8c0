"""A found block checked by running the model: its branch swapped for stand-ins, outputs compared exactly.

Example:
    >>> import torch
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> x = torch.randn(1, 2)
    >>> same_outputs(net(x), net(x)), same_outputs(net(x), zeroed_output(net, "0", (x,)))
    (True, False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from .modules import Skip, ZeroBranch  # noqa: F401  (ZeroBranch: docstring example)

EXACT_TOLERANCE = 1e-5  # relative max difference for "exact" (float32 summation noise is far below)


class HasBranch(Protocol):
    """A block or a candidate: the block module and the children its branch runs."""

    module: str
    children: tuple[str, ...]


@contextlib.contextmanager
def swapped(model: nn.Module, module: str, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily replace children of ``model.get_submodule(module)``; always put them back.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> with swapped(net, "", {"0": Skip()}):
        ...     type(net[0]).__name__
        'Skip'
        >>> type(net[0]).__name__
        'Linear'
    """
    parent = model.get_submodule(module)
    saved = {name: parent._modules[name] for name in replacements}
    try:
        for name, child in replacements.items():
            parent._modules[name] = child
        yield
    finally:
        parent._modules.update(saved)


def branch_replacements(block: HasBranch, first: nn.Module) -> dict[str, nn.Module]:
    """``{child: module}`` that removes ``block``'s branch: ``first`` for its first child, ``Skip`` for the rest.

    Example:
        >>> from types import SimpleNamespace
        >>> block = SimpleNamespace(module="layer1.0", children=("conv1", "bn1"))
        >>> {k: type(v).__name__ for k, v in branch_replacements(block, ZeroBranch()).items()}
        {'conv1': 'ZeroBranch', 'bn1': 'Skip'}
    """
    return {child: (first if i == 0 else Skip()) for i, child in enumerate(block.children)}


def first_tensor(value) -> torch.Tensor | None:
    """A module's tensor (or the first of a tuple of them), else None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def module_shapes(model: nn.Module, args: tuple, names: set[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], int]]:
    """``name -> (input shape, output shape, calls)`` of the named modules in one forward pass."""
    found: dict[str, list] = {}
    handles = []

    def hook(name: str):
        def record(_m, inputs, output):
            entry = found.setdefault(name, [None, None, 0])
            x, y = first_tensor(inputs), first_tensor(output)
            if entry[2] == 0 and x is not None and y is not None:
                entry[0], entry[1] = tuple(x.shape), tuple(y.shape)
            entry[2] += 1
        return record

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0], v[1], v[2]) for k, v in found.items() if v[0] is not None}


def zeroed_output(model: nn.Module, module: str, args: tuple):
    """The model's output with ``module``'s output replaced by zeros (what removing its branch must give)."""
    handle = model.get_submodule(module).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    try:
        return model(*args)
    finally:
        handle.remove()


def same_outputs(a, b) -> bool:
    """Same tensors, same shapes, equal to :data:`EXACT_TOLERANCE` of the largest magnitude."""
    xs = [t for t in (a if isinstance(a, (tuple, list)) else (a,)) if isinstance(t, torch.Tensor)]
    ys = [t for t in (b if isinstance(b, (tuple, list)) else (b,)) if isinstance(t, torch.Tensor)]
    if len(xs) != len(ys) or not xs:
        return False
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            return False
        x, y = x.detach(), y.detach()  # outputs of a model whose weights require grad: values only
        scale = float(x.abs().max()) or 1.0
        if float((x - y).abs().max()) > EXACT_TOLERANCE * scale:
            return False
    return True


def branch_removal_exact(model: nn.Module, args: tuple, candidate: HasBranch, first: nn.Module, reference) -> bool:
    """The model with ``candidate``'s branch replaced (``first`` + ``Skip``) gives ``reference`` exactly; a failure to run is False."""
    try:
        with swapped(model, candidate.module, branch_replacements(candidate, first)):
            return same_outputs(model(*args), reference)
    except Exception:  # a child called with a signature or shape a stand-in cannot take
        return False

"""Rule keys: the exact names under which torch reports an operation, and the tables they fill.

The tracer keys every call by ``torch.overrides.resolve_name`` (a dotted path that, evaluated,
gives back the function) or, for the few builtins it does not know, their ``__qualname__``. A
rule key is therefore *real* when it resolves to a torch callable: :func:`torch_callable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def torch_callable(name: str) -> Callable | None:
    """The torch callable a rule key names, or ``None``.

    ``torch.``-rooted names resolve from ``torch``; any other (the ``__qualname__`` of a builtin
    of ``torch._C``, which the tracer falls back to) from ``torch._C``.

    Example:
        >>> torch_callable("torch.Tensor.__radd__") is torch.Tensor.__radd__
        True
        >>> torch_callable("torch.nn.functional.add"), torch_callable("torch.float")  # no such function; a dtype
        (None, None)
    """
    head, *path = name.split(".")
    obj: Any = torch if head == "torch" else getattr(torch._C, head, None)
    for part in path:
        obj = getattr(obj, part, None)
    return obj if callable(obj) else None


def spellings(*bases: str, functional: bool = False) -> list[str]:
    """Every name under which ``torch.X`` / ``Tensor.X`` / ``Tensor.X_`` / operators arrive in this torch.

    Of ``torch.X``, ``torch.Tensor.X``, ``X_``, ``__X__``, ``__rX__``, ``__iX__``, ``torch.special.X``,
    ``torch._C._nn.X`` (and ``torch.nn.functional.X`` with ``functional``), only those that name a
    torch callable (:func:`torch_callable`) are returned: no key names nothing.

    Example:
        >>> "torch.Tensor.__radd__" in spellings("add"), "torch.nn.functional.add" in spellings("add", functional=True)
        (True, False)
    """
    names: list[str] = []
    for base in bases:
        names += [f"torch.{base}", f"torch.Tensor.{base}", f"torch.Tensor.{base}_",
                  f"torch.Tensor.__{base}__", f"torch.Tensor.__r{base}__", f"torch.Tensor.__i{base}__",
                  f"torch.special.{base}", f"torch._C._nn.{base}", f"torch._C._nn.{base}_"]
        if functional:
            names += [f"torch.nn.functional.{base}", f"torch.nn.functional.{base}_"]
    return [name for name in dict.fromkeys(names) if torch_callable(name) is not None]


def register_in(table: dict[str, F], names: Iterable[str], what: str) -> Callable[[F], F]:
    """Decorator: put the function in ``table`` under each of ``names``; a name already there raises.

    Example:
        >>> table = {}
        >>> _ = register_in(table, ["torch.relu"], "rule")(print)
        >>> register_in(table, ["torch.relu"], "rule")(print)
        Traceback (most recent call last):
        ...
        ValueError: a rule for 'torch.relu' is already registered
    """
    names = list(dict.fromkeys(names))

    def wrap(fn: F) -> F:
        taken = [name for name in names if name in table]
        if taken:
            raise ValueError(f"a {what} for {taken[0]!r} is already registered")
        for name in names:
            table[name] = fn
        return fn

    return wrap

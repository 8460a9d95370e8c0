"""Coupling rules, looked up by the exact name of the torch function that ran.

A rule receives the :class:`Call` (function, arguments, output, executing module) and the
:class:`~graphprune.rules.context.Context`; it records unions, freezes and links between
elements and returns the :class:`~graphprune.elements.TensorInfo` of every output tensor.
Functions without a rule freeze every channel they touch and are reported as
unsupported: they are never assumed safe.

Add a rule for your own function with :func:`register_rule`:

Example:
    >>> from graphprune.rules import RULES, register_rule
    >>> @register_rule("mylib.my_identity")
    ... def _identity(ctx, call):
    ...     return [ctx.info(call.tensor_args[0])]
    >>> "mylib.my_identity" in RULES
    True
"""

from __future__ import annotations

from collections.abc import Callable

from .context import Call, Context
from .names import register_in

Rule = Callable[[Context, Call], list]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``rule`` for the torch functions named ``names`` (as ``torch.overrides.resolve_name`` gives them).

    Raises:
        ValueError: a name has a rule already (none of ``names`` is registered then).
    """
    return register_in(RULES, names, "coupling rule")


# rule modules register themselves on import
from . import (  # noqa: E402,F401
    attention_mha, creation, elementwise, layers, movement, products, recurrent, reductions, shuffle,
    transposed,
)

__all__ = ["Call", "Context", "RULES", "register_rule"]

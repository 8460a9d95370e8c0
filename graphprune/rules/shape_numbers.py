"""Channel counts read from a shape and used as numbers: ``x / math.sqrt(x.shape[1])``.

A count read from ``x.shape`` that becomes a *size* (``reshape(B, C, -1)``, ``new_zeros``) follows
the removal, and the rules tie it (:mod:`~graphprune.rules.movement`). One that becomes a
*value* changes the computation: RAFT divides its correlation volume by
``torch.sqrt(torch.tensor(C))``, so removing even a zeroed channel rescales every output.
Python arithmetic is invisible to the trace, so this looks at what reaches torch: a number
argument of an arithmetic op or of ``torch.tensor`` that equals ``C``, ``sqrt(C)``, ``1/C`` or
``1/sqrt(C)`` for a channel count ``C`` read from a shape in the same module call freezes
the channels of that count, with the reason recorded. A coincidence (a literal ``0.5`` next
to a 4-channel read) freezes more than needed, never less.

Example:
    >>> import math, torch, graphprune as gp
    >>> class Scaled(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         return self.b(y / math.sqrt(y.shape[-1]))
    >>> groups = gp.find_groups(gp.trace(Scaled(), torch.randn(1, 3)))
    >>> len(groups), "used as the number 2.828" in groups.report()
    (0, True)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .names import spellings

if TYPE_CHECKING:
    from .context import Call, Context

ARITHMETIC = frozenset(spellings("add", "sub", "mul", "div", "true_divide", "floor_divide", "truediv", "rsub", "pow",
                                 "fmod", "remainder", functional=True))
CREATION = frozenset({"torch.tensor", "torch.as_tensor", "torch.scalar_tensor"})


def _numbers(call: Call) -> list[float]:
    if call.name in CREATION:
        values = call.args[:1]
    elif call.name in ARITHMETIC:
        values = list(call.args) + list(call.kwargs.values())
    else:
        return []
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _matches(value: float, count: int) -> bool:
    return any(math.isclose(value, f, rel_tol=1e-6) for f in (count, math.sqrt(count), 1 / count, count ** -0.5))


def freeze_counts_used_as_numbers(ctx: Context, call: Call) -> None:
    """Freeze the channel dims read from a shape in ``call.module`` whose count ``call`` uses as a number."""
    reads = ctx.shape_reads.get(call.module)
    if not reads:
        return
    numbers = _numbers(call)
    if not numbers:
        return
    for dim in reads:
        hit = next((v for v in numbers if _matches(v, dim.size)), None)
        if hit is not None:
            saved = ctx.store.current
            ctx.store.current = (f"a channel count ({dim.size}) read from a shape, used as the number {hit:.4g} "
                                 f"in {call.name} in {call.module or 'the model'}")
            ctx.store.freeze(dim)
            ctx.store.current = saved

"""Channel counts read from a shape and used as numbers: ``x / math.sqrt(x.shape[1])``.

A count read from ``x.shape`` that becomes a *size* (``reshape(B, C, -1)``, ``new_zeros``) follows
the removal, and the rules tie it (:mod:`~graphprune.rules.movement`). One that becomes a
*value* changes the computation: RAFT divides its correlation volume by
``torch.sqrt(torch.tensor(C))``, so removing even a zeroed channel rescales every output.
Python arithmetic is invisible to the trace, so this looks at what reaches torch: a number
argument of an arithmetic op or of ``torch.tensor`` that equals ``C``, ``sqrt(C)``, ``1/C`` or
``1/sqrt(C)`` for a channel count ``C`` read from a shape in the same module call, *and* that
can have come from a shape (:func:`may_come_from_a_shape`), freezes the channels of that count,
with the reason recorded. The second test reads the bytecode of the Python code that called
the op: a number is from a shape when its expression reads ``.shape`` / ``.size`` or a local
assigned from one; a function argument is followed to the caller's expression. So Hugging
Face's ``logits * scaling`` (``scaling = head_dim ** -0.5``, set in ``__init__``) does not
freeze 4 heads read from a shape because ``16 ** -0.5 == 1 / 4``. Where the code cannot be
read (no Python caller), equal values still freeze: more than needed, never less.

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

import dis
import functools
import inspect
import math
import os
import sys
import types
from typing import TYPE_CHECKING

import torch

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


_SHAPE_ATTRS = frozenset({"shape", "size"})
_LOADS = frozenset({"LOAD_DEREF", "LOAD_NAME", "LOAD_CLASSDEREF"})
_STORES = frozenset({"STORE_DEREF", "STORE_NAME"})
_ENDS = frozenset({"POP_TOP", "RETURN_VALUE", "RETURN_CONST"})
_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep
# frames that are not the model's code: the rules, the recorder, the meta run's value watch, torch itself
_SKIPPED = (os.path.dirname(__file__) + os.sep, _PACKAGE + "tracer.py", _PACKAGE + "verify_meta.py",
            os.path.dirname(torch.__file__) + os.sep)
_MAX_CALLERS = 8  # function arguments followed this many callers up; further: assumed from a shape


@functools.lru_cache(maxsize=4096)
def _statements(code: types.CodeType) -> tuple[tuple[tuple[int, str, tuple], ...], ...]:
    """``code`` cut where a value is stored or dropped (one statement, roughly), each piece a tuple of
    ``(offset, kind, names)`` events: ``"load"`` of locals, ``"shape"`` (a ``.shape`` / ``.size``
    read), ``"store"`` to locals, and last ``"end"``, at the piece's last instruction."""
    pieces, events = [], []
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
        op = ins.opname
        if op.startswith("LOAD_FAST") or op in _LOADS:
            events.append((ins.offset, "load", names))
        elif op in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval in _SHAPE_ATTRS:
            events.append((ins.offset, "shape", ()))
        if op.startswith("STORE_FAST") or op in _STORES:
            events.append((ins.offset, "store", names[:1]))
        if op.startswith("STORE_") or op in _ENDS:
            following = instructions[i + 1].opname if i + 1 < len(instructions) else ""
            if not following.startswith("STORE_"):  # a, b = ...: one piece for every target
                pieces.append((*events, (ins.offset, "end", ())))
                events = []
    if events:
        pieces.append((*events, (instructions[-1].offset, "end", ())))
    return tuple(pieces)


def _numeric(value: object) -> bool:
    """A value a count can hide in: a number, or a tuple/list/Size of numbers (not a tensor, module, ...)."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tainted(code: types.CodeType, values: dict) -> set[str]:
    """Locals of ``code`` that may hold a number from a shape: assigned in a statement that reads a
    shape or such a local (flow-insensitive, to a fixed point); a local holding a tensor never is."""
    tainted: set[str] = set()
    changed = True
    while changed:
        changed = False
        for piece in _statements(code):
            stores = [n for _, kind, names in piece if kind == "store" for n in names]
            if not stores or not any(kind == "shape" or (kind == "load" and tainted.intersection(names))
                                     for _, kind, names in piece):
                continue
            for name in stores:
                if name not in tainted and (name not in values or _numeric(values[name])):
                    tainted.add(name)
                    changed = True
    return tainted


def _caller(frame: types.FrameType | None) -> types.FrameType | None:
    """The first frame outside torch and graphprune's tracing code."""
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    return frame


def may_come_from_a_shape(frame: types.FrameType | None) -> bool:
    """Whether the number arguments of the torch call ``frame`` is making may derive from a shape read.

    Reads the expression (statement) being evaluated, up to the call: a ``.shape`` / ``.size``
    read, or a number-valued local assigned from one, says yes; a number-valued function argument
    sends the question to the caller's expression; anything else (a literal, an attribute such as
    ``self.scaling``) says no. Unknown (no Python frame, too deep) says yes.

    Example:
        >>> import sys
        >>> def scaled(x, c):
        ...     return may_come_from_a_shape(sys._getframe())
        >>> scaled(None, 0.25), (lambda n: scaled(None, n ** -0.5))((1, 16)[1])
        (False, False)
        >>> def read(shape):
        ...     c = shape[1]
        ...     return scaled(None, c ** -0.5)
        >>> read(torch.zeros(1, 16).shape)
        False
    """
    for _ in range(_MAX_CALLERS):
        frame = _caller(frame)
        if frame is None:
            return True
        code, values = frame.f_code, frame.f_locals
        piece = next((p for p in _statements(code) if p[-1][0] >= frame.f_lasti), ())
        before = [(kind, names) for offset, kind, names in piece if offset <= frame.f_lasti]
        if any(kind == "shape" for kind, _ in before):
            return True
        loaded = {n for kind, names in before if kind == "load" for n in names if _numeric(values.get(n, 0))}
        if loaded & _tainted(code, values):
            return True
        arguments = code.co_argcount + code.co_kwonlyargcount
        arguments += bool(code.co_flags & inspect.CO_VARARGS) + bool(code.co_flags & inspect.CO_VARKEYWORDS)
        if not loaded & set(code.co_varnames[:arguments]):
            return False
        frame = frame.f_back
    return True


def freeze_counts_used_as_numbers(ctx: Context, call: Call) -> None:
    """Freeze the channel dims read from a shape in ``call.module`` whose count ``call`` uses as a
    number that may come from a shape (:func:`may_come_from_a_shape`)."""
    reads = ctx.shape_reads.get(call.module)
    if not reads:
        return
    numbers = _numbers(call)
    if not numbers:
        return
    from_shape = None  # read the caller's code only when a value matches
    for dim in reads:
        hit = next((v for v in numbers if _matches(v, dim.size)), None)
        if hit is not None and from_shape is None:
            from_shape = may_come_from_a_shape(sys._getframe(1))
        if hit is not None and from_shape:
            saved = ctx.store.current
            ctx.store.current = (f"a channel count ({dim.size}) read from a shape, used as the number {hit:.4g} "
                                 f"in {call.name} in {call.module or 'the model'}")
            ctx.store.freeze(dim)
            ctx.store.current = saved

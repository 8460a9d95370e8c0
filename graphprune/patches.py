"""Attribute patches: the module attributes a removal must update (``num_heads``, conv
``groups``, reshape targets held as attributes), inferred from the trace.

:func:`attribute_patches` reads every traced op whose integer arguments the removal changes
and finds the module attributes that held them; :class:`AttrPatch` is one such update, part of
a :class:`~graphprune.plan.Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AttrPatch:
    """Set ``module.attr`` from ``old`` to ``new`` (an int or a tuple/list of ints)."""

    module: str
    attr: str
    old: object
    new: object


def _new_size(elems: np.ndarray, classes: np.ndarray, gone: np.ndarray) -> int:
    alive = elems < 0
    alive |= ~gone[classes[np.maximum(elems, 0)]]
    return int(alive.sum())


def _conv_groups_patch(op, patches: dict, old_sizes: list[int], new_sizes: list[int]) -> None:
    """A grouped conv that lost whole groups (see :mod:`graphprune.rules.layers`) has fewer groups."""
    attrs = dict(op.module_ints)
    groups, c_in, c_out = attrs["groups"], attrs.get("in_channels"), attrs.get("out_channels")
    if not (c_in and c_out and old_sizes and old_sizes[0] == c_out):
        return
    if groups >= c_in // groups and new_sizes[0] != c_out:
        new_groups = groups * new_sizes[0] // c_out
        patches.setdefault((op.module, "groups"), AttrPatch(op.module, "groups", groups, new_groups))


def attribute_patches(graph, gone: np.ndarray) -> tuple[AttrPatch, ...]:
    """Module attributes that hold a size which the removal changes (reshape targets, split sizes)."""
    if not gone.any():
        return ()
    patches: dict[tuple[str, str], AttrPatch] = {}
    shapes: dict[tuple[int, ...], list[tuple[str, str]]] = {}  # a sequence attribute -> (module, attr)
    for module, ints in graph.module_ints.items():
        for attr, value in ints:
            if isinstance(value, (list, tuple)) and len(value) > 1:
                shapes.setdefault(tuple(value), []).append((module, attr))
    for op in graph.ops:
        if op.int_args:
            _shape_attribute_patches(op, graph, gone, shapes, patches)
        if not op.int_args or not op.module_ints:
            continue
        changes: dict[int, int] = {}
        out_sizes_old, out_sizes_new = [], []
        for info in op.out_infos:
            for elems in info.dims:
                if elems is None:
                    continue
                old, new = int(elems.size), _new_size(elems, graph.classes, gone)
                out_sizes_old.append(old)
                out_sizes_new.append(new)
                if old != new and old in op.int_args:
                    changes[old] = new
        if op.name.startswith("torch.nn.functional.conv") and dict(op.module_ints).get("groups", 1) > 1:
            _conv_groups_patch(op, patches, out_sizes_old, out_sizes_new)
            continue
        parts = len(op.out_infos)
        if parts > 1 and len(set(out_sizes_old)) == 1:  # equal split parts: the total may be stored instead
            changes.update({old * parts: new * parts for old, new in list(changes.items())})
        for attr, value in op.module_ints:
            if isinstance(value, int) and value in changes:
                patches.setdefault((op.module, attr), AttrPatch(op.module, attr, value, changes[value]))
            elif isinstance(value, (list, tuple)) and list(value) == out_sizes_old and out_sizes_old != out_sizes_new:
                patches.setdefault((op.module, attr), AttrPatch(op.module, attr, tuple(value), tuple(out_sizes_new)))
    return tuple(patches.values())


def _shape_attribute_patches(op, graph, gone: np.ndarray, shapes: dict, patches: dict) -> None:
    """A whole target shape kept as an attribute of the module running the op or of one of its
    submodules (``x.view(self.rel_pos.bias_shape)`` in a helper method): patch the changed dims."""
    shape_old, shape_new = _target_shape(op, graph.classes, gone)
    if shape_old == shape_new:
        return
    prefix = op.module + "." if op.module else ""
    for module, attr in shapes.get(tuple(shape_old), ()):
        if module == op.module or module.startswith(prefix):
            value = dict(graph.module_ints[module])[attr]
            patches.setdefault((module, attr), AttrPatch(module, attr, tuple(value), tuple(shape_new)))


def _target_shape(op, classes: np.ndarray, gone: np.ndarray) -> tuple[list[int], list[int]]:
    """The op's integer arguments read as its output shape, before and after removal, when
    they are exactly that (one output, one integer per dim, channel dims of matching size)."""
    if len(op.out_infos) != 1 or len(op.int_args) != len(op.out_infos[0].dims):
        return [], []
    old, new = list(op.int_args), list(op.int_args)
    for d, elems in enumerate(op.out_infos[0].dims):
        if elems is None:
            continue
        if elems.size != old[d]:
            return [], []
        new[d] = _new_size(elems, classes, gone)
    return old, new

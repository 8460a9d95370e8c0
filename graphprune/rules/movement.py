"""Data-movement rules, derived by running the op on a tensor of positions.

Reshape, permute, concat, split, indexing, padding and friends only move values. Rather
than one hand-written index mapping per op, the rule replays the op on ``float64``
tensors holding each input element's global position, then reads off which input
channel index lands at which output index:

* an input channel dim that lands on one output dim keeps its elements there (possibly
  repeated, as in ``flatten`` of ``(C, H, W)``);
* one that lands on several output dims (a split, e.g. ``(3*C) -> (3, heads, head_dim)``)
  gets fresh elements per output dim and a :meth:`~graphprune.elements.ElementStore.link`;
* several channel dims of one input landing on one output dim (a merge) get a link too;
* a channel dim only partly present in the outputs (slicing, ``select``) is frozen,
  since the slice bounds are constants of the code;
* equal-size ``split`` / ``chunk`` parts are coupled index by index so they stay equal;
* positions from a non-channel input next to channel positions (concat with a constant
  tensor) freeze the channels they sit beside.
"""

from __future__ import annotations

import numpy as np
import torch

from . import register_rule
from .context import Call, Context, flat_tensors
from .layout import SHORTCUTS
from .names import spellings
from ..elements import TensorInfo

UNDEFINED = -2
_BIG = 2**62

PADS = ("torch.nn.functional.pad", "torch._C._nn.pad")
SEQUENCE_OPS = set(spellings("cat", "concat", "concatenate", "stack", "hstack", "vstack"))
EQUAL_SPLITS = set(spellings("chunk"))
SPLITS = set(spellings("split", "split_with_sizes", "tensor_split")) | {"torch.functional.split"}
MOVEMENT = spellings(
    "view", "reshape", "view_as", "reshape_as", "permute", "transpose", "swapaxes", "swapdims",
    "t", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "repeat",
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "split_with_sizes",
    "tensor_split", "chunk", "unbind", "__getitem__", "narrow", "select", "movedim", "moveaxis",
    "roll", "flip", "index_select", "gather", "take_along_dim", "repeat_interleave", "unfold",
    "tile", "broadcast_to",  # pixel and channel shuffles move channels in blocks: rules/shuffle.py
    functional=True,
) + ["torch.Tensor.T.__get__", "torch.Tensor.mT.__get__", "torch.functional.split", *PADS]


def _data_tensors(call: Call) -> list[torch.Tensor]:
    if call.name in SEQUENCE_OPS:
        seq = call.args[0] if call.args else next(iter(call.kwargs.values()))
        return list(seq)
    return [call.args[0]]


def _replay(call: Call, positions: list[torch.Tensor]) -> list[torch.Tensor]:
    args = list(call.args)
    kwargs = dict(call.kwargs)
    if call.name in SEQUENCE_OPS:
        if args:
            args[0] = positions
        else:
            kwargs[next(iter(kwargs))] = positions
    else:
        args[0] = positions[0]
    if call.name in PADS and call.arg(2, "mode", "constant") == "constant":
        kwargs["value"] = -1.0
        args = args[:3]
    return flat_tensors(call.func(*args, **kwargs))


def _varying_dims(values: torch.Tensor) -> list[int]:
    """Output dims along which the defined entries of ``values`` are not constant."""
    dims = []
    masked = torch.where(values == UNDEFINED, _BIG, values)
    for d in range(values.dim()):
        if values.shape[d] <= 1:
            continue
        hi = values.amax(d)
        lo = masked.amin(d)
        if bool(((hi != UNDEFINED) & (hi != lo)).any()):
            dims.append(d)
    return dims


def _reduce_to(values: torch.Tensor, keep: list[int]) -> torch.Tensor:
    for d in sorted(set(range(values.dim())) - set(keep), reverse=True):
        values = values.amax(d)
    return values


def _combine(ctx: Context, arrays: list[np.ndarray], size: int) -> np.ndarray:
    """Elements of one output dim from contributions of different inputs (or a merge)."""
    out = np.full(size, UNDEFINED, dtype=np.int64)
    for arr in arrays:
        both = (out != UNDEFINED) & (arr != UNDEFINED)
        ctx.store.union(out[both], arr[both])
        fill = (out == UNDEFINED) & (arr != UNDEFINED)
        out[fill] = arr[fill]
    out[out == UNDEFINED] = -1
    return out


@register_rule(*MOVEMENT)
def _movement(ctx: Context, call: Call) -> list[TensorInfo]:
    data = _data_tensors(call)
    infos = [ctx.info(t) for t in data]
    outs = call.outputs
    if not any(i.has_channels for i in infos):
        return [TensorInfo.free(o.dim()) for o in outs]
    shortcut = SHORTCUTS.get(call.name)
    found = shortcut(ctx, call) if shortcut is not None else None
    if found is not None:
        _couple_equal_parts(ctx, call, found)
    else:
        found = replay(ctx, call, data, infos, outs)
    if call.name in SIZED:
        _tie_sizes_read_from_shapes(ctx, call, found)
    return found


SIZED = set(spellings("view", "reshape", "expand"))


def _tie_sizes_read_from_shapes(ctx: Context, call: Call, infos: list[TensorInfo]) -> None:
    """A target size equal to a channel size read from ``x.shape`` in the same module call is
    that size: ``reshape(B, N, C)`` with ``B, N, C = x.shape``. Couple the two dims index by
    index, so any removal keeps the sizes equal (coupling more never makes a plan invalid).

    A read dim that carries the very elements of the target dim explains the size by itself
    (``value.shape[-1]`` for the last dim of an attention output): other dims of that size read
    in the same call (the query's 8 heads next to its head dim of 8) are then not coupled."""
    sizes = call.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = tuple(sizes[0])
    reads = ctx.shape_reads.get(call.module, [])
    if not reads or len(infos) != 1 or len(sizes) != len(infos[0].dims):
        return
    for size, out_dim in zip(sizes, infos[0].dims):
        if out_dim is None or not isinstance(size, int) or size <= 1 or size in call.attributes:
            continue  # an attribute the forward reads (self.attn_dim) is patched instead
        same = [read for read in reads if read.size == size]
        if any(read is out_dim for read in same):
            continue
        itself = [read for read in same if np.array_equal(read, out_dim)]
        for read in itself or same:
            ctx.store.union(out_dim, read)
            call.dynamic.add(size)


def replay(ctx: Context, call: Call, data: list, infos: list[TensorInfo], outs: list) -> list[TensorInfo]:
    """The reference rule: replay the op on position tensors (see module docstring)."""
    offsets = np.cumsum([0] + [t.numel() for t in data])
    positions = [
        torch.arange(int(offsets[i]), int(offsets[i + 1]), dtype=torch.float64).view(t.shape)
        for i, t in enumerate(data)
    ]
    replayed = _replay(call, positions)
    if len(replayed) != len(outs) or any(r.shape != o.shape for r, o in zip(replayed, outs)):
        ctx.freeze_all(data)
        return [TensorInfo.free(o.dim()) for o in outs]

    covered: dict[tuple[int, int], torch.Tensor] = {}
    carried: set[tuple[int, int]] = set()
    results = []
    for pos in replayed:
        results.append(_one_output(ctx, data, infos, offsets, pos.to(torch.int64), covered, carried))

    for (i, m), cov in covered.items():
        if (i, m) not in carried or not bool(cov.all()):
            ctx.store.freeze(infos[i].dims[m])
    _couple_equal_parts(ctx, call, results)
    return results


def _one_output(ctx, data, infos, offsets, pos, covered, carried) -> TensorInfo:
    contributions: dict[int, dict[int, list[np.ndarray]]] = {}
    chan_cover: dict[int, torch.Tensor] = {}
    for i, (t, info) in enumerate(zip(data, infos)):
        if not info.has_channels:
            continue
        inside = (pos >= int(offsets[i])) & (pos < int(offsets[i + 1]))
        local = torch.where(inside, pos - int(offsets[i]), 0)
        strides = np.cumprod([1] + list(t.shape[::-1]))[:-1][::-1]
        for m, elems in enumerate(info.dims):
            if elems is None:
                continue
            index = (local // int(strides[m])) % t.shape[m]
            cov = covered.setdefault((i, m), torch.zeros(t.shape[m], dtype=torch.bool))
            cov[index[inside]] = True
            values = torch.where(inside, torch.from_numpy(elems)[index], UNDEFINED)
            varying = _varying_dims(values)
            if not varying:
                continue
            carried.add((i, m))
            reduced = _reduce_to(values, varying)
            for d in varying:
                chan_cover[d] = chan_cover.get(d, torch.zeros_like(inside)) | inside
            if len(varying) == 1:
                contributions.setdefault(varying[0], {}).setdefault(i, []).append(reduced.numpy())
                continue
            # a split: fresh elements per output dim, linked to the source elements
            composite = reduced.reshape(-1).numpy()
            grid = np.indices(tuple(reduced.shape)).reshape(len(varying), -1)
            factors = []
            for k, d in enumerate(varying):
                fresh = ctx.new_dim(pos.shape[d])
                contributions.setdefault(d, {}).setdefault(i, []).append(fresh)
                factors.append(fresh[grid[k]])
            keep = composite != UNDEFINED
            ctx.store.link(composite[keep], [f[keep] for f in factors], op="split")

    dims: list[np.ndarray | None] = [None] * pos.dim()
    for d, per_input in contributions.items():
        arrays = []
        for arrs in per_input.values():
            if len(arrs) == 1:
                arrays.append(arrs[0])
            else:  # a merge of several channel dims of one input
                fresh = ctx.new_dim(pos.shape[d])
                ctx.store.link(fresh, [np.where(a == UNDEFINED, -1, a) for a in arrs], op="merge")
                arrays.append(fresh)
        elems = _combine(ctx, arrays, pos.shape[d])
        # positions of this output dim that come from a non-channel source pin their index
        foreign = (pos >= 0) & ~chan_cover[d]
        if bool(foreign.any()):
            pinned = foreign.movedim(d, 0).reshape(pos.shape[d], -1).any(1).numpy()
            ctx.store.freeze(elems[pinned])
        dims[d] = elems if (elems >= 0).any() else None
    return TensorInfo(tuple(dims))


def _couple_equal_parts(ctx: Context, call: Call, results: list[TensorInfo]) -> None:
    """``chunk`` and ``split(int)`` parts must stay equal, so couple them index by index."""
    equal = call.name in EQUAL_SPLITS or (call.name in SPLITS and isinstance(call.arg(1, "split_size_or_sections", call.arg(1, "split_size")), int))
    if not equal or len(results) < 2:
        return
    dim = call.arg(2, "dim", 0)
    parts = [r.dims[dim] for r in results]
    if any(p is None for p in parts):
        return
    if len({p.size for p in parts}) != 1:
        for p in parts:
            ctx.store.freeze(p)
        return
    for p in parts[1:]:
        ctx.store.union(parts[0], p)

"""Closed-form index maps for the common layout ops (permute, transpose, view, cat, split).

These are exact shortcuts of the position replay in :mod:`graphprune.rules.movement`,
which stays the reference and the fallback: a shortcut returns ``None`` whenever a
case is not plainly covered (e.g. a reshape that splits a channel dim into heads).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .context import Call, Context
from .names import register_in, spellings
from ..elements import TensorInfo

Shortcut = Callable[[Context, Call], "list[TensorInfo] | None"]
SHORTCUTS: dict[str, Shortcut] = {}


def _shortcut(*names: str) -> Callable[[Shortcut], Shortcut]:
    return register_in(SHORTCUTS, names, "layout shortcut")


def _dims_arg(call: Call) -> list[int]:
    rest = call.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = rest[0]
    if not rest and "dims" in call.kwargs:
        rest = call.kwargs["dims"]
    return [int(d) for d in rest]


@_shortcut(*spellings("permute"))
def _permute(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x = call.args[0]
    perm = [d % x.dim() for d in _dims_arg(call)]
    dims = ctx.info(x).dims
    return [TensorInfo(tuple(dims[p] for p in perm))]


@_shortcut(*spellings("transpose", "swapaxes", "swapdims"))
def _transpose(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x = call.args[0]
    if x.dim() == 0:
        return None
    a, b = (int(call.arg(1, "dim0")) % x.dim(), int(call.arg(2, "dim1")) % x.dim())
    dims = list(ctx.info(x).dims)
    dims[a], dims[b] = dims[b], dims[a]
    return [TensorInfo(tuple(dims))]


def _swap_last_two(ctx: Context, x) -> list[TensorInfo]:
    dims = list(ctx.info(x).dims)
    if x.dim() >= 2:
        dims[-1], dims[-2] = dims[-2], dims[-1]
    return [TensorInfo(tuple(dims))]


@_shortcut(*spellings("t"), "torch.Tensor.T.__get__")
def _t(ctx: Context, call: Call) -> list[TensorInfo] | None:
    """``t()`` / ``.T``: a 2-d transpose; ``.T`` of more dims reverses them all (left to the replay)."""
    x = call.args[0]
    return _swap_last_two(ctx, x) if x.dim() <= 2 else None


@_shortcut("torch.Tensor.mT.__get__")
def _mt(ctx: Context, call: Call) -> list[TensorInfo]:
    return _swap_last_two(ctx, call.args[0])


def _drop_size_one(ctx: Context, x, out) -> list[TensorInfo] | None:
    """Outputs that only insert or remove size-1 dims (unsqueeze, squeeze, view adding 1s)."""
    dims = [d for d, n in zip(ctx.info(x).dims, x.shape) if n != 1]
    result = []
    it = iter(dims)
    for n in out.shape:
        result.append(None if n == 1 else next(it))
    return [TensorInfo(tuple(result))]


@_shortcut(*spellings("unsqueeze", "squeeze"))
def _squeeze(ctx: Context, call: Call) -> list[TensorInfo] | None:
    return _drop_size_one(ctx, call.args[0], call.outputs[0])


@_shortcut(*spellings("expand", "expand_as", "broadcast_to"))
def _expand(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x, out = call.args[0], call.outputs[0]
    lead = out.dim() - x.dim()
    dims = [None] * lead + [d if n == m else None for d, n, m in zip(ctx.info(x).dims, x.shape, out.shape[lead:])]
    return [TensorInfo(tuple(dims))]


def _blocks(shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of input and output dims with equal products (size-1 dims left out)."""
    i_dims = [k for k, n in enumerate(shape_in) if n != 1]
    o_dims = [k for k, n in enumerate(shape_out) if n != 1]
    blocks, i, o = [], 0, 0
    while i < len(i_dims) and o < len(o_dims):
        bi, bo = [i_dims[i]], [o_dims[o]]
        pi, po = shape_in[i_dims[i]], shape_out[o_dims[o]]
        i, o = i + 1, o + 1
        while pi != po:
            if pi < po:
                if i >= len(i_dims):
                    return None
                bi.append(i_dims[i])
                pi *= shape_in[i_dims[i]]
                i += 1
            else:
                if o >= len(o_dims):
                    return None
                bo.append(o_dims[o])
                po *= shape_out[o_dims[o]]
                o += 1
        blocks.append((bi, bo))
    if i != len(i_dims) or o != len(o_dims):
        return None
    return blocks


@_shortcut(*spellings("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten"))
def _reshape(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x, out = call.args[0], call.outputs[0]
    if out.numel() != x.numel() or x.numel() == 0:
        return None
    blocks = _blocks(tuple(x.shape), tuple(out.shape))
    if blocks is None:
        return None
    in_dims = ctx.info(x).dims
    dims: list[np.ndarray | None] = [None] * out.dim()
    for bi, bo in blocks:
        channels = [k for k in bi if in_dims[k] is not None]
        if not channels:
            continue
        if len(bo) == 1:
            flat = np.arange(out.shape[bo[0]], dtype=np.int64)
            pieces = []
            for k in channels:
                inner = int(np.prod([x.shape[j] for j in bi if j > k], dtype=np.int64))
                pieces.append(in_dims[k][(flat // inner) % x.shape[k]])
            if len(pieces) == 1:  # flatten of a channel dim with non-channel dims
                dims[bo[0]] = pieces[0]
            else:  # a merge of channel dims, e.g. (heads, head_dim) -> attn_dim
                fresh = ctx.new_dim(out.shape[bo[0]])
                ctx.store.link(fresh, pieces, op="merge")
                dims[bo[0]] = fresh
        elif len(bi) == 1:  # a split of one channel dim, e.g. 3*attn_dim -> (3, heads, head_dim)
            sizes = [out.shape[d] for d in bo]
            grid = np.indices(sizes).reshape(len(bo), -1)
            factors = []
            for k, d in enumerate(bo):
                fresh = ctx.new_dim(out.shape[d])
                dims[d] = fresh
                factors.append(fresh[grid[k]])
            ctx.store.link(in_dims[bi[0]], factors, op="split")
        else:
            return None
    return [TensorInfo(tuple(dims))]


@_shortcut("torch.nn.functional.pad", "torch._C._nn.pad")
def _pad(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x, out = call.args[0], call.outputs[0]
    pad = list(call.arg(1, "pad"))
    mode = call.arg(2, "mode", "constant")
    dims = list(ctx.info(x).dims)
    for j in range(len(pad) // 2):
        d = x.dim() - 1 - j
        left, right = int(pad[2 * j]), int(pad[2 * j + 1])
        if left == 0 and right == 0:
            continue
        if dims[d] is None:
            continue
        if mode != "constant" or left < 0 or right < 0:
            return None
        dims[d] = np.concatenate([np.full(left, -1, np.int64), dims[d], np.full(right, -1, np.int64)])
    if any(a is not None and a.size != n for a, n in zip(dims, out.shape)):
        return None
    return [TensorInfo(tuple(dims))]


@_shortcut(*spellings("roll"))
def _roll(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x = call.args[0]
    axes = call.arg(2, "dims")
    if axes is None:
        return None
    axes = [axes] if isinstance(axes, int) else list(axes)
    dims = ctx.info(x).dims
    if any(dims[a] is not None for a in axes):
        return None
    return [TensorInfo(dims)]


@_shortcut(*spellings("unbind"))
def _unbind(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x = call.args[0]
    axis = int(call.arg(1, "dim", 0)) % x.dim()
    dims = ctx.info(x).dims
    ctx.store.freeze(dims[axis])
    rest = tuple(d for k, d in enumerate(dims) if k != axis)
    return [TensorInfo(rest) for _ in call.outputs]


@_shortcut("torch.Tensor.__getitem__")
def _getitem(ctx: Context, call: Call) -> list[TensorInfo] | None:
    """Basic indexing (ints, slices, None, ...) that leaves every channel dim whole."""
    x, index = call.args[0], call.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool) for i in index):
        return None
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    if sum(1 for i in index if i is Ellipsis) > 1 or n_real > x.dim():
        return None
    expanded: list = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (x.dim() - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (x.dim() - sum(1 for i in expanded if i is not None))
    dims_in = ctx.info(x).dims
    dims, k = [], 0
    for position, i in enumerate(expanded):
        if isinstance(i, slice) and i != slice(None) and i.step in (None, 1) and i.start in (None, 0) and \
                (i.stop is None or i.stop >= x.shape[sum(1 for j in expanded[:position] if j is not None)]):
            expanded[position] = slice(None)  # x[:, :n] with n >= size keeps every channel, also after pruning
    for i in expanded:
        if i is None:
            dims.append(None)
            continue
        if dims_in[k] is not None and i != slice(None):
            # a channel dim indexed by constants of the code: those indices cannot move
            ctx.store.freeze(dims_in[k])
            if isinstance(i, slice):
                kept = dims_in[k][i]
                dims.append(kept if kept.size > 1 else None)
        elif not isinstance(i, int):
            dims.append(dims_in[k])
        k += 1
    return [TensorInfo(tuple(dims))]


@_shortcut(*spellings("cat", "concat", "concatenate"))
def _cat(ctx: Context, call: Call) -> list[TensorInfo] | None:
    from .context import merge_dims

    tensors = list(call.args[0] if call.args else next(iter(call.kwargs.values())))
    out = call.outputs[0]
    tensors = [t for t in tensors if not (t.dim() == 1 and t.numel() == 0)]
    if not tensors or any(t.dim() != out.dim() for t in tensors):
        return None
    axis = int(call.arg(1, "dim", 0)) % out.dim()
    infos = [ctx.info(t) for t in tensors]
    dims: list[np.ndarray | None] = []
    for d in range(out.dim()):
        if d == axis:
            parts = [i.dims[d] if i.dims[d] is not None else np.full(t.shape[d], -1, dtype=np.int64)
                     for i, t in zip(infos, tensors)]
            joined = np.concatenate(parts)
            dims.append(joined if (joined >= 0).any() else None)
        else:
            dims.append(merge_dims(ctx.store, [(i.dims[d], t.shape[d]) for i, t in zip(infos, tensors)], out.shape[d]))
    return [TensorInfo(tuple(dims))]


@_shortcut(*spellings("split", "split_with_sizes", "chunk"), "torch.functional.split")
def _split(ctx: Context, call: Call) -> list[TensorInfo] | None:
    x, outs = call.args[0], call.outputs
    axis_arg = call.arg(2, "dim", 0)
    axis = int(axis_arg) % x.dim()
    if sum(o.shape[axis] for o in outs) != x.shape[axis]:
        return None
    dims = ctx.info(x).dims
    result, start = [], 0
    for o in outs:
        n = o.shape[axis]
        part = list(dims)
        if dims[axis] is not None:
            piece = dims[axis][start:start + n]
            part[axis] = piece if n > 1 else None
            if n == 1:
                ctx.store.freeze(piece)
        start += n
        result.append(TensorInfo(tuple(part)))
    return result


@_shortcut(*spellings("stack"))
def _stack(ctx: Context, call: Call) -> list[TensorInfo] | None:
    from .context import merge_dims

    tensors = list(call.args[0] if call.args else next(iter(call.kwargs.values())))
    out = call.outputs[0]
    axis = int(call.arg(1, "dim", 0)) % out.dim()
    if any(t.shape != tensors[0].shape for t in tensors):
        return None
    infos = [ctx.info(t) for t in tensors]
    merged = [merge_dims(ctx.store, [(i.dims[d], t.shape[d]) for i, t in zip(infos, tensors)], tensors[0].shape[d])
              for d in range(tensors[0].dim())]
    return [TensorInfo(tuple(merged[:axis]) + (None,) + tuple(merged[axis:]))]

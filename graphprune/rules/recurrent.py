"""Rules for recurrent layers: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``
(what ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` call, plain or packed sequences).

The flat weight list holds, per layer and direction, ``weight_ih (G*H, I)``, ``weight_hh
(G*H, H_out)``, the two biases ``(G*H)`` and, for an LSTM with ``proj_size``, ``weight_hr
(P, H)``, with ``G`` gate blocks (LSTM 4, GRU 3, RNN 1) and ``H_out = P or H``. One layer
width serves every layer and direction (``hidden_size``), so:

* hidden unit ``j`` is one channel across all layers and directions: row ``j`` of every gate
  block of both weights and biases, and column ``j`` of ``weight_hh`` (or of ``weight_hr``);
* with a projection, output unit ``p`` is row ``p`` of ``weight_hr`` and column ``p`` of
  ``weight_hh``, again in every layer and direction;
* the input features are the columns of layer 0's ``weight_ih`` (every direction); layer
  ``l > 0`` reads ``D`` copies of the output units, one per direction, as the output does.

A unit whose rows are all zero stays zero from a zero initial state (each gate is 0.5 of a
zero state, the candidate is ``tanh(0)``), so removal after zeroing is exact. A user-given
initial state that carries channels is coupled to the units; a free one (``nn.LSTM``'s
zeros) follows ``hidden_size``, which removal updates (:mod:`graphprune.removal_layers`).
No MACs are recorded: fvcore does not count ``aten::lstm`` either.

Example:
    >>> import torch, graphprune as gp
    >>> class Outputs(torch.nn.Module):  # an LSTM returns (outputs, (h, c))
    ...     def forward(self, result):
    ...         return result[0]
    >>> embed, rnn = torch.nn.Linear(3, 8), torch.nn.LSTM(8, 6, bidirectional=True)
    >>> tagger = torch.nn.Sequential(embed, rnn, Outputs(), torch.nn.Linear(12, 2))
    >>> groups = gp.find_groups(gp.trace(tagger, torch.randn(5, 1, 3)))
    >>> [(g.name, g.size) for g in groups]  # input features (embed), hidden units (rnn)
    [('0', 8), ('1', 6)]
"""

from __future__ import annotations

import numpy as np
import torch

from . import register_rule
from .context import Call, Context, merge_dims
from ..elements import SLOT, TensorInfo

GATES = {"torch.lstm": 4, "torch.gru": 3, "torch.rnn_tanh": 1, "torch.rnn_relu": 1}


def _layout(call: Call) -> tuple[bool, int]:
    """Whether the sequence is packed, and the position of the weight list."""
    hx_or_sizes = call.args[1]
    # packed: (data, batch_sizes, hx, weights, ...); an LSTM's hx is a list, a GRU's a tensor
    packed = isinstance(hx_or_sizes, torch.Tensor) and (
        call.name == "torch.lstm" or isinstance(call.args[2], torch.Tensor))
    return packed, 3 if packed else 2


def _elems(ctx: Context, t: torch.Tensor, d: int) -> np.ndarray:
    found = ctx.info(t).dims[d]
    return found if found is not None else np.full(t.shape[d], SLOT, dtype=np.int64)


def _cells(weights: list, per_cell: int) -> list[list[torch.Tensor]]:
    """The weight list cut into one list per (layer, direction), in that order."""
    return [list(weights[i:i + per_cell]) for i in range(0, len(weights), per_cell)]


@register_rule(*GATES)
def _recurrent(ctx: Context, call: Call) -> list[TensorInfo]:
    packed, at = _layout(call)
    x, hx, weights = call.args[0], call.args[at - 1], list(call.args[at])
    bias, layers, bidirectional = bool(call.args[at + 1]), int(call.args[at + 2]), bool(call.args[at + 5])
    gates, directions = GATES[call.name], 2 if bidirectional else 1
    per_cell = len(weights) // (layers * directions)
    cells = _cells(weights, per_cell)
    proj = per_cell == 2 + 2 * bias + 1
    hidden, unit = _units(ctx, cells, gates, bias, proj)
    _inputs(ctx, x, cells, unit, directions)
    for state, elems in zip(hx if isinstance(hx, (list, tuple)) else [hx], [unit, hidden]):
        if ctx.info(state).dims[-1] is not None:  # an initial state that carries channels
            ctx.store.union(ctx.info(state).dims[-1], elems)
    call.dynamic.add(layers)  # not a channel count: never patched
    out_dims = [None] * (x.dim() - 1) + [np.concatenate([unit] * directions)]
    infos = [TensorInfo(tuple(out_dims))]
    for state, elems in zip(call.outputs[1:], [unit, hidden]):
        infos.append(TensorInfo((None,) * (state.dim() - 1) + (elems,)))
    return infos


def _units(ctx: Context, cells: list, gates: int, bias: bool, proj: bool) -> tuple[np.ndarray, np.ndarray]:
    """Couple hidden unit ``j`` (and projected unit ``p``) across every cell; their elements."""
    hidden_rows, proj_rows = [], []
    for cell in cells:
        w_ih, w_hh = cell[0], cell[1]
        vectors = [w_ih, w_hh] + (cell[2:4] if bias else [])
        for t in vectors:  # (G*H): gate block g, unit j at g*H + j
            hidden_rows.append(_elems(ctx, t, 0).reshape(gates, -1).T)
        if proj:
            w_hr = cell[-1]
            hidden_rows.append(_elems(ctx, w_hr, 1)[:, None])
            proj_rows += [_elems(ctx, w_hr, 0)[:, None], _elems(ctx, w_hh, 1)[:, None]]
        else:
            hidden_rows.append(_elems(ctx, w_hh, 1)[:, None])
    hidden = _couple_rows(ctx, np.concatenate(hidden_rows, axis=1))
    unit = _couple_rows(ctx, np.concatenate(proj_rows, axis=1)) if proj else hidden
    return hidden, unit


def _couple_rows(ctx: Context, rows: np.ndarray) -> np.ndarray:
    """One channel per row; a row with a constant slot (a size-1 dim) stays."""
    ctx.store.union_rows(rows)
    pinned = (rows == SLOT).any(axis=1)
    ctx.store.freeze(rows[pinned])
    return rows.max(axis=1)


def _inputs(ctx: Context, x: torch.Tensor, cells: list, unit: np.ndarray, directions: int) -> None:
    """Layer 0 reads the input's features; every later layer reads the units of each direction."""
    features = x.shape[-1]
    for k, cell in enumerate(cells):
        columns = ctx.info(cell[0]).dims[1]
        if k < directions:
            merge_dims(ctx.store, [(ctx.info(x).dims[-1], features), (columns, features)], features)
        else:
            ctx.store.union(_elems(ctx, cell[0], 1), np.concatenate([unit] * directions))


@register_rule("_VariableFunctionsClass._pack_padded_sequence", "torch._pack_padded_sequence")
def _pack(ctx: Context, call: Call) -> list[TensorInfo]:
    """``(T, B, *F)`` (or ``(B, T, *F)``) -> the packed ``(sum of lengths, *F)`` and the batch sizes."""
    x = call.args[0]
    return [TensorInfo((None,) + ctx.info(x).dims[2:]), TensorInfo.free(call.outputs[1].dim())]


@register_rule("_VariableFunctionsClass._pad_packed_sequence", "torch._pad_packed_sequence")
def _pad(ctx: Context, call: Call) -> list[TensorInfo]:
    """Packed ``(N, *F)`` -> ``(T, B, *F)``; a non-zero ``padding_value`` keeps zeroed channels visible."""
    data = call.args[0]
    dims = ctx.info(data).dims[1:]
    if call.arg(3, "padding_value", 0.0) != 0:
        for d in dims:
            ctx.store.mark_statistic(d)
    return [TensorInfo((None, None) + dims), TensorInfo.free(call.outputs[1].dim())]

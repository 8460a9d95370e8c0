"""Rule for ``F.multi_head_attention_forward``: ``nn.MultiheadAttention`` (torchvision ViT, DETR).

The function splits the projections into ``num_heads`` heads of ``head_dim = E / num_heads``,
with ``E`` the query's last dim, so three sizes are one:

* the query's embedding dim ``E`` (the columns of ``in_proj_weight``, and of ``q_proj_weight``);
* the width of each of the q, k and v projections (``in_proj_weight`` is ``[q; k; v]`` rows);
* ``num_heads * head_dim``.

Heads are the unit, as for every attention (:mod:`~graphprune.rules.products`): head ``k``
is its ``head_dim`` rows in each of q, k and v, its columns of ``out_proj.weight``, and,
since the sizes must stay equal, the ``head_dim`` embedding channels ``k*head_dim ...`` of
the query (and of key and value when they share ``in_proj_weight``). ``head_dim`` and the
attention scale stay as trained; removal derives ``embed_dim``, ``num_heads``, ``kdim`` and
``vdim`` from the cut weights (:mod:`graphprune.removal_layers`). The output projection's
rows are free. Heads are frozen where something fixes them: a 3-d ``attn_mask`` or
``static_k``/``static_v`` (one slice per batch and head), per-head weights averaged into the
returned ``attn_weights`` (a statistic), or a caller that is not an ``nn.MultiheadAttention``
(nothing would update its sizes).

Example:
    >>> import torch, graphprune as gp
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.proj, self.attn = torch.nn.Linear(4, 8), torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ...     def forward(self, x):
    ...         x = self.proj(x)
    ...         return self.attn(x, x, x, need_weights=False)[0].sum(-1)
    >>> group = gp.find_groups(gp.trace(Block(), torch.randn(1, 5, 4)))[0]
    >>> group.size, group.width.tolist()  # two heads: 4 rows in each of q, k and v
    (2, [12, 12])
"""

from __future__ import annotations

import numpy as np
import torch

from . import register_rule
from .context import Call, Context, merge_dims
from ..elements import TensorInfo

_ARGS = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
         "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
         "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
         "static_k", "static_v", "average_attn_weights", "is_causal"]
_DEFAULTS = {"training": True, "need_weights": True, "use_separate_proj_weight": False, "average_attn_weights": True}


def _arguments(call: Call) -> dict:
    return {name: call.arg(i, name, _DEFAULTS.get(name)) for i, name in enumerate(_ARGS)}


def _rows(ctx: Context, a: dict) -> list:
    """Elements of the q, k and v projection rows (each ``E``), with their biases coupled."""
    if a["use_separate_proj_weight"]:
        rows = [ctx.info(a[f"{p}_proj_weight"]).dims[0] for p in "qkv"]
    else:
        packed = ctx.info(a["in_proj_weight"]).dims[0]
        rows = list(np.split(packed, 3)) if packed is not None else [None] * 3
    e = a["query"].shape[-1]
    if a["in_proj_bias"] is not None:
        bias = ctx.info(a["in_proj_bias"]).dims[0]
        parts = np.split(bias, 3) if bias is not None else [None] * 3
        rows = [merge_dims(ctx.store, [(r, e), (b, e)], e) for r, b in zip(rows, parts)]
    for extra, k in (("bias_k", 1), ("bias_v", 2)):  # appended to the key / value sequence
        if a[extra] is not None:
            rows[k] = merge_dims(ctx.store, [(rows[k], e), (ctx.info(a[extra]).dims[-1], e)], e)
    return rows


def _inputs(ctx: Context, a: dict, q_rows) -> None:
    """Couple each input's last dim with the columns of its projection; the query's with the heads."""
    e = a["query"].shape[-1]
    for p, name in zip("qkv", ("query", "key", "value")):
        t = a[name]
        weight = a[f"{p}_proj_weight"] if a["use_separate_proj_weight"] else a["in_proj_weight"]
        merge_dims(ctx.store, [(ctx.info(t).dims[-1], t.shape[-1]), (ctx.info(weight).dims[1], t.shape[-1])],
                   t.shape[-1])
    merge_dims(ctx.store, [(ctx.info(a["query"]).dims[-1], e), (q_rows, e)], e)


def _heads_fixed(ctx: Context, call: Call, a: dict) -> bool:
    mask = a["attn_mask"]
    if isinstance(mask, torch.Tensor) and mask.dim() == 3 or a["static_k"] is not None or a["static_v"] is not None:
        return True
    names = {k: ctx.state_name(a[k]) for k in ("in_proj_weight", "q_proj_weight", "out_proj_weight")}
    own = "in_proj_weight" if not a["use_separate_proj_weight"] else "q_proj_weight"
    prefix = call.module + "." if call.module else ""
    return names[own] != prefix + own or names["out_proj_weight"] != prefix + "out_proj.weight"


@register_rule("torch.nn.functional.multi_head_attention_forward")
def _multi_head_attention(ctx: Context, call: Call) -> list[TensorInfo]:
    a = _arguments(call)
    query, heads = a["query"], int(a["num_heads"])
    e = query.shape[-1]
    rows = _rows(ctx, a)
    if any(r is None for r in rows):  # a projection without channel elements: nothing to couple
        ctx.freeze_all(call.tensor_args)
        return [TensorInfo.free(o.dim()) for o in call.outputs]
    for r in rows[1:]:  # head k of q attends with head k of k and reads head k of v
        ctx.store.union(rows[0], r)
    ctx.store.union_rows(rows[0].reshape(heads, e // heads))
    ctx.store.mark_heads(rows[0])
    out_w = ctx.info(a["out_proj_weight"]).dims
    merge_dims(ctx.store, [(rows[2], e), (out_w[1], e)], e)
    _inputs(ctx, a, rows[0])
    if _heads_fixed(ctx, call, a):
        ctx.store.freeze(rows[0])
    out, n_out = out_w[0], a["out_proj_weight"].shape[0]
    if a["out_proj_bias"] is not None:
        out = merge_dims(ctx.store, [(out, n_out), (ctx.info(a["out_proj_bias"]).dims[0], n_out)], n_out)
    call.dynamic.update({e, heads})  # sizes of the module, which removal derives from its weights
    _add_costs(ctx, a, rows[0], out_w)
    return _outputs(ctx, call, a, rows[0], out)


def _outputs(ctx: Context, call: Call, a: dict, heads_dim: np.ndarray, out: np.ndarray | None) -> list[TensorInfo]:
    result = call.outputs[0]
    infos = [TensorInfo((None,) * (result.dim() - 1) + (out,))]
    if len(call.outputs) > 1:  # attention weights: (N, L, S) averaged over heads, or (N, heads, L, S)
        weights = call.outputs[1]
        if a["average_attn_weights"] or weights.dim() < 4:
            ctx.store.mark_statistic(heads_dim)
            infos.append(TensorInfo.free(weights.dim()))
        else:
            per_head = heads_dim.reshape(int(a["num_heads"]), -1)[:, 0]
            infos.append(TensorInfo((None, per_head) + (None,) * (weights.dim() - 2)))
    return infos


def _add_costs(ctx: Context, a: dict, heads_dim: np.ndarray, out_w: tuple) -> None:
    """Multiply-adds as fvcore counts the function's parts: three projections, two attention
    products (``L*S*E`` each, per batch), the output projection."""
    q, k, v = a["query"], a["key"], a["value"]
    e = q.shape[-1]
    tokens_q = q.numel() // e
    for t, p in zip((q, k, v), "qkv"):
        weight = a[f"{p}_proj_weight"] if a["use_separate_proj_weight"] else a["in_proj_weight"]
        ctx.add_cost(t.numel() * e, [heads_dim, ctx.info(weight).dims[1]])
    source = k.shape[0] + (a["bias_k"] is not None) + bool(a["add_zero_attn"])  # (S, N, E) or (S, E)
    ctx.add_cost(2 * tokens_q * source * e, [heads_dim])
    ctx.add_cost(tokens_q * e * a["out_proj_weight"].shape[0], [heads_dim, out_w[0]])

"""Tensor products: matmul, addmm, einsum and scaled dot-product attention.

A contracted dim couples both operands' channels; batch dims couple across operands and
the output. Channel dims used as batch dims of an attention-style product are marked
as *heads*: when a reshape split them from a projection, heads become the pruning unit
(so ``head_dim`` and the attention scale stay exactly as trained). With a single head only
``head_dim`` is left to prune; ``scaled_dot_product_attention`` without an explicit ``scale``
derives its scale from that dim, so there it is marked as a statistic (like a layer norm's dim).

Grouped-query attention (``enable_gqa=True``: fewer key/value heads than query heads) couples
each kv head, k with v, to the query heads that read it: the pruning unit is one kv head with
its whole query group, so the group size (``num_key_value_groups``) never changes.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from . import register_rule
from .context import Call, Context, merge_dims
from .names import spellings
from ..elements import TensorInfo


def _einsum_info(ctx: Context, spec: str, operands: list, out_shape: tuple[int, ...], *, heads: bool,
                 cost: bool = True) -> TensorInfo:
    """Couple the dims of an einsum; an operand is a tensor or an ``(info, shape)`` view of one."""
    inputs, output = spec.replace(" ", "").split("->")
    terms = inputs.split(",")
    letters: dict[str, list] = {}
    sizes: dict[str, int] = {}
    for term, t in zip(terms, operands):
        info, shape = t if isinstance(t, tuple) else (ctx.info(t), tuple(t.shape))
        for d, letter in enumerate(term):
            letters.setdefault(letter, []).append((info.dims[d], shape[d]))
            sizes[letter] = max(sizes.get(letter, 1), shape[d])
    merged = {letter: merge_dims(ctx.store, column, sizes[letter]) for letter, column in letters.items()}
    if cost:
        macs = 1
        for n in sizes.values():
            macs *= n
        ctx.add_cost(macs, [merged[letter] for letter in sizes])
    if heads:
        for letter in output:
            if merged[letter] is not None and all(letter in term for term in terms) and letter != output[-1]:
                ctx.store.mark_heads(merged[letter])
    dims = tuple(merged[letter] if sizes[letter] == out_shape[k] else None for k, letter in enumerate(output))
    return TensorInfo(dims)


def _alphabet(n: int, start: int = 0) -> str:
    return "".join(chr(ord("a") + start + i) for i in range(n))


RMATMUL = "torch.Tensor.__rmatmul__"  # b.__rmatmul__(a), for a @ b when a does not handle it


@register_rule(*[name for name in spellings("matmul", "bmm", "mm") if name != RMATMUL])
def _matmul(ctx: Context, call: Call) -> list[TensorInfo]:
    a, b = call.tensor_args[:2]
    return _product(ctx, a, b, call.outputs[0])


@register_rule(RMATMUL)
def _rmatmul(ctx: Context, call: Call) -> list[TensorInfo]:
    b, a = call.tensor_args[:2]  # b.__rmatmul__(a) is a @ b
    return _product(ctx, a, b, call.outputs[0])


def _product(ctx: Context, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> list[TensorInfo]:
    """``a @ b`` with broadcast batch dims."""
    if a.dim() < 2 or b.dim() < 2:
        ctx.freeze_all([a, b])
        return [TensorInfo.free(out.dim())]
    batch = out.dim() - 2
    prefix = _alphabet(batch, start=3)
    term_a = prefix[batch - (a.dim() - 2):] + "xy"
    term_b = prefix[batch - (b.dim() - 2):] + "yz"
    return [_einsum_info(ctx, f"{term_a},{term_b}->{prefix}xz", [a, b], tuple(out.shape), heads=batch > 0)]


@register_rule(*spellings("addmm", "baddbmm"))
def _addmm(ctx: Context, call: Call) -> list[TensorInfo]:
    """``beta * input + alpha * (mat1 @ mat2)``: a product whose result is added to ``input``.

    Hugging Face's ``Conv1D`` (GPT-2) is ``addmm(bias, x, weight)`` with ``weight`` stored
    ``(in, out)``: the contracted dim is the weight's input side. ``input`` broadcasts like
    the second operand of an addition.
    """
    base, mat1, mat2 = call.arg(0, "input"), call.arg(1, "mat1", call.arg(1, "batch1")), \
        call.arg(2, "mat2", call.arg(2, "batch2"))
    out = call.outputs[0]
    if not all(isinstance(t, torch.Tensor) for t in (base, mat1, mat2)) or base.dim() > out.dim():
        ctx.freeze_all([t for t in (base, mat1, mat2) if isinstance(t, torch.Tensor)])
        return [TensorInfo.free(out.dim())]
    batch = _alphabet(out.dim() - 2, start=3)
    product = _einsum_info(ctx, f"{batch}xy,{batch}yz->{batch}xz", [mat1, mat2], tuple(out.shape), heads=False)
    _mark_weight_roles(ctx, [mat1, mat2], [f"{batch}xy", f"{batch}yz"], f"{batch}xz")
    base_info, lead = ctx.info(base), out.dim() - base.dim()
    dims = [merge_dims(ctx.store, [(product.dims[d], out.shape[d])] +
                       ([(base_info.dims[d - lead], base.shape[d - lead])] if d >= lead else []), out.shape[d])
            for d in range(out.dim())]
    return [TensorInfo(tuple(dims))]


def _mark_weight_roles(ctx: Context, operands: list, terms: list[str], output: str) -> None:
    """A parameter operand of a product consumes its contracted dims and produces its kept ones."""
    for t, term in zip(operands, terms):
        if not isinstance(t, torch.nn.Parameter):
            continue
        for letter, dim in zip(term, ctx.info(t).dims):
            ctx.store.mark_role(dim, "out" if letter in output else "in")


@register_rule("torch.einsum", "torch.functional.einsum")
def _einsum(ctx: Context, call: Call) -> list[TensorInfo]:
    spec = call.args[0]
    operands = list(call.args[1]) if len(call.args) == 2 and isinstance(call.args[1], (list, tuple)) else list(call.args[1:])
    out = call.outputs[0]
    if "..." in spec or "->" not in spec or not re.fullmatch(r"[a-zA-Z,\s\->]+", spec):
        ctx.freeze_all(operands)
        return [TensorInfo.free(out.dim())]
    return [_einsum_info(ctx, spec, operands, tuple(out.shape), heads=False)]


@register_rule("torch.nn.functional.scaled_dot_product_attention", "torch._C._nn.scaled_dot_product_attention")
def _sdpa(ctx: Context, call: Call) -> list[TensorInfo]:
    q, k, v = call.args[0], call.arg(1, "key"), call.arg(2, "value")
    mask = call.arg(3, "attn_mask")
    out = call.outputs[0]
    n = q.dim()
    batch = _alphabet(n - 2, start=3)
    operands, terms = [q, *_kv_per_query_head(ctx, call, q, k, v)], [batch + "xy", batch + "zy", batch + "zw"]
    if isinstance(mask, type(q)) and mask.is_floating_point() and mask.dim() == n:
        operands.append(mask)
        terms.append(batch + "xz")
    if call.arg(6, "scale") is None:
        # the default scale is 1 / sqrt(q.shape[-1]): removing a q/k channel rescales every logit,
        # so a zeroed channel is not invisible once removed (as under a layer norm)
        ctx.store.mark_statistic(ctx.info(q).dims[-1])
    info = _einsum_info(ctx, ",".join(terms) + f"->{batch}xw", operands, tuple(out.shape), heads=True, cost=False)
    # two products: softmax(q k^T) is (.., Nq, Nk) over D, then times v over Nk
    lead = [info.dims[i] for i in range(n - 2)]
    size = int(torch.tensor(q.shape[:-2]).prod()) * q.shape[-2] * k.shape[-2]
    ctx.add_cost(size * q.shape[-1], lead + [ctx.info(q).dims[-1]])
    ctx.add_cost(size * v.shape[-1], lead + [info.dims[-1]])
    return [info]


def _kv_per_query_head(ctx: Context, call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list:
    """Key and value as the product sees them: with ``enable_gqa``, repeated per query head.

    Grouped-query attention (``enable_gqa=True``, ``(B, Hq, T, D)`` queries against
    ``(B, Hkv, S, D)`` keys and values) lets query head ``h`` read kv head ``h // (Hq // Hkv)``,
    as ``repeat_interleave`` would. Viewing k and v that way couples each query head with its kv
    head, so one kv head and its ``Hq // Hkv`` query heads are one channel: removing it keeps
    ``Hq // Hkv`` (Hugging Face's ``num_key_value_groups``) and is exactly what the eager
    ``repeat_kv`` path gives. With a single kv head (multi-query attention) the repeated head dim
    has no channel, so the query heads are frozen, as on the eager path.
    """
    if not call.arg(7, "enable_gqa", False) or q.dim() < 3 or k.shape[-3] == q.shape[-3]:
        return [k, v]
    heads_q, heads_kv = q.shape[-3], k.shape[-3]
    if heads_kv < 1 or heads_q % heads_kv or v.shape[-3] != heads_kv:
        ctx.freeze_all([q, k, v])  # not a shape SDPA accepts; nothing to infer
        return [k, v]
    repeat = heads_q // heads_kv
    views = []
    for t in (k, v):
        dims = list(ctx.info(t).dims)
        head = dims[-3]
        dims[-3] = None if head is None else np.repeat(head, repeat)
        shape = list(t.shape)
        shape[-3] = heads_q
        views.append((TensorInfo(tuple(dims)), tuple(shape)))
    return views

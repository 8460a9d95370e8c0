"""Elementwise rules: outputs index the same channels as their (broadcast) inputs.

Unary ops pass element ids through; n-ary ops couple the inputs' channel dims that
broadcast onto the same output dim (residual adds, squeeze-excite gates, layer scale).
"""

from __future__ import annotations

from . import register_rule
from .context import Call, Context, merge_dims
from .names import spellings
from ..elements import TensorInfo

UNARY = [
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "tanhshrink", "logsigmoid",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "reciprocal", "sign", "erf", "sin", "cos",
    "clamp", "clamp_min", "clamp_max", "clip", "float", "half", "double", "bfloat16", "to", "type",
    "type_as", "contiguous", "clone", "detach", "cumsum", "nan_to_num",
    "requires_grad_", "pow", "round", "floor", "ceil", "trunc", "frac", "sigmoid_", "exp_", "sqrt_",
    "norm_except_dim", "zeros_like",
]

NARY = ["add", "sub", "mul", "div", "true_divide", "floor_divide", "maximum", "minimum", "where",
        "masked_fill", "lerp", "addcmul", "addcdiv", "rsub", "fmod", "remainder", "eq", "ne", "lt",
        "gt", "le", "ge", "logical_and", "logical_or", "truediv", "and", "or", "xor", "copysign"]


def broadcast_info(ctx: Context, inputs: list, shape: tuple[int, ...]) -> TensorInfo:
    """Couple the inputs' dims that broadcast onto each output dim of ``shape``."""
    dims = []
    for d, size in enumerate(shape):
        column = []
        for t in inputs:
            k = t.dim() - len(shape) + d
            if k >= 0:
                column.append((ctx.info(t).dims[k], t.shape[k]))
        dims.append(merge_dims(ctx.store, column, size))
    return TensorInfo(tuple(dims))


def _unary(ctx: Context, call: Call) -> list[TensorInfo]:
    source = call.tensor_args[0]
    infos = []
    for out in call.outputs:
        if out.shape == source.shape:
            infos.append(ctx.info(source))
        else:
            infos.append(broadcast_info(ctx, [source], tuple(out.shape)))
    return infos


def _nary(ctx: Context, call: Call) -> list[TensorInfo]:
    inputs = call.tensor_args
    return [broadcast_info(ctx, inputs, tuple(out.shape)) for out in call.outputs]


def _softmax(ctx: Context, call: Call) -> list[TensorInfo]:
    """A unary op whose every dim is a statistic: softmax of zeros is uniform, not zero, so zeroing is
    visible downstream."""
    for dim in ctx.info(call.tensor_args[0]).dims:
        ctx.store.mark_statistic(dim)
    return _unary(ctx, call)


register_rule(*spellings(*UNARY, functional=True))(_unary)
register_rule(*spellings("softmax", "log_softmax", functional=True))(_softmax)
register_rule(*spellings(*NARY, functional=True))(_nary)

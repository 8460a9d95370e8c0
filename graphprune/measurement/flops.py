# Over 350 lines: the MAC handle of every op family fvcore misses, in one table beside the engine that uses it.
"""MAC counting on a jit trace, with fvcore's engine and graphprune's op table.

Convention, stated once for the whole package: **one fused multiply-add is one
MAC**, and ``flops == 2 * macs``. fvcore calls a MAC a "flop"; we never do.
``torch.utils.flop_counter.FlopCounterMode`` counts 2 flops per MAC, so its total
equals our ``flops``.

What counts. Only contractions are counted, the same op classes as
``FlopCounterMode``:

* ``conv``: convolutions, dense, grouped, depthwise, strided, transposed;
* ``linear``: ``aten::linear`` and ``aten::addmm`` (a linear layer's trace);
* ``matmul``: ``mm``, ``bmm``, ``baddbmm``, ``matmul``, ``mv``, ``dot``;
* ``einsum``: pairwise contractions, left to right (torch's order without
  opt_einsum);
* ``attention``: ``scaled_dot_product_attention`` and its ``_scaled_dot_product_*``
  kernels: ``Q @ K^T`` plus ``A @ V``, dense even when causal (as ``FlopCounterMode``).
  ``_native_multi_head_attention`` (``nn.MultiheadAttention``'s fast path) counts its
  projections as ``linear`` and its two products as ``attention``.

What is zero by decision (``ZERO_MAC_OPS``): normalization (batch norm folds into
the preceding conv at deployment; layer/group norm are a few elementwise passes),
activations, softmax, elementwise arithmetic (``add``, ``mul``, ...), pooling,
resampling and data movement. They cost memory traffic, not MACs, and
``FlopCounterMode`` ignores them too, so the two counters stay comparable.

Everything else is *reported*, not guessed: ``MacCount.uncounted_ops`` maps each
op name that has neither a handle nor a zero entry to how often it ran.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.measurement.latency import ExampleInputs, as_input_tuple, eval_mode

with warnings.catch_warnings():
    # fvcore scripts helpers at import time; torch >= 2.9 flags torch.jit.script.
    warnings.simplefilter("ignore")
    from fvcore.nn import FlopCountAnalysis

__all__ = [
    "MAC_HANDLES",
    "ZERO_MAC_OPS",
    "MacCount",
    "MacCountAnalysis",
    "analyze_macs",
    "count_macs",
]

# fvcore's handle contract: (jit input values, jit output values) -> count.
Handle = Callable[[list[Any], list[Any]], Counter]


def _shape(value: Any) -> tuple[int, ...]:
    """Static shape of a jit value; fails loudly rather than guessing."""
    if not value.isCompleteTensor():
        raise ValueError(f"jit value {value.debugName()} has no complete tensor shape")
    return tuple(value.type().sizes())


def _conv_macs(
    x: tuple[int, ...], w: tuple[int, ...], out: tuple[int, ...], transposed: bool
) -> int:
    # weight: (cout, cin/groups, *k), or (cin, cout/groups, *k) when transposed.
    # A conv visits every output element with cin/groups * prod(k) weights; a transposed
    # conv scatters every input element to cout/groups * prod(k) outputs.
    per_element = math.prod(w[1:])
    return math.prod(x if transposed else out) * per_element


def _conv_handle(
    family: str, transposed_arg: int | None, always_transposed: bool = False
) -> Handle:
    def handle(inputs: list[Any], outputs: list[Any]) -> Counter:
        transposed = always_transposed
        if transposed_arg is not None:
            transposed = bool(inputs[transposed_arg].toIValue())
        macs = _conv_macs(_shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0]), transposed)
        return Counter({family: macs})

    return handle


def _contraction_handle(family: str, left_arg: int) -> Handle:
    """Handle for ops whose output element is one dot product over ``left[-1]``.

    Holds for linear, (add)mm, (bad)bmm, matmul with broadcasting, mv and dot:
    MACs = numel(output) * K, K being the left operand's last dimension.
    """

    def handle(inputs: list[Any], outputs: list[Any]) -> Counter:
        k = _shape(inputs[left_arg])[-1]
        return Counter({family: math.prod(_shape(outputs[0])) * k})

    return handle


def _attention_handle(inputs: list[Any], outputs: list[Any]) -> Counter:
    # q (..., L, E), k (..., S, E), v (..., S, Ev); "..." is (B, H) and follows q
    # (with grouped-query attention every query head still does its own products).
    q, k, v = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2])
    batch, seq_q, dim_qk = math.prod(q[:-2]), q[-2], q[-1]
    seq_kv, dim_v = k[-2], v[-1]
    qk_macs = batch * seq_q * seq_kv * dim_qk  # Q @ K^T
    av_macs = batch * seq_q * seq_kv * dim_v  # softmax(...) @ V
    return Counter({"attention": qk_macs + av_macs})


def _native_attention_handle(inputs: list[Any], outputs: list[Any]) -> Counter:
    # nn.MultiheadAttention's fast path, taken under a jit trace in eval: (query, key, value,
    # embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, ...), batch first, so it counts
    # what F.multi_head_attention_forward's parts would: three projections, two products, one out.
    q, k, v, w_out = (_shape(inputs[i]) for i in (0, 1, 2, 7))
    embed, tokens_q, tokens_k, tokens_v = q[-1], math.prod(q[:-1]), math.prod(k[:-1]), math.prod(v[:-1])
    linear = (tokens_q + tokens_k + tokens_v) * embed * embed + tokens_q * embed * w_out[0]
    return Counter({"linear": linear, "attention": 2 * tokens_q * k[-2] * embed})


def _parse_einsum(
    equation: str, shapes: Sequence[tuple[int, ...]]
) -> tuple[list[str], str, dict[str, int]]:
    """Operand subscripts, output subscripts and letter sizes, with '...' expanded."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum {equation!r} has {len(terms)} terms for {len(shapes)} operands")
    # Ellipsis dims get placeholders outside [a-zA-Z] (so they cannot collide with
    # subscripts), aligned from the right as broadcasting does.
    ellipsis_rank = max(
        (
            len(s) - len(t.replace("...", ""))
            for t, s in zip(terms, shapes, strict=True)
            if "..." in t
        ),
        default=0,
    )
    placeholders = "".join(chr(0x100 + i) for i in range(ellipsis_rank))
    subscripts: list[str] = []
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        if "..." in term:
            rank = len(shape) - len(term.replace("...", ""))
            term = term.replace("...", placeholders[len(placeholders) - rank :])
        for letter, size in zip(term, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), size)
        subscripts.append(term)
    if arrow:
        output = rhs.replace("...", placeholders)
    else:  # implicit output: ellipsis first, then letters seen exactly once, sorted
        once = sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1)
        output = placeholders + "".join(once)
    return subscripts, output, sizes


def einsum_macs(equation: str, shapes: Sequence[tuple[int, ...]]) -> int:
    """MACs of an einsum contracted pairwise, left to right.

    A letter held by only one operand and absent from everything downstream is summed
    away before the product (as torch does), so it does not multiply the cost.

    Args:
        equation: Einsum equation, e.g. ``"bhnd,bhmd->bhnm"``.
        shapes: One shape per operand.

    Returns:
        Number of multiply-accumulates; 0 for a single operand (a pure reduction).

    Example:
        >>> einsum_macs("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)])
        120
    """
    subscripts, output, sizes = _parse_einsum(equation, shapes)
    macs = 0
    left = subscripts[0]
    for index in range(1, len(subscripts)):
        right = subscripts[index]
        downstream = set(output).union(*subscripts[index + 1 :])
        shared = set(left) & set(right)
        kept = (set(left) | set(right)) & (downstream | shared)
        macs += math.prod(sizes[c] for c in kept)
        left = "".join(sorted((set(left) | set(right)) & downstream))
    return macs


def _einsum_handle(inputs: list[Any], outputs: list[Any]) -> Counter:
    # aten::einsum(str equation, Tensor[] operands, int[]? path)
    equation = inputs[0].toIValue()
    operand_list = inputs[1].node()
    if operand_list.kind() != "prim::ListConstruct":
        raise ValueError(f"einsum operands come from {operand_list.kind()}, expected a list")
    shapes = [_shape(v) for v in operand_list.inputs()]
    return Counter({"einsum": einsum_macs(equation, shapes)})


_ATTENTION_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)

# Exact jit op name -> handle returning Counter({family: macs}).
MAC_HANDLES: Mapping[str, Handle] = {
    # _convolution / convolution: (input, weight, bias, stride, padding, dilation, transposed, ...)
    "aten::_convolution": _conv_handle("conv", transposed_arg=6),
    "aten::convolution": _conv_handle("conv", transposed_arg=6),
    "aten::conv1d": _conv_handle("conv", transposed_arg=None),
    "aten::conv2d": _conv_handle("conv", transposed_arg=None),
    "aten::conv3d": _conv_handle("conv", transposed_arg=None),
    "aten::conv_transpose1d": _conv_handle("conv", None, always_transposed=True),
    "aten::conv_transpose2d": _conv_handle("conv", None, always_transposed=True),
    "aten::conv_transpose3d": _conv_handle("conv", None, always_transposed=True),
    "aten::linear": _contraction_handle("linear", left_arg=0),  # (input, weight, bias)
    "aten::addmm": _contraction_handle("linear", left_arg=1),  # (bias, input, weight^T, ...)
    "aten::mm": _contraction_handle("matmul", left_arg=0),
    "aten::bmm": _contraction_handle("matmul", left_arg=0),
    "aten::matmul": _contraction_handle("matmul", left_arg=0),
    "aten::baddbmm": _contraction_handle("matmul", left_arg=1),  # (bias, batch1, batch2, ...)
    "aten::mv": _contraction_handle("matmul", left_arg=0),
    "aten::dot": _contraction_handle("matmul", left_arg=0),
    "aten::einsum": _einsum_handle,
    **{name: _attention_handle for name in _ATTENTION_OPS},
    "aten::_native_multi_head_attention": _native_attention_handle,
}


def _aten(*names: str) -> frozenset[str]:
    # Each op with its in-place twin (``add`` and ``add_``).
    return frozenset(f"aten::{n}{suffix}" for n in names for suffix in ("", "_"))


# Ops that cost no MACs by the convention above (fvcore already skips prim:: ops and
# pure views such as view/reshape/permute/transpose/cat).
ZERO_MAC_OPS: frozenset[str] = (
    _aten("add", "sub", "rsub", "mul", "div", "neg", "pow", "sqrt", "rsqrt", "exp", "log", "abs")
    | _aten("reciprocal", "square", "clamp_min", "clamp_max", "minimum", "maximum", "where")
    | _aten(
        "gelu", "silu", "sigmoid", "hardswish", "hardsigmoid", "tanh", "erf", "mish", "softplus"
    )
    | _aten("leaky_relu", "elu", "hardtanh", "relu6", "softmax", "log_softmax", "_softmax")
    | _aten("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")
    | _aten(
        "native_batch_norm",
        "native_layer_norm",
        "native_group_norm",
        "_native_batch_norm_legit_no_training",
    )
    | _aten("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d")
    | _aten(
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d"
    )
    | _aten("mean", "sum", "amax", "norm", "linalg_vector_norm", "cumsum")
    | _aten(
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "grid_sampler",
        "pixel_shuffle",
    )
    | _aten(
        "pad",
        "reshape_as",
        "view_as",
        "expand_as",
        "repeat",
        "tile",
        "flip",
        "clone",
        "masked_fill",
        "index_select",  # a gather, e.g. graphprune.sparsity.KernelConv2d's inputs
    )
    | _aten(
        "feature_dropout",
        "alpha_dropout",
        "ones_like",
        "empty_like",
        "rand",
        "randn",
        "normal",
        "fill",
    )
)


class MacCountAnalysis(FlopCountAnalysis):
    """fvcore's jit engine with graphprune's op table; its "flops" are MACs.

    Lazy like fvcore: the model is traced on the first query, as it is at that
    moment. Prefer ``analyze_macs``, which traces in eval mode without grad and
    restores the model. Add or override ops with ``.set_op_handle(name, handle)``.

    Example:
        >>> model = nn.Linear(8, 4)
        >>> MacCountAnalysis(model, torch.zeros(2, 8)).total()
        64
    """

    def __init__(self, model: nn.Module, inputs: Tensor | tuple[Tensor, ...]) -> None:
        super().__init__(model, inputs)
        self.clear_op_handles()  # drop fvcore's defaults: MAC_HANDLES is the single table
        self.set_op_handle(**MAC_HANDLES)
        self.set_op_handle(**dict.fromkeys(ZERO_MAC_OPS))  # None handle = explicitly zero
        self.unsupported_ops_warnings(False)  # reported through uncounted_ops instead
        self.uncalled_modules_warnings(False)
        self.tracer_warnings("none")


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass on the given inputs.

    Attributes:
        macs: Total multiply-accumulates (see module docstring for what counts).
        macs_by_module: Qualified module name -> MACs inside it; ``""`` is the model.
        macs_by_family: Op family (conv, linear, matmul, einsum, attention) -> MACs.
        uncounted_ops: Op name -> number of calls with no handle and no zero entry.
    """

    macs: int
    macs_by_module: Mapping[str, int] = field(hash=False)
    macs_by_family: Mapping[str, int] = field(hash=False)
    uncounted_ops: Mapping[str, int] = field(hash=False)

    @property
    def flops(self) -> int:
        """Floating-point operations, two per MAC."""
        return 2 * self.macs


def analyze_macs(model: nn.Module, example_inputs: ExampleInputs) -> MacCount:
    """Counts MACs of one forward pass, in total, per module and per op family.

    The model is traced in eval mode without grad; its train/eval flags are restored.

    Args:
        model: Model to trace; its parameters are not touched.
        example_inputs: A tensor or a sequence of positional tensors.

    Returns:
        The counts, including ops that stayed uncounted.

    Example:
        >>> count = analyze_macs(nn.Sequential(nn.Conv2d(3, 8, 3)), torch.zeros(1, 3, 10, 10))
        >>> count.macs, count.flops, count.macs_by_module["0"]
        (13824, 27648, 13824)
    """
    inputs = as_input_tuple(example_inputs)
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = MacCountAnalysis(model, inputs)
        macs_by_module = {name: int(macs) for name, macs in analysis.by_module().items()}
        macs_by_family = {name: int(macs) for name, macs in analysis.by_operator().items()}
        uncounted_ops = {name: int(n) for name, n in analysis.unsupported_ops().items()}
    return MacCount(
        macs=macs_by_module[""],
        macs_by_module=macs_by_module,
        macs_by_family=macs_by_family,
        uncounted_ops=uncounted_ops,
    )


def count_macs(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Total MACs of one forward pass (``flops = 2 * macs``).

    Args:
        model: Model to trace; left in the train/eval mode it was in.
        example_inputs: A tensor or a sequence of positional tensors.

    Returns:
        Multiply-accumulate count.

    Example:
        >>> count_macs(nn.Linear(16, 32), torch.zeros(1, 10, 16))  # 10 tokens * 16 * 32
        5120
    """
    return analyze_macs(model, example_inputs).macs

"""Shape verification without computing: the pruned model's forward on the meta device.

Verifying a plan only needs the pruned model to *run* and give outputs of the traced structure
and sizes: shapes, not values. On the meta device every op checks its shapes and allocates
nothing, so the forward costs its ops' shape functions, not its FLOPs. Those are not free (about
1 ms per op here, most of them written in Python), so a meta run pays only where the real one is
dearer: large models, large inputs, many threads' worth of compute (:func:`meta_is_cheaper`). At
batch 1 and 224 px the real forward of a timm classifier is as fast or faster (resnet50: 183 ms
real, 167 ms meta; efficientnet_b0: 36 vs 275 ms).

A meta run can only *confirm* a pruned model; whenever it cannot decide, the caller runs the
real forward:

* an error (a shape mismatch, or an op that needs values: ``.item()``, ``nonzero``, a tensor
  kept on the CPU outside the parameters and buffers) is not trusted as the verdict;
* any op that receives an integer or boolean tensor (indices, masks, token ids) may depend on
  values a meta tensor does not hold: an index out of range after a removal is only caught by a
  real run;
* attributes a forward assigns on its modules (caches of tensors, a buffer registered in forward)
  are restored afterwards, so no meta tensor outlives the check;
* a model with TorchScript submodules, lazy modules, forward hooks or torch's own attention
  layers (a native fast path that only real devices take) is checked for real
  (:func:`meta_unsuitable`).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> out = meta_outputs(net, (torch.randn(3, 4),))
    >>> out.shape, out.is_meta
    (torch.Size([3, 2]), True)
    >>> meta_outputs(torch.nn.Embedding(10, 4), (torch.tensor([1, 2]),)) is None  # indices: undecided
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["ValueReads", "attributes_restored", "meta_inputs", "meta_is_cheaper", "meta_outputs", "meta_state",
           "meta_unsuitable"]

# The cost model that picks meta or real (measured: torch 2.14.1, 1 thread, batch 1, timm's
# resnet50 / vit_small / convnext_tiny / efficientnet_b0 / mobilenetv3_large at 224 px): a meta
# forward costs about 1 ms per traced op (its kernels' shape functions run in Python: 167-353 ms
# per forward), a real one about 25 GMACs per second per thread (22-32 on the large models).
META_SECONDS_PER_OP = 1e-3
REAL_MACS_PER_SECOND_PER_THREAD = 25e9
# Models this large trace on meta by default (an LLM's real forward on a CPU): the op count is not
# known before the trace, so parameters stand in for the cost.
META_TRACE_PARAMETERS = 500_000_000

# Tensor methods that hand values to Python: a meta tensor has none
_VALUE_METHODS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__"})
# torch's native attention fast path runs on CPU / CUDA only: on meta the slow path would stand in for it
_DEVICE_PATHS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class ValueReads(TorchFunctionMode):
    """Notes the first call that may depend on values: one receiving a non-floating tensor, one
    handing values to Python (``item``, ``__bool__``, ...), or one that raised (even if the forward
    caught the error and took another branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if self.first is None:
            leaves, _ = tree_flatten((args, kwargs))
            if name in _VALUE_METHODS or any(isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())
                                             for t in leaves):
                self.first = name
        try:
            return func(*args, **kwargs)
        except Exception:
            self.first = self.first or f"{name} (raised)"
            raise


def meta_is_cheaper(macs: float, ops: int, threads: int | None = None) -> bool:
    """Whether a meta forward of ``ops`` traced ops beats a real one of ``macs`` multiply-adds.

    Example:
        >>> meta_is_cheaper(4.1e9, 175, threads=1)  # resnet50 at 224 px
        False
        >>> meta_is_cheaper(7e9 * 128, 2000, threads=2)  # a 7B LLM on 128 tokens
        True
    """
    threads = threads or torch.get_num_threads()
    return ops * META_SECONDS_PER_OP < macs / (REAL_MACS_PER_SECOND_PER_THREAD * threads)


def meta_unsuitable(model: nn.Module) -> str | None:
    """Why a meta forward cannot stand for the real one of ``model`` (``None``: it can).

    A TorchScript submodule runs ops the function mode cannot see; a lazy module would
    materialize meta weights; a module with forward hooks may recompute or observe its state
    (``torch.nn.utils.prune`` masks); torch's attention layers take a native fast path on real
    devices only.

    Example:
        >>> meta_unsuitable(torch.nn.Linear(2, 2)) is None, meta_unsuitable(torch.nn.LazyLinear(2))
        (True, "'' is a lazy module")
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            return f"{name!r} is a TorchScript module"
        if isinstance(module, nn.modules.lazy.LazyModuleMixin):
            return f"{name!r} is a lazy module"
        if module._forward_pre_hooks or module._forward_hooks:
            return f"{name!r} has forward hooks"
        if isinstance(module, _DEVICE_PATHS):
            return f"{name!r} ({type(module).__name__}) has a device-only fast path"
    return None


def _snapshot(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return list(value)
    return None


def _put_back(value: Any, items: Any) -> None:
    value.clear()
    if isinstance(value, dict):
        value.update(items)
    elif isinstance(value, list):
        value.extend(items)
    else:
        value.update(items)


@contextlib.contextmanager
def attributes_restored(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as they were, with the contents of its dict / list / set attributes
    and of its parameter, buffer and submodule tables (one level deep), and its class.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> with attributes_restored(net):
        ...     net.cache = 1
        ...     net.register_buffer("mask", torch.ones(2))
        >>> hasattr(net, "cache"), "mask" in net._buffers
        (False, False)
    """
    saved = []
    for module in model.modules():
        state = dict(vars(module))
        contents = {k: _snapshot(v) for k, v in state.items() if _snapshot(v) is not None}
        saved.append((module, type(module), state, contents))
    try:
        yield
    finally:
        for module, cls, state, contents in saved:
            for key in [k for k in vars(module) if k not in state]:
                del module.__dict__[key]
            for key, value in state.items():
                if key in contents:
                    _put_back(value, contents[key])
                module.__dict__[key] = value
            module.__class__ = cls


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def meta_inputs(args: Any) -> Any | None:
    """``args`` with every tensor replaced by a meta tensor of its size and dtype, or ``None`` when
    one of them is not floating point (token ids, indices: their values decide).

    Example:
        >>> meta_inputs((torch.zeros(2, 3),))[0].is_meta, meta_inputs((torch.tensor([1]),))
        (True, None)
    """
    copied = tree_map(_to_meta, args)
    leaves = tree_flatten(copied)[0]
    return None if any(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in leaves) else copied


def meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer name (tied names included) -> a meta copy; a tensor shared by
    several names gets one copy, and parameters stay ``nn.Parameter``.

    Example:
        >>> state = meta_state(torch.nn.Linear(2, 3))
        >>> {k: (tuple(v.shape), v.is_meta, type(v).__name__) for k, v in state.items()}
        {'weight': ((3, 2), True, 'Parameter'), 'bias': ((3,), True, 'Parameter')}
    """
    copies: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) not in copies:
            meta = tensor.to("meta")
            copies[id(tensor)] = (nn.Parameter(meta, requires_grad=tensor.requires_grad)
                                  if isinstance(tensor, nn.Parameter) else meta)
        state[name] = copies[id(tensor)]
    return state


def meta_outputs(model: nn.Module, args: tuple[Any, ...]) -> Any | None:
    """The outputs of ``model(*args)`` (eval mode, no grad) run on meta tensors, or ``None`` when
    a meta run cannot decide (see the module docstring); the model is left as it was.

    Args:
        model: the model, on the CPU or any device; its tensors are not touched.
        args: positional arguments of one call.

    Returns:
        The output structure with meta tensors of the real sizes, or ``None``.
    """
    if meta_unsuitable(model) is not None:
        return None
    reads = ValueReads()
    try:
        state, meta_args = meta_state(model), meta_inputs(args)  # outside the watch: copying reads int buffers
        if meta_args is None:
            return None
        with attributes_restored(model), torch.no_grad(), reads:  # restores the train / eval flags too
            model.eval()
            out = torch.func.functional_call(model, state, meta_args, strict=False, tie_weights=True)
    except Exception:  # a real run gives the verdict and the message
        return None
    return None if reads.first is not None else out

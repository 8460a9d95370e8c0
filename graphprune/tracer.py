"""Tracing: run the model once and record every torch function it calls.

Why a ``TorchFunctionMode`` and not ``torch.fx``: fx traces symbolically, so it fails on
data-dependent Python control flow, on shape arithmetic done in Python and on many
timm modules marked non-traceable. A function mode observes a *real* eager forward
pass, so it follows whatever code runs, sees the concrete shapes, and still sees every
call at the level users write it (``F.conv2d``, ``Tensor.reshape``, ``torch.cat``)
with the actual parameter objects as arguments. The price is that one trace describes
the path taken for these inputs; that is the path pruning must keep consistent.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import Iterator
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from ._runtime import paused_gc
from .elements import ElementStore, TensorInfo
from .errors import UnsupportedModelError
from .graph import OpRecord, TraceGraph
from .inputs import ExampleInputs, as_args
from .rules import RULES, Call, Context
from .rules.context import flat_tensors

# calls that return no tensor data worth following
_IGNORED = {"torch.Tensor.shape.__get__", "torch.Tensor.dim", "torch.Tensor.size", "torch.Tensor.ndim.__get__",
            "torch.Tensor.numel", "torch.Tensor.dtype.__get__", "torch.Tensor.device.__get__",
            "torch.Tensor.is_floating_point", "torch.Tensor.requires_grad.__get__", "torch.Tensor.__len__",
            "torch.Tensor.data_ptr", "torch.Tensor.is_contiguous", "torch.Tensor.stride", "torch.Tensor.item",
            "torch.Tensor.tolist", "torch.Tensor.__bool__", "torch.Tensor.__int__", "torch.Tensor.__float__",
            "torch.Tensor.__index__", "torch.Tensor.__hash__", "torch.Tensor.__format__", "torch.Tensor.__repr__",
            "torch.Tensor.grad_fn.__get__", "torch.Tensor.is_cuda.__get__", "torch.Tensor.layout.__get__",
            "torch.Tensor.__iter__", "torch.is_grad_enabled", "torch.Tensor.is_sparse.__get__",
            "torch.Tensor.untyped_storage", "torch.Tensor.is_nested.__get__", "torch.Tensor.element_size"}


@functools.lru_cache(maxsize=None)
def _methods_source(cls: type) -> str | None:
    """Source of every method but ``__init__`` along the class's MRO (up to ``nn.Module``)."""
    parts = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            if name != "__init__" and inspect.isfunction(value):
                try:
                    parts.append(inspect.getsource(value))
                except (OSError, TypeError):
                    return None
    return "\n".join(parts)


def _read_in_forward(module: nn.Module, attr: str) -> bool:
    """Whether the module's methods (other than ``__init__``) read ``self.<attr>``; True when unknown.

    torch's own layers keep their size attributes (``in_channels``, ``groups``) without a
    visible ``self.`` read; they are always candidates.
    """
    if type(module).__module__.startswith("torch.nn") or isinstance(module, nn.modules.conv._ConvNd):
        return True
    source = _methods_source(type(module))
    return source is None or f"self.{attr}" in source


_SHAPE_READS = {"torch.Tensor.shape.__get__", "torch.Tensor.size"}


def _is_int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (list, tuple)) and 0 < len(value) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _flat_ints(obj: Any) -> list[int]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int):
        return [obj]
    if isinstance(obj, (list, tuple, torch.Size)):
        return [i for item in obj for i in _flat_ints(item)]
    if isinstance(obj, dict):
        return [i for item in obj.values() for i in _flat_ints(item)]
    return []


class _Recorder(TorchFunctionMode):
    def __init__(self, ctx: Context, module_stack: list[str]):
        super().__init__()
        self.ctx = ctx
        self.module_stack = module_stack
        self.ops: list[OpRecord] = []
        self.graph = nx.DiGraph()
        self.producer: dict[int, int] = {}
        self.unsupported: Counter = Counter()
        self.modules: dict[str, nn.Module] = {}
        self._ints: dict[str, tuple[tuple[str, object], ...]] = {}

    def module_ints(self, name: str) -> tuple[tuple[str, object], ...]:
        found = self._ints.get(name)
        if found is None:
            module = self.modules.get(name)
            found = tuple((k, v) for k, v in vars(module).items()
                          if not k.startswith("_") and _is_int_like(v) and _read_in_forward(module, k)
                          ) if module is not None else ()
            self._ints[name] = found
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        if name in _SHAPE_READS and args and isinstance(args[0], torch.Tensor):
            self.ctx.shape_read(self.module_stack[-1], args[0])
        if name in _IGNORED:
            return out
        outputs = flat_tensors(out)
        if not outputs:
            return out
        call = Call(name, func, tuple(args), kwargs, out, self.module_stack[-1], len(self.ops))
        call.attributes = {v for _, v in self.module_ints(call.module) if isinstance(v, int)}
        inputs = call.tensor_args
        rule = RULES.get(name)
        self.ctx.store.current = f"{name} in {call.module or 'the model'}"
        if not any(self.ctx.is_tracked(t) for t in inputs):
            infos = [TensorInfo.free(o.dim()) for o in outputs]
        elif rule is None:
            self.ctx.freeze_all(inputs)
            self.unsupported[name] += 1
            infos = [TensorInfo.free(o.dim()) for o in outputs]
        else:
            try:
                infos = rule(self.ctx, call)
            except Exception as error:  # a rule that cannot handle this call freezes it
                self.ctx.freeze_all(inputs)
                self.unsupported[f"{name} (rule failed: {type(error).__name__}: {error})"] += 1
                infos = [TensorInfo.free(o.dim()) for o in outputs]
                rule = None
        for o, info in zip(outputs, infos):
            self.ctx.set_info(o, info)
        self._record(call, inputs, outputs, infos, rule is not None)
        return out

    def _record(self, call: Call, inputs, outputs, infos, handled: bool) -> None:
        node = call.index
        self.graph.add_node(node, name=call.name, module=call.module)
        for t in inputs:
            source = self.producer.get(id(t))
            if source is not None:
                self.graph.add_edge(source, node)
        for o in outputs:
            self.producer[id(o)] = node
        int_args = tuple(i for i in _flat_ints((call.args[1:], call.kwargs)) if i not in call.dynamic)
        self.ops.append(OpRecord(node, call.name, call.module, int_args, tuple(infos), handled,
                                 self.module_ints(call.module) if int_args else ()))


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore train/eval mode of every module and ``requires_grad`` of every parameter on exit.

    Example:
        >>> m = torch.nn.Linear(2, 2).train()
        >>> with preserved_state(m):
        ...     _ = m.eval()
        >>> m.training
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def _pusher(stack: list[str], name: str, ctx: Context):
    def hook(*_: Any) -> None:
        stack.append(name)
        ctx.module_entered(name)
    return hook


def _popper(stack: list[str]):
    def hook(*_: Any) -> None:
        stack.pop()
    return hook


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: list[str], ctx: Context) -> Iterator[None]:
    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(_pusher(stack, name, ctx)))
            handles.append(module.register_forward_hook(_popper(stack), always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def state_names(model: nn.Module) -> dict[int, str]:
    """``id(tensor) -> qualified name`` for every parameter and buffer (first name wins for shared ones)."""
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), name)
    return names


def trace(model: nn.Module, example_inputs: ExampleInputs = None) -> TraceGraph:
    """Run ``model`` once in eval mode and build its channel dependency graph.

    Args:
        model: any ``nn.Module``; it is left exactly as it was (mode, hooks, ``requires_grad``).
        example_inputs: a tensor or a tuple of positional arguments; ``None`` uses one image
            of the timm model's ``pretrained_cfg["input_size"]``.

    Returns:
        The :class:`~graphprune.graph.TraceGraph`.

    Raises:
        UnsupportedModelError: if the forward pass fails on the example inputs.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 1))
        >>> graph = gp.trace(net, torch.randn(1, 3, 16, 16))
        >>> sorted(graph.graph.nodes(data="name"))[0]
        (0, 'torch.nn.functional.conv2d')
    """
    args = as_args(model, example_inputs)
    store = ElementStore()
    ctx = Context(store, state_names(model))
    stack = [""]
    recorder = _Recorder(ctx, stack)
    recorder.modules = dict(model.named_modules())
    with paused_gc(), preserved_state(model), _module_stack(model, stack, ctx), torch.no_grad():
        model.eval()
        try:
            with recorder:
                out = model(*args)
        except Exception as error:  # the model's own failure, reported with its cause
            raise UnsupportedModelError(
                f"tracing {type(model).__name__} failed while running its forward pass: "
                f"{type(error).__name__}: {error}") from error
    with paused_gc():
        return _finish(recorder, ctx, store, out)


def _finish(recorder: _Recorder, ctx: Context, store: ElementStore, out: Any) -> TraceGraph:
    outputs = tuple(ctx.info(o) for o in flat_tensors(out))
    store.current = "model output"
    for info in outputs:
        for d in info.dims:
            if d is not None:
                store.freeze(d)
    classes = store.resolve()
    return TraceGraph(recorder.graph, tuple(recorder.ops), store, classes, store.frozen_classes(classes),
                      dict(ctx.state_infos), recorder.unsupported, outputs,
                      tuple(tuple(o.shape) for o in flat_tensors(out)), store.statistic_classes(classes),
                      tuple(ctx.costs))

# Over 350 lines: the recorder's dispatch and the trace it finishes share its private state; one mode, one module.
"""Tracing: run the model once and record every torch function it calls.

Why a ``TorchFunctionMode`` and not ``torch.fx``: fx traces symbolically, so it fails on
data-dependent Python control flow, on shape arithmetic done in Python and on many
timm modules marked non-traceable. A function mode observes a *real* eager forward
pass, so it follows whatever code runs, sees the concrete shapes, and still sees every
call at the level users write it (``F.conv2d``, ``Tensor.reshape``, ``torch.cat``)
with the actual parameter objects as arguments. The price is that one trace describes
the path taken for these inputs; that is the path pruning must keep consistent. Several
example inputs run one after another into the same element store, so the graph is the
union of the paths they take; parameters none of them used are listed as ``untraced``.

With ``meta`` (the default for models of 500M parameters and more) the forward runs on meta copies
of the weights and inputs first (``torch.func.functional_call``: every op checks shapes, none
computes), so tracing costs the graph's size, not its FLOPs; where a meta run cannot stand for the
real one (an op needs values: ``.item()``, ``nonzero``, an integer index or token ids; a tensor
kept outside the parameters and buffers) the real forward is traced instead.
:attr:`TraceGraph.forward` says which ran. A meta op costs about 1 ms here
(:mod:`graphprune.verify_meta`), so for the usual classifier the real forward is the cheaper one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
from collections import Counter
from collections.abc import Iterator
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, resolve_name

from ._runtime import paused_gc
from .elements import ElementStore, TensorInfo
from .errors import UnsupportedModelError
from .graph import OpRecord, TracedOutput, TraceGraph, model_fingerprint
from .inputs import ExampleInputs, as_examples
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


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, comprehensions, lambdas
            names |= _code_names(const)
    return names


@functools.lru_cache(maxsize=None)
def _methods_names(cls: type) -> frozenset[str] | None:
    """Attribute and global names read by every method but ``__init__`` along the class's MRO
    (up to ``nn.Module``), from the compiled code: no source files are read."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            if name == "__init__":
                continue
            value = getattr(value, "__func__", value)  # static and class methods
            if isinstance(value, property):
                value = value.fget
            code = getattr(value, "__code__", None)
            if inspect.isfunction(value) and code is not None:
                names |= _code_names(code)
            elif name == "forward":  # a forward we cannot read (scripted, compiled)
                return None
    return frozenset(names)


def _read_in_forward(module: nn.Module, attr: str) -> bool:
    """Whether the module's methods (other than ``__init__``) read ``<obj>.<attr>``; True when unknown.

    torch's own layers keep their size attributes (``in_channels``, ``groups``) without a
    visible read in Python; they are always candidates.
    """
    if type(module).__module__.startswith("torch.nn") or isinstance(module, nn.modules.conv._ConvNd):
        return True
    names = _methods_names(type(module))
    return names is None or attr in names


_SHAPE_READS = {"torch.Tensor.shape.__get__", "torch.Tensor.size"}

# ops whose output size follows the values of their input (detection post-processing)
_DATA_SIZED = {"torch.nonzero", "torch.Tensor.nonzero", "torch.argwhere", "torch.Tensor.argwhere",
               "torch.masked_select", "torch.Tensor.masked_select", "torch.unique", "torch.Tensor.unique",
               "torch.unique_consecutive", "torch.Tensor.unique_consecutive", "torch._ops.torchvision.nms.default",
               "torchvision.nms.default", "torchvision::nms"}


def _sizes_follow_data(name: str, args: tuple, inputs: list[torch.Tensor]) -> bool:
    """Whether this call's output size depends on tensor values (not only on input sizes)."""
    if name in _DATA_SIZED:
        return True
    if name == "torch.where" and len(args) == 1:
        return True
    return name == "torch.Tensor.__getitem__" and any(t.dtype == torch.bool for t in inputs[1:])


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


_NAMES: dict[Any, str] = {}  # func -> resolved name; resolve_name is slow per call


def _name_of(func: Any) -> str:
    try:
        return _NAMES[func]
    except KeyError:
        name = _NAMES[func] = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        return name
    except TypeError:  # an unhashable callable
        return resolve_name(func) or getattr(func, "__qualname__", repr(func))


class _Recorder(TorchFunctionMode):
    def __init__(self, ctx: Context, module_stack: list[str]):
        super().__init__()
        self.ctx = ctx
        self.module_stack = module_stack
        self.ops: list[OpRecord] = []
        self.edges: list[tuple[int, int]] = []
        self.producer: dict[int, int] = {}
        self.unsupported: Counter = Counter()
        self.modules: dict[str, nn.Module] = {}
        self._ints: dict[str, tuple[tuple[str, object], ...]] = {}
        self._attributes: dict[str, set[int]] = {}
        self.data_sized: set[int] = set()  # ids of tensors whose size follows the data
        self.data_sized_calls = 0  # calls whose output size followed the data, so far

    def module_ints(self, name: str) -> tuple[tuple[str, object], ...]:
        found = self._ints.get(name)
        if found is None:
            module = self.modules.get(name)
            found = tuple((k, v) for k, v in vars(module).items()
                          if not k.startswith("_") and _is_int_like(v) and _read_in_forward(module, k)
                          ) if module is not None else ()
            self._ints[name] = found
        return found

    def module_attributes(self, name: str) -> set[int]:
        found = self._attributes.get(name)
        if found is None:
            found = self._attributes[name] = {v for _, v in self.module_ints(name) if isinstance(v, int)}
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name_of(func)
        if name in _SHAPE_READS and args and isinstance(args[0], torch.Tensor):
            self.ctx.shape_read(self.module_stack[-1], args[0])
        if name in _IGNORED:
            return out
        outputs = flat_tensors(out)
        if not outputs:
            return out
        module = self.module_stack[-1]
        call = Call(name, func, tuple(args), kwargs, out, module, len(self.ops), attributes=self.module_attributes(module))
        inputs = call.tensor_args
        rule = RULES.get(name)
        self.ctx.store.current = f"{name} in {module or 'the model'}"
        self.ctx.numbers_used(call)  # a channel count read from a shape, used as a value
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
        if _sizes_follow_data(name, args, inputs):
            self.data_sized_calls += 1
            self.data_sized.update(id(o) for o in outputs)
        elif any(id(t) in self.data_sized for t in inputs):
            self.data_sized.update(id(o) for o in outputs)
        self._record(call, inputs, outputs, infos, rule is not None)
        return out

    def _record(self, call: Call, inputs, outputs, infos, handled: bool) -> None:
        node = call.index
        producer = self.producer
        for t in inputs:
            source = producer.get(id(t))
            if source is not None:
                self.edges.append((source, node))
        for o in outputs:
            producer[id(o)] = node
        int_args = tuple(i for i in _flat_ints((call.args[1:], call.kwargs)) if i not in call.dynamic)
        self.ops.append(OpRecord(node, call.name, call.module, int_args, tuple(infos), handled,
                                 self.module_ints(call.module) if int_args else ()))

    def graph(self) -> nx.DiGraph:
        """The op graph, built in bulk at the end (one node per op, edges producer -> consumer)."""
        graph = nx.DiGraph()
        graph.add_nodes_from((op.index, {"name": op.name, "module": op.module}) for op in self.ops)
        graph.add_edges_from(self.edges)
        return graph


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


@contextlib.contextmanager
def _module_stack(modules: dict[str, nn.Module], stack: list[str], ctx: Context) -> Iterator[None]:
    """Keep ``stack[-1]`` the qualified name of the innermost module of ``model`` running.

    Two process-wide hooks (removed on exit) instead of two per module: registering and
    removing hundreds of hooks cost more than the calls they observe.
    """
    names = {id(module): name for name, module in modules.items()}

    def push(module: nn.Module, *_: Any) -> None:
        name = names.get(id(module))
        if name is not None:
            stack.append(name)
            ctx.module_entered(name)

    def pop(module: nn.Module, *_: Any) -> None:
        if id(module) in names:
            stack.pop()

    handles = []
    try:
        handles.append(register_module_forward_pre_hook(push))
        handles.append(register_module_forward_hook(pop, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def state_names(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[int, str]:
    """``id(tensor) -> qualified name`` for every parameter and buffer (first name wins for shared ones),
    or for the tensors of ``state`` standing in for them (meta copies, named the same)."""
    pairs = (list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
             if state is None else state.items())
    names: dict[int, str] = {}
    for name, t in pairs:
        names.setdefault(id(t), name)
    return names


def trace(model: nn.Module, example_inputs: ExampleInputs = None, *, meta: bool | None = None) -> TraceGraph:
    """Run ``model`` in eval mode on each example input and build its channel dependency graph.

    Args:
        model: any ``nn.Module``; it is left exactly as it was (mode, hooks, ``requires_grad``).
        example_inputs: a tensor or a tuple of positional arguments; a list of those to
            trace each (the graph is the union of the paths they take: give one per branch
            of a forward that branches on the data); ``None`` uses one image of the timm
            model's ``pretrained_cfg["input_size"]``.
        meta: run the forward on meta copies first (see the module docstring); ``False``
            traces the real forward only; ``None`` (the default): meta for models of at least
            :data:`~graphprune.verify_meta.META_TRACE_PARAMETERS` parameters, whose real forward
            costs more than a meta one (for a timm classifier at 224 px it costs less).

    Returns:
        The :class:`~graphprune.graph.TraceGraph`; its ``untraced`` names the parameters no
        example input reached, its ``forward`` whether the meta or the real forward was traced.

    Raises:
        UnsupportedModelError: if the forward pass fails on an example input.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 1))
        >>> graph = gp.trace(net, torch.randn(1, 3, 16, 16))
        >>> sorted(graph.graph.nodes(data="name"))[0]
        (0, 'torch.nn.functional.conv2d')
        >>> graph.untraced, len(gp.trace(net, [torch.randn(1, 3, 16, 16), torch.randn(2, 3, 8, 8)]).outputs)
        ((), 2)
        >>> graph.forward, gp.trace(net, torch.randn(1, 3, 16, 16), meta=True).forward
        ('real', 'meta')
    """
    examples = as_examples(model, example_inputs)
    if meta is None:
        from .verify_meta import META_TRACE_PARAMETERS

        meta = sum(p.numel() for p in model.parameters()) >= META_TRACE_PARAMETERS
    if meta and not any(t.is_meta for t in model.parameters()):
        graph = _trace_on_meta(model, examples)
        if graph is not None:
            return graph
    return _trace(model, examples, None)


def _trace_on_meta(model: nn.Module, examples: list[tuple[Any, ...]]) -> TraceGraph | None:
    """The trace of a forward on meta copies of the weights and inputs (shapes without compute), or
    ``None`` where a meta run cannot stand for the real one (see :mod:`graphprune.verify_meta`:
    an error, an op receiving integer tensors, whose values a meta tensor lacks)."""
    from .verify_meta import ValueReads, attributes_restored, meta_inputs, meta_state, meta_unsuitable

    if meta_unsuitable(model) is not None:
        return None
    reads = ValueReads()
    try:
        state = meta_state(model)
        meta_examples = [meta_inputs(args) for args in examples]
        if any(args is None for args in meta_examples):
            return None
        with attributes_restored(model):
            graph = _trace(model, meta_examples, state, reads)
    except Exception:  # the real trace decides, and reports the model's own failure
        return None
    return None if reads.first is not None else dataclasses.replace(graph, forward="meta")


def _trace(model: nn.Module, examples: list[tuple[Any, ...]], state: dict[str, torch.Tensor] | None,
           watch: TorchFunctionMode | None = None) -> TraceGraph:
    """One traced forward per example; ``state``: tensors standing in for the model's (meta copies);
    ``watch``: a mode that sees the forward's calls (not the recorder's own)."""
    store = ElementStore()
    ctx = Context(store, state_names(model, state))
    stack = [""]
    recorder = _Recorder(ctx, stack)
    recorder.modules = dict(model.named_modules())
    outs, data_sized = [], []  # per example: the output, and whether an op's output size followed the data
    with paused_gc(), preserved_state(model), _module_stack(recorder.modules, stack, ctx), torch.no_grad():
        model.eval()
        for number, args in enumerate(examples, start=1):
            try:
                calls = recorder.data_sized_calls
                with recorder, (watch or contextlib.nullcontext()):
                    outs.append(model(*args) if state is None else
                                torch.func.functional_call(model, state, args, tie_weights=True))
                data_sized.append(recorder.data_sized_calls > calls)
            except Exception as error:  # the model's own failure, reported with its cause
                which = f" on example input {number} of {len(examples)}" if len(examples) > 1 else ""
                raise UnsupportedModelError(
                    f"tracing {type(model).__name__} failed while running its forward pass{which}: "
                    f"{type(error).__name__}: {error}") from error
    with paused_gc():
        return _finish(recorder, ctx, store, list(zip(outs, data_sized)), model)


def _untraced(model: nn.Module, used: dict) -> tuple[str, ...]:
    """Floating-point parameters (first name of tied ones) that no traced call used."""
    return tuple(name for name, p in model.named_parameters() if p.is_floating_point() and name not in used)


def _leading_dim_follows_data(recorder: _Recorder, tensor: torch.Tensor, info: TensorInfo, run_saw: bool) -> bool:
    """A tensor downstream of an op whose output size follows the data, or one whose leading dim is
    channel-free in a forward that ran such an op (a size the forward computed in Python from it)."""
    return tensor.dim() > 0 and (id(tensor) in recorder.data_sized or (run_saw and info.dims[0] is None))


def _finish(recorder: _Recorder, ctx: Context, store: ElementStore, outs: list, model: nn.Module) -> TraceGraph:
    from torch.utils._pytree import tree_structure

    store.current = "model output"
    outputs = []
    for out, run_saw in outs:
        tensors = flat_tensors(out)
        infos = tuple(ctx.info(o) for o in tensors)
        for info in infos:
            for d in info.dims:
                if d is not None:
                    store.freeze(d)
        outputs.append(TracedOutput(tree_structure(out), tuple(tuple(o.shape) for o in tensors), infos,
                                    tuple(_leading_dim_follows_data(recorder, o, i, run_saw)
                                          for o, i in zip(tensors, infos))))
    classes = store.resolve()
    return TraceGraph(graph=recorder.graph(), ops=tuple(recorder.ops), store=store, classes=classes,
                      frozen=store.frozen_classes(classes), state_infos=dict(ctx.state_infos),
                      unsupported=recorder.unsupported, output_infos=tuple(i for o in outputs for i in o.infos),
                      output_shapes=tuple(s for o in outputs for s in o.shapes),
                      statistic=store.statistic_classes(classes), costs=tuple(ctx.costs),
                      module_ints={name: recorder.module_ints(name) for name in recorder.modules},
                      outputs=tuple(outputs), untraced=_untraced(model, ctx.state_infos),
                      fingerprint=model_fingerprint(model))

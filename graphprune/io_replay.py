"""Replaying a record's plans on the meta device, each one checked against the model it edits first.

A saved record lists plans as JSON. :func:`replay_on_meta` parses and applies them one by one
to a model built on the meta device (shapes only, no memory), and checks each plan against
that model *before* expanding or applying it:

* a channel plan's edits name tensors the model has, with ``size`` equal to the tensor's
  current size along ``dim`` (so expanding the index runs costs at most the sizes of the
  model's dimensions, whatever the runs claim), each ``(tensor, dim)`` once;
* its attribute patches pass :func:`check_patch`: only a size-like attribute, of an allowed
  name and type, whose current value is the recorded ``old``, shrinking to ``new``;
* a block plan's proxies are bounded by :meth:`graphprune.blocks.BlockPlan.from_json` and
  built on the meta device;
* a kernel plan (:mod:`graphprune.sparsity.kernel_plan`) names dense ``nn.Conv2d`` layers with
  the channel counts the model has; its gather indices are checked when the weights load.

Any failure is a :class:`~graphprune.io_record.ModelFileError` naming the plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError
from .io_record import ModelFileError
from .patches import AttrPatch
from .plan import PLAN_FORMAT, Plan

# Attributes a channel removal never changes: geometry, not widths. A plan may not patch them.
FIXED_ATTRIBUTES = frozenset({
    "stride", "padding", "dilation", "kernel_size", "output_padding", "padding_mode", "patch_size", "img_size",
    "grid_size", "window_size", "shift_size", "pool_size", "num_prefix_tokens", "num_classes", "training",
})
# torch.nn layers keep their sizes in attributes that removal derives from the weights; a plan
# may patch only those their forward reads (a grouped conv's group count, a norm's shape, an
# nn.MultiheadAttention's head layout). Any other torch.nn layer: none.
TORCH_NN_PATCHABLE: Mapping[type, frozenset[str]] = {
    nn.modules.conv._ConvNd: frozenset({"groups"}),
    nn.LayerNorm: frozenset({"normalized_shape"}),
    nn.RMSNorm: frozenset({"normalized_shape"}),
    nn.GroupNorm: frozenset({"num_groups", "num_channels"}),
    nn.MultiheadAttention: frozenset({"num_heads", "head_dim", "embed_dim", "kdim", "vdim"}),
}


_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _allowed_names(module: nn.Module) -> frozenset[str] | None:
    """The attribute names a plan may patch on ``module``; ``None``: any size-like public attribute."""
    if not type(module).__module__.startswith("torch.nn") or type(module) in _CONTAINERS:
        return None
    for kind, names in TORCH_NN_PATCHABLE.items():
        if isinstance(module, kind):
            return names
    return frozenset()


def _is_size(value: object) -> bool:
    """An int (not a bool), or a short tuple/list of ints: what a plan patches."""
    if isinstance(value, (list, tuple)):
        return 0 < len(value) <= 16 and all(type(v) is int for v in value)
    return type(value) is int


def check_patch(modules: Mapping[str, nn.Module], patch: AttrPatch) -> None:
    """Refuse a patch that channel removal could not have produced.

    Allowed: a public attribute in the module's own ``__dict__`` (not a method, property,
    submodule, parameter or buffer), not one of :data:`FIXED_ATTRIBUTES`, on a torch.nn layer
    only the names in :data:`TORCH_NN_PATCHABLE`; its value an int or a tuple/list of ints
    equal to ``patch.old``; ``patch.new`` of the same length, each entry at most the old one
    (removal only shrinks sizes) and positive where it changes.

    Raises:
        InvalidArgumentError: saying which rule the patch breaks.

    Example:
        >>> block = nn.Module()
        >>> block.num_heads = 6
        >>> check_patch({"attn": block}, AttrPatch("attn", "num_heads", 6, 3))
        >>> check_patch({"attn": block}, AttrPatch("attn", "num_heads", 999, 3))
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: the plan patches attn.num_heads from 999, but the model has 6
    """
    where = f"{patch.module}.{patch.attr}" if patch.module else patch.attr
    module = modules.get(patch.module)
    if module is None:
        raise InvalidArgumentError(f"the plan patches {where}, but the model has no module {patch.module!r}")
    allowed = _allowed_names(module)
    if (patch.attr.startswith("_") or patch.attr in FIXED_ATTRIBUTES or patch.attr not in vars(module)
            or (allowed is not None and patch.attr not in allowed)):
        raise InvalidArgumentError(
            f"the plan patches {where}, which is not an attribute channel removal changes (allowed: public size "
            f"attributes of the module itself, not {sorted(FIXED_ATTRIBUTES)}; on a torch.nn "
            f"{type(module).__name__}: {sorted(allowed) if allowed is not None else 'any'})")
    value = vars(module)[patch.attr]
    if not _is_size(value):
        raise InvalidArgumentError(f"the plan patches {where}, which holds a {type(value).__name__}, not a size")
    current = tuple(value) if isinstance(value, (list, tuple)) else value
    if current != patch.old:
        raise InvalidArgumentError(f"the plan patches {where} from {patch.old}, but the model has {current}")
    old = patch.old if isinstance(patch.old, tuple) else (patch.old,)
    new = patch.new if isinstance(patch.new, tuple) else (patch.new,)
    if (isinstance(patch.old, tuple) != isinstance(patch.new, tuple) or len(old) != len(new)
            or any(n != o and not 0 < n < o for o, n in zip(old, new))):
        raise InvalidArgumentError(f"the plan patches {where} from {patch.old} to {patch.new}; removal only shrinks "
                                   "sizes, keeping the type and length")


def _tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = module_name + "." if module_name else ""
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    shapes[prefix + name] = tuple(tensor.shape)
    return shapes


def _check_edits(edits: object, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Each raw edit names a tensor of the model, a dim it has, and that dim's current size."""
    if not isinstance(edits, list):
        raise InvalidArgumentError("edits must be a list")
    seen = set()
    for edit in edits:
        if not isinstance(edit, dict):
            raise InvalidArgumentError(f"an edit is a JSON object, got {edit!r:.80}")
        name, dim, size = edit.get("name"), edit.get("dim"), edit.get("size")
        shape = shapes.get(name) if isinstance(name, str) else None
        if shape is None:
            raise InvalidArgumentError(f"an edit names {name!r:.80}, which the model does not have at this point")
        if type(dim) is not int or not 0 <= dim < len(shape):
            raise InvalidArgumentError(f"the edit of {name!r} has dim {dim!r:.40}; the tensor has shape {list(shape)}")
        if type(size) is not int or size != shape[dim]:
            raise InvalidArgumentError(f"the edit of {name!r} expects size {size!r:.40} in dim {dim}, the tensor has "
                                       f"{shape[dim]}; was the plan made for another model, or already applied?")
        if (name, dim) in seen:
            raise InvalidArgumentError(f"the plan edits {name!r} dim {dim} twice")
        seen.add((name, dim))


def parse_channel_plan(data: Mapping[str, Any], model: nn.Module) -> Plan:
    """Check a channel plan's JSON against ``model`` (as it is now), then parse it.

    Raises:
        InvalidArgumentError: the plan does not fit, naming the edit or patch.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8))
        >>> data = {"format": PLAN_FORMAT, "removed": {}, "patches": [],
        ...         "edits": [{"name": "0.weight", "dim": 0, "size": 8, "keep": [[0, 20000000]]}]}
        >>> try:
        ...     parse_channel_plan(data, net)
        ... except InvalidArgumentError as error:
        ...     print(str(error).split(": ")[-1])
        run [0, 20000000] is not inside [0, 8)
    """
    shapes = _tensor_shapes(model)
    _check_edits(data.get("edits"), shapes)
    largest = max((max(s) for s in shapes.values() if s), default=0)
    plan = Plan.from_json(json.dumps(data), max_size=largest)
    modules = dict(model.named_modules())
    for patch in plan.patches:
        check_patch(modules, patch)
    return plan


def replay_on_meta(model: nn.Module, plans: Sequence[Mapping[str, Any]], where: str) -> tuple[Any, ...]:
    """Parse, check and apply ``plans`` (JSON objects, oldest first) to ``model``, a meta-device model.

    Returns:
        The parsed plans (:class:`~graphprune.plan.Plan` or
        :class:`~graphprune.blocks.BlockPlan`), to re-apply to a real model.

    Raises:
        ModelFileError: ``"<where>: plan N of M ..."`` with what does not fit.

    Example:
        >>> with torch.device("meta"):
        ...     net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> plan = {"format": PLAN_FORMAT, "removed": {"0": [0]}, "patches": [], "edits": [
        ...     {"name": "0.weight", "dim": 0, "size": 8, "keep": [[1, 8]]},
        ...     {"name": "0.bias", "dim": 0, "size": 8, "keep": [[1, 8]]},
        ...     {"name": "2.weight", "dim": 1, "size": 8, "keep": [[1, 8]]}]}
        >>> _ = replay_on_meta(net, [plan], "m")
        >>> net[2].in_features
        7
    """
    from .blocks import BLOCK_PLAN_FORMAT, BlockPlan, apply_block_plan_
    from .removal import apply_plan_
    from .sparsity.kernel_plan import KERNEL_PLAN_FORMAT, KernelPlan, apply_kernel_plan_

    parsed = []
    for number, data in enumerate(plans, start=1):
        try:
            if data.get("format") == BLOCK_PLAN_FORMAT:
                plan = BlockPlan.from_json(json.dumps(data))
                with torch.device("meta"):  # a proxy is built here: shapes only
                    apply_block_plan_(model, plan, record=False)
            elif data.get("format") == PLAN_FORMAT:
                plan = parse_channel_plan(data, model)
                with torch.device("meta"):
                    apply_plan_(model, plan)
            elif data.get("format") == KERNEL_PLAN_FORMAT:  # sizes checked against the model's convs
                plan = KernelPlan.from_json(json.dumps(data))
                with torch.device("meta"):
                    apply_kernel_plan_(model, plan)
            else:
                raise InvalidArgumentError(f"format {data.get('format')!r:.80} is neither {PLAN_FORMAT!r}, "
                                           f"{BLOCK_PLAN_FORMAT!r} nor {KERNEL_PLAN_FORMAT!r}")
        except (InvalidArgumentError, RuntimeError, ValueError, TypeError, IndexError, KeyError,
                AttributeError) as error:
            raise ModelFileError(f"{where}: plan {number} of {len(plans)} does not fit the model: {error}") from error
        parsed.append(plan)
    return tuple(parsed)


class AllocationLimit(torch.overrides.TorchFunctionMode):
    """Refuse tensor factories (``torch.empty``, ``zeros``, ...) once they would create more than
    ``max_numel`` elements in all: a bound on building a model whose size is not known yet.

    Example:
        >>> with AllocationLimit(100):
        ...     _ = torch.nn.Linear(4, 4)
        >>> try:
        ...     with AllocationLimit(100):
        ...         _ = torch.nn.Linear(100, 100)
        ... except ModelFileError as error:
        ...     print(type(error).__name__)
        ModelFileError
    """

    SIZED = frozenset({torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn})  # size first
    SIZED_FIRST_ARG = frozenset({torch.full, torch.empty_strided})

    def __init__(self, max_numel: int) -> None:
        super().__init__()
        self.max_numel = max_numel
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        numel = _requested_numel(func, args, kwargs, self)
        if numel is not None:
            self._count(numel)  # before the tensor exists
        out = func(*args, **kwargs)
        if func is torch.tensor and isinstance(out, torch.Tensor):
            self._count(out.numel())  # its data was in Python memory already
        return out

    def _count(self, numel: int) -> None:
        self.numel += numel
        if self.numel > self.max_numel:
            raise ModelFileError(f"building the model would create more than {self.max_numel} elements, far more "
                                 "than the saved weights hold; the record's architecture does not match them")


def _requested_numel(func, args: tuple, kwargs: dict, limit: AllocationLimit) -> int | None:
    """How many elements a factory call will create, read from its arguments; ``None``: not a factory."""
    if func in limit.SIZED or func in limit.SIZED_FIRST_ARG:
        size = kwargs.get("size", args[0] if args else ())
        if func in limit.SIZED and args and not isinstance(args[0], (tuple, list, torch.Size)):
            size = args  # torch.empty(3, 4)
        return _numel(size)
    try:
        if func in (torch.linspace, torch.logspace):
            return max(int(kwargs.get("steps", args[2] if len(args) > 2 else 0)), 0)
        if func is torch.arange:  # arange(end), arange(start, end), arange(start, end, step), or keywords
            values = [float(a) for a in args[:3]]
            values = [0.0, *values] if len(values) == 1 else values
            start = float(kwargs.get("start", values[0] if values else 0.0))
            end = float(kwargs.get("end", values[1] if len(values) > 1 else 0.0))
            step = float(kwargs.get("step", values[2] if len(values) > 2 else 1.0))
            return max(math.ceil((end - start) / step), 0) if step else 0
        if func is torch.eye:
            n = int(args[0] if args else kwargs.get("n", 0))
            return n * int(args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("m", n))
        if func is torch.randint:
            return _numel(kwargs.get("size", next((a for a in args if isinstance(a, (tuple, list, torch.Size))), ())))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # unusual arguments: the call itself will say what is wrong
    return None


def _numel(size: object) -> int:
    numel = 1
    for d in size if isinstance(size, (tuple, list, torch.Size)) else (size,):
        numel *= max(int(d), 0) if isinstance(d, int) else 1
    return numel

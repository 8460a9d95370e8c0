"""Kernel pruning as a structural transform, and its plan (``graphprune.kernels/1``) for save / load.

:func:`kernel_prune_` scores every kernel of the chosen dense convs (``|w|`` summed over the
``kh x kw`` window for ``"magnitude"``, ``U(0, 1)`` for ``"random"``), keeps the ``k`` best per
output channel, and swaps each conv for a :class:`~graphprune.sparsity.kernel_conv.KernelConv2d`.
The transform is all-or-nothing: every replacement is built before the first swap.

The plan is data: ``{"format": "graphprune.kernels/1", "layers": [{"name", "in_channels",
"out_channels", "kernels_per_output"}, ...]}``. It is appended to ``model.graphprune_plans``
like a channel plan, so :func:`graphprune.io.save` records it; :func:`apply_kernel_plan_`
rebuilds the module shapes on a fresh model and the gather indices come back from the weights
file (the ``input_index`` buffers), checked when they are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..groups import classifier_names
from ..history import entry_format, record_plan
from .kernel_conv import KernelConv2d, check_dense_conv, check_kernels_per_output

KERNEL_PLAN_FORMAT = "graphprune.kernels/1"
KERNEL_SIGNALS = ("magnitude", "random")
_MAX_LAYERS = 100_000
_MAX_NAME = 1000


@dataclass(frozen=True)
class KernelLayer:
    """One conv of a kernel plan: its dense sizes and the kernels each output keeps."""

    name: str
    in_channels: int
    out_channels: int
    kernels_per_output: int


@dataclass(frozen=True)
class KernelPlan:
    """Which convs became :class:`KernelConv2d`, and with how many kernels per output.

    Example:
        >>> plan = KernelPlan((KernelLayer("conv", 8, 16, 2),))
        >>> KernelPlan.from_json(plan.to_json()) == plan
        True
    """

    layers: tuple[KernelLayer, ...]

    def to_json(self) -> str:
        """The plan as JSON (the form ``model.graphprune_plans`` and a saved record hold)."""
        return json.dumps({"format": KERNEL_PLAN_FORMAT, "layers": [vars(layer) for layer in self.layers]})

    @staticmethod
    def from_json(text: str) -> KernelPlan:
        """Parse and bound a plan from JSON (it may come from a file).

        Raises:
            InvalidArgumentError: not a kernel plan, or a field of the wrong type or range.

        Example:
            >>> KernelPlan.from_json('{"format": "graphprune.kernels/1", "layers": []}')
            KernelPlan(layers=())
        """
        try:
            data = json.loads(text)
        except ValueError as error:
            raise InvalidArgumentError(f"a kernel plan must be JSON: {error}") from error
        if not isinstance(data, dict) or data.get("format") != KERNEL_PLAN_FORMAT:
            raise InvalidArgumentError(f"not a {KERNEL_PLAN_FORMAT} plan")
        layers = data.get("layers")
        if not isinstance(layers, list) or len(layers) > _MAX_LAYERS:
            raise InvalidArgumentError(f"a kernel plan has a list of at most {_MAX_LAYERS} layers")
        parsed = []
        for entry in layers:
            if not isinstance(entry, dict) or set(entry) != {"name", "in_channels", "out_channels",
                                                             "kernels_per_output"}:
                raise InvalidArgumentError(f"a kernel plan layer has name, in_channels, out_channels and "
                                           f"kernels_per_output, got {entry!r:.120}")
            name = entry["name"]
            if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
                raise InvalidArgumentError(f"a kernel plan layer name must be a module name, got {name!r:.80}")
            sizes = [entry[key] for key in ("in_channels", "out_channels", "kernels_per_output")]
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
                raise InvalidArgumentError(f"{name}: channel counts must be ints >= 1, got {sizes}")
            check_kernels_per_output(sizes[2], sizes[0])
            parsed.append(KernelLayer(name, *sizes))
        if len({layer.name for layer in parsed}) != len(parsed):
            raise InvalidArgumentError("a kernel plan names a layer twice")
        return KernelPlan(tuple(parsed))


def is_kernel_plan(text: str) -> bool:
    """Whether a history entry (JSON text) is a kernel plan.

    Example:
        >>> is_kernel_plan(KernelPlan(()).to_json()), is_kernel_plan('{"format": "graphprune.plan/2"}')
        (True, False)
    """
    return entry_format(text) == KERNEL_PLAN_FORMAT


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _conv_for(modules: Mapping[str, nn.Module], layer: KernelLayer) -> nn.Conv2d:
    conv = modules.get(layer.name)
    if conv is None:
        raise InvalidArgumentError(f"the kernel plan names {layer.name!r}, which the model does not have")
    check_dense_conv(conv)
    if (conv.in_channels, conv.out_channels) != (layer.in_channels, layer.out_channels):
        raise InvalidArgumentError(f"the kernel plan expects {layer.name} with {layer.in_channels} -> "
                                   f"{layer.out_channels} channels, the model has {conv.in_channels} -> "
                                   f"{conv.out_channels}")
    return conv


def apply_kernel_plan_(model: nn.Module, plan: KernelPlan) -> None:
    """Replace the plan's convs by :class:`KernelConv2d` shells of the right shapes (weights to be loaded).

    This is how a saved model is rebuilt (also on the meta device); to prune a model, use
    :func:`kernel_prune_`. The model is unchanged if any layer does not fit.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(4, 8, 3))
        >>> apply_kernel_plan_(net, KernelPlan((KernelLayer("0", 4, 8, 2),)))
        >>> type(net[0]).__name__, tuple(net[0].weight.shape)
        ('KernelConv2d', (8, 2, 3, 3))
    """
    modules = dict(model.named_modules())
    built = {}
    for layer in plan.layers:
        conv = _conv_for(modules, layer)
        built[layer.name] = KernelConv2d(conv.in_channels, conv.out_channels, layer.kernels_per_output,
                                         conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                         bias=conv.bias is not None, device=conv.weight.device,
                                         dtype=conv.weight.dtype)
    for name, module in built.items():
        _set_module(model, name, module)


def kernel_scores(conv: nn.Conv2d, signal: str = "magnitude", generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """``(out, in)`` importance of each kernel: L1 norm of its ``kh x kw`` weights, or uniform random.

    Example:
        >>> conv = nn.Conv2d(2, 1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.copy_(torch.tensor([[[[-3.0]], [[1.0]]]]))
        >>> kernel_scores(conv).tolist()
        [[3.0, 1.0]]
    """
    if signal not in KERNEL_SIGNALS:
        raise InvalidArgumentError(f"signal must be one of {KERNEL_SIGNALS}, got {signal!r}")
    weight = conv.weight.detach()
    if signal == "magnitude":
        return weight.abs().sum(dim=(2, 3))
    return torch.rand(weight.shape[:2], generator=generator).to(weight.device)


def dense_convs(model: nn.Module, ignore: Iterable[str] | None = None) -> dict[str, nn.Conv2d]:
    """``{name: conv}`` of the exact ``nn.Conv2d`` layers with ``groups=1`` (what kernel pruning takes).

    Example:
        >>> import timm
        >>> len(dense_convs(timm.create_model("resnet18", pretrained=False)))
        20
    """
    ignored = tuple(classifier_names(model) if ignore is None else ignore)
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
            and not any(name == i or name.startswith(i + ".") for i in ignored if i)}


def kernel_counts(model: nn.Module, keep_ratio: float | Mapping[str, int], *, modules: Iterable[str] | None = None,
                  ignore: Iterable[str] | None = None) -> dict[str, int]:
    """``{conv name: k}`` for a keep ratio (``k = max(1, round(keep_ratio * in))``) or as given.

    Example:
        >>> kernel_counts(nn.Sequential(nn.Conv2d(6, 2, 3)), 0.5)
        {'0': 3}
    """
    if isinstance(keep_ratio, Mapping):
        counts = dict(keep_ratio)
    else:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise InvalidArgumentError(f"keep_ratio must be a fraction of the kernels in (0, 1], got {keep_ratio!r}")
        all_modules = dict(model.named_modules())
        names = list(dense_convs(model, ignore)) if modules is None else list(modules)
        counts = {name: max(1, round(keep_ratio * getattr(all_modules.get(name), "in_channels", 1)))
                  for name in names}
    if not counts:
        raise InvalidArgumentError("no dense nn.Conv2d to kernel-prune")
    return counts


def kernel_indices(model: nn.Module, counts: Mapping[str, int], *, signal: str = "magnitude", seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """``{conv name: (out, k) input channels kept}``, each row sorted: the top-``k`` kernels by ``signal``.

    Raises:
        InvalidArgumentError: an unknown or non-dense conv, or ``k`` out of ``[1, in_channels]``.

    Example:
        >>> conv = nn.Sequential(nn.Conv2d(4, 1, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = conv[0].weight.copy_(torch.tensor([1.0, -4.0, 3.0, 2.0]).view(1, 4, 1, 1))
        >>> kernel_indices(conv, {"0": 2})["0"].tolist()
        [[1, 2]]
    """
    if signal not in KERNEL_SIGNALS:
        raise InvalidArgumentError(f"signal must be one of {KERNEL_SIGNALS}, got {signal!r}")
    all_modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    indices = {}
    for name, k in counts.items():
        conv = all_modules.get(name)
        if conv is None:
            raise InvalidArgumentError(f"{name!r}: the model has no such module")
        check_dense_conv(conv)
        check_kernels_per_output(k, conv.in_channels)
        scores = kernel_scores(conv, signal, generator)  # (out, in)
        indices[name] = scores.topk(k, dim=1).indices.sort(dim=1).values  # (out, k)
    return indices


def replace_convs_(model: nn.Module, indices: Mapping[str, torch.Tensor], *, record: bool = True) -> KernelPlan:
    """Swap each named dense conv for a :class:`KernelConv2d` keeping ``indices[name]``; all or nothing.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 1))
        >>> replace_convs_(net, {"0": torch.tensor([[0], [2]])}, record=False).layers[0].kernels_per_output
        1
    """
    all_modules = dict(model.named_modules())
    layers, built = [], {}
    for name, index in indices.items():
        conv = all_modules.get(name)
        if conv is None:
            raise InvalidArgumentError(f"{name!r}: the model has no such module")
        check_dense_conv(conv)
        built[name] = KernelConv2d.from_conv(conv, index)
        layers.append(KernelLayer(name, conv.in_channels, conv.out_channels, built[name].kernels_per_output))
    for name, module in built.items():
        _set_module(model, name, module)
    plan = KernelPlan(tuple(layers))
    if record:

        record_plan(model, plan)
    return plan


def kernel_prune_(model: nn.Module, keep_ratio: float | Mapping[str, int], *, signal: str = "magnitude",
                  modules: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
                  seed: int = 0, record: bool = True) -> KernelPlan:
    """Remove kernels from dense convs, the same number per output channel, in place.

    Args:
        model: the model; each chosen conv is replaced by a :class:`KernelConv2d`.
        keep_ratio: fraction of each conv's kernels to keep (``k = max(1, round(keep_ratio * in))``
            per layer, in ``(0, 1]``), or ``{layer name: k}`` (then ``modules`` is ignored).
        signal: ``"magnitude"`` (largest L1 kernels kept) or ``"random"`` (seeded by ``seed``).
        modules: conv names; ``None``: every exact dense ``nn.Conv2d`` but ``ignore``.
        ignore: layers left alone when ``modules`` is ``None``; ``None``: the timm classifier.
        seed: seed of the ``random`` signal (a generator of its own; torch's stream is not moved).
        record: append the plan's JSON to ``model.graphprune_plans`` (so ``graphprune.io.save`` keeps it).

    Returns:
        The plan applied.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False).eval()
        >>> plan = kernel_prune_(model, 0.5)
        >>> model.layer1[0].conv1.kernels_per_output, model(torch.randn(1, 3, 32, 32)).shape
        (32, torch.Size([1, 1000]))
    """
    counts = kernel_counts(model, keep_ratio, modules=modules, ignore=ignore)
    return replace_convs_(model, kernel_indices(model, counts, signal=signal, seed=seed), record=record)

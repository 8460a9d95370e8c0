"""The per-layer latency model: a pruned model's time as the sum of its layers' looked-up times.

The structure mirrors the MAC estimate of :meth:`graphprune.TraceGraph.estimate_macs`: each
layer's cost is a function of the kept widths of its channel dims. Where that estimate scales
a closed-form count, this model looks the layer up in a :class:`~graphprune.latency.table.LatencyTable`
measured on the device (HALP, Shen et al., NeurIPS 2022: a latency lookup table per layer,
summed over layers):

* conv2d, linear, batch norm and layer norm modules are timed at their traced shapes, at
  the user's batch size, on a coarse grid of widths per dim (multiples of ``width_step``,
  about ``grid_points`` of them, and the full width). Between grid points times are
  interpolated linearly; a conv or linear over (in, out) is taken as separable,
  ``t(i, o) = t(I, o) * t(i, O) / t(I, O)`` (``I``, ``O`` the full widths), so a layer
  costs two 1-d sweeps, not a 2-d grid.
* the other traced products (attention matmuls, einsum, bmm) are priced by their MACs at the
  rate the timed convs and linears run (ms per MAC), scaled like the MAC estimate.
* everything else (activations, pooling, adds) does not depend on the plan's widths at the
  first order; it is the difference between the measured and the modelled time and is
  reported as ``fixed_ms`` by whoever measures (see :mod:`graphprune.latency.select`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..graph import TraceGraph
from ..measurement.latency import as_input_tuple, eval_mode
from .table import LatencyTable, OpSpec

__all__ = ["Layer", "LatencyModel", "width_grid"]


def width_grid(full: int, step: int = 8, points: int = 6, unit: int = 1) -> tuple[int, ...]:
    """Widths at which a dim of ``full`` channels is timed: multiples of ``step`` (and of ``unit``,
    a conv group's size) spaced so that about ``points`` of them fit, plus ``full`` itself.

    Example:
        >>> width_grid(64)
        (16, 32, 48, 64)
        >>> width_grid(512)
        (88, 176, 264, 352, 440, 512)
        >>> width_grid(3), width_grid(20, unit=5)
        ((3,), (20,))
    """
    base = math.lcm(max(step, 1), max(unit, 1))
    spacing = base * max(1, math.ceil(full / (base * max(points, 1))))
    widths = set(range(spacing, full, spacing))
    widths.add(full)
    return tuple(sorted(widths))


def _interp(widths: Sequence[int], times: Sequence[float], w: float) -> float:
    """Piecewise-linear in the grid; below the smallest width, linear towards zero width."""
    if w <= widths[0]:
        return times[0] * w / widths[0] if widths[0] else times[0]
    return float(np.interp(w, widths, times))


@dataclass(eq=False)
class Layer:
    """One modelled layer: its op, the classes along each width dim, and its timed grid.

    Attributes:
        name: module name (or ``"<products>"`` for a product priced by MACs).
        spec: the op at full width (``None`` for a MAC-priced product).
        dims: per width dim, the class of every index (``-1``: an index no class owns).
        mode: ``"dense"`` (t over in, out), ``"grouped"`` (whole conv groups: one dim, the
            output, and the group count follows), ``"norm"`` (one dim) or ``"macs"``.
        grids: per dim, ``(widths, times_ms)`` of the sweep with the other dim at full width.
        full_ms: time at full width.
        macs: for ``"macs"`` layers, the multiply-adds at full width.
    """

    name: str
    spec: OpSpec | None
    dims: tuple[np.ndarray, ...]
    mode: str
    grids: list[tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=list)
    full_ms: float = 0.0
    macs: int = 0

    def widths(self, gone: np.ndarray) -> tuple[int, ...]:
        """Kept indices along each dim, given a boolean mask over classes (True: removed)."""
        return tuple(int(((cls < 0) | ~gone[np.maximum(cls, 0)]).sum()) for cls in self.dims)

    def ms(self, gone: np.ndarray, rate: float = 0.0) -> float:
        """Predicted milliseconds with the classes in ``gone`` removed (``rate``: ms per MAC)."""
        kept = self.widths(gone)
        if self.mode == "macs":
            scale = 1.0
            for k, cls in zip(kept, self.dims):
                scale *= k / cls.size
            return rate * self.macs * scale
        if self.mode == "dense":
            (wi, ti), (wo, to) = self.grids
            if not self.full_ms:
                return 0.0
            return _interp(wi, ti, kept[0]) * _interp(wo, to, kept[1]) / self.full_ms
        (w, t), = self.grids
        return _interp(w, t, kept[-1])


class LatencyModel:
    """Predicted latency of a traced model as a function of the classes a plan removes.

    Args:
        model: the traced model (run once more, with hooks, to read each layer's input shape).
        graph: its trace.
        example_inputs: one example (a tensor or a tuple), batch first.
        table: where the timings come from.
        batch_size: the user's batch: the example's leading dim is multiplied by it.
        width_step: grid widths are multiples of this (the vector width the planner keeps).
        grid_points: about this many widths timed per dim.

    Attributes:
        layers: every modelled layer.
        rate_ms_per_mac: the price of a MAC in the products no module owns.
        skipped: modules of a modelled type the table could not cover, with the reason.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> graph = gp.trace(net, torch.randn(1, 8))
        >>> table = LatencyTable(path=False, timer=lambda spec, threads: 1e-4 * spec.in_width * spec.out_width)
        >>> lm = LatencyModel(net, graph, torch.randn(1, 8), table)
        >>> round(lm.predict_ms(), 4)
        0.1024
    """

    def __init__(self, model: nn.Module, graph: TraceGraph, example_inputs, table: LatencyTable, *,
                 batch_size: int = 1, width_step: int = 8, grid_points: int = 6):
        self.graph, self.table = graph, table
        self.batch_size, self.width_step, self.grid_points = batch_size, width_step, grid_points
        self.skipped: dict[str, str] = {}
        self.layers: list[Layer] = []
        weight_dims: set[bytes] = set()
        for name, module, shape in _layer_inputs(model, example_inputs):
            layer = self._layer(name, module, shape, model)
            if layer is not None:
                self.layers.append(layer)
                out_elems = graph.state_infos[f"{name}.weight"].dims[0]
                if layer.mode in ("dense", "grouped") and out_elems is not None:
                    weight_dims.add(out_elems.tobytes())
        timed = [(layer.full_ms, _spec_macs(layer.spec)) for layer in self.layers if layer.mode in ("dense", "grouped")]
        total_macs = sum(m for _, m in timed)
        self.rate_ms_per_mac = sum(t for t, _ in timed) / total_macs if total_macs else 0.0
        for macs, dims in graph.costs:  # products no timed module owns: attention matmuls, einsum, bmm
            if not dims or dims[0].tobytes() in weight_dims:
                continue
            cls = tuple(np.where(d >= 0, graph.classes[np.maximum(d, 0)], -1) for d in dims)
            self.layers.append(Layer("<products>", None, cls, "macs", macs=int(macs)))
        table.save()

    def _classes(self, elems: np.ndarray | None, size: int) -> np.ndarray:
        """Class of every index of a weight dim (``-1``: no class; a dim without elements has none)."""
        if elems is None:
            return np.full(size, -1, dtype=np.int64)
        return np.where(elems >= 0, self.graph.classes[np.maximum(elems, 0)], -1)

    def _sweep(self, spec: OpSpec, widths: Sequence[int], make) -> tuple[tuple[int, ...], tuple[float, ...]]:
        return tuple(widths), tuple(self.table.latency_ms(make(w)) for w in widths)

    def _layer(self, name: str, module: nn.Module, shape: tuple[int, ...], model: nn.Module) -> Layer | None:
        info = self.graph.state_infos.get(f"{name}.weight")
        if info is None:
            self.skipped[name] = "its weight was not traced"
            return None
        weight = module.weight
        dtype, device = str(weight.dtype), weight.device.type
        batch = shape[0] * self.batch_size
        step, points = self.width_step, self.grid_points
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                padding = _same_padding(module) if module.padding == "same" else None
                if padding is None:
                    self.skipped[name] = f"padding {module.padding!r} ({module.padding_mode})"
                    return None
            else:
                padding = tuple(module.padding)
            out_c, in_g = weight.shape[0], weight.shape[1]
            groups = module.groups
            spec = OpSpec("conv2d", shape[1], out_c, batch, tuple(shape[2:]), tuple(module.kernel_size),
                          tuple(module.stride), padding, tuple(module.dilation), groups, dtype, device)
            dim_out, dim_in = self._classes(info.dims[0], out_c), self._classes(info.dims[1], in_g)
            if groups == 1:
                return self._dense(name, spec, dim_in, dim_out, unit=1)
            out_g = out_c // groups
            if groups >= in_g:  # whole groups go: t over the number of groups kept
                grid = width_grid(out_c, step, points, unit=out_g)
                widths, times = self._sweep(spec, grid, lambda w: spec.with_widths(
                    in_g * (w // out_g), w, groups=w // out_g))
                return Layer(name, spec, (dim_out,), "grouped", [(widths, times)], times[-1])
            # aligned slices: every group narrows; the input dim is per group
            dim_in_all = np.tile(dim_in, groups)
            return self._dense(name, spec, dim_in_all, dim_out, unit=groups)
        if isinstance(module, nn.Linear):
            spec = OpSpec("linear", weight.shape[1], weight.shape[0], batch, tuple(shape[1:-1]), dtype=dtype,
                          device=device)
            return self._dense(name, spec, self._classes(info.dims[1], weight.shape[1]),
                               self._classes(info.dims[0], weight.shape[0]), unit=1)
        kind = "batch_norm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else "layer_norm"
        if kind == "layer_norm" and len(module.normalized_shape) != 1:
            self.skipped[name] = f"normalized_shape {tuple(module.normalized_shape)} is not 1-d"
            return None
        c = weight.shape[0]
        channels_first = kind == "batch_norm" or (len(shape) > 2 and shape[-1] != c and shape[1] == c)
        spatial = tuple(shape[2:]) if channels_first else tuple(shape[1:-1])  # timm's LayerNorm2d: (B, C, H, W)
        spec = OpSpec(kind, c, c, batch, spatial, dtype=dtype, device=device)
        widths, times = self._sweep(spec, width_grid(c, step, points), lambda w: spec.with_widths(w, w))
        return Layer(name, spec, (self._classes(info.dims[0], c),), "norm", [(widths, times)], times[-1])

    def _dense(self, name: str, spec: OpSpec, dim_in: np.ndarray, dim_out: np.ndarray, unit: int) -> Layer:
        full_in, full_out = spec.in_width, spec.out_width
        step, points = self.width_step, self.grid_points
        grid_in = width_grid(full_in, step, points, unit) if _changes(dim_in, self.graph) else (full_in,)
        grid_out = width_grid(full_out, step, points, unit) if _changes(dim_out, self.graph) else (full_out,)
        sweep_in = self._sweep(spec, grid_in, lambda w: spec.with_widths(w, full_out))
        sweep_out = self._sweep(spec, grid_out, lambda w: spec.with_widths(full_in, w))
        return Layer(name, spec, (dim_in, dim_out), "dense", [sweep_in, sweep_out], sweep_out[1][-1])

    def predict_ms(self, gone: np.ndarray | None = None) -> float:
        """Modelled milliseconds with the classes in ``gone`` removed (``None``: nothing removed)."""
        if gone is None:
            gone = np.zeros(self.graph.frozen.size, dtype=bool)
        return sum(layer.ms(gone, self.rate_ms_per_mac) for layer in self.layers)

    def report(self) -> str:
        """One line per modelled layer kind, and the modules the table does not cover.

        Example:
            >>> import torch, graphprune as gp
            >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
            >>> table = LatencyTable(path=False, timer=lambda spec, threads: 1.0)
            >>> print(LatencyModel(net, gp.trace(net, torch.randn(1, 8)), torch.randn(1, 8), table).report())
            linear: 2 layers, 2.000 ms at full width
        """
        by_kind: dict[str, list[Layer]] = {}
        for layer in self.layers:
            by_kind.setdefault(layer.spec.kind if layer.spec else "products (priced by MACs)", []).append(layer)
        full = np.zeros(self.graph.frozen.size, dtype=bool)
        lines = [f"{kind}: {len(ls)} layers, {sum(layer.ms(full, self.rate_ms_per_mac) for layer in ls):.3f} ms "
                 "at full width" for kind, ls in by_kind.items()]
        lines += [f"not modelled: {name} ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _changes(classes: np.ndarray, graph: TraceGraph) -> bool:
    """Whether any index of the dim belongs to a class a plan may remove."""
    valid = classes[classes >= 0]
    return bool(valid.size) and not bool(graph.frozen[valid].all())


def _spec_macs(spec: OpSpec) -> int:
    if spec.kind == "linear":
        return spec.batch * math.prod(spec.spatial) * spec.in_width * spec.out_width
    kh, kw = spec.kernel
    h, w = [(s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(spec.spatial, spec.padding, spec.dilation, spec.kernel, spec.stride)]
    return spec.batch * spec.out_width * (spec.in_width // spec.groups) * kh * kw * h * w


def _same_padding(module: nn.Conv2d) -> tuple[int, ...] | None:
    """``padding="same"`` as explicit padding where it is symmetric (odd effective kernels)."""
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)


_MODELLED = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def _layer_inputs(model: nn.Module, example_inputs) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """``(name, module, input shape)`` of every conv2d, linear and norm module the forward calls
    (first call each), in call order; hooks removed and modes restored afterwards. A conv that pads
    inside its own forward (timm's ``Conv2dSame``) gets the padded input shape."""
    seen: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                shape = tuple(args[0].shape)
                if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
                    shape = _padded_input(module, shape, tuple(output.shape))
                seen[name] = (module, shape)
        return record

    try:
        for name, module in model.named_modules():
            if isinstance(module, _MODELLED) and getattr(module, "weight", None) is not None:
                handles.append(module.register_forward_hook(hook(name)))
        with eval_mode(model), torch.inference_mode():
            model(*as_input_tuple(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return [(name, module, shape) for name, (module, shape) in seen.items()]


def _padded_input(conv: nn.Conv2d, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The input shape the conv's own padding must see to give ``out_shape``: ``shape`` itself
    unless the module pads in its forward (then the padding it added is folded into the shape).

    Example:
        >>> conv = nn.Conv2d(3, 3, 5, stride=2)  # padding 0: a 'same' conv padding inside its forward
        >>> _padded_input(conv, (1, 3, 4, 4), (1, 3, 2, 2))
        (1, 3, 7, 7)
        >>> _padded_input(nn.Conv2d(3, 3, 3, padding=1), (1, 3, 4, 4), (1, 3, 4, 4))
        (1, 3, 4, 4)
    """
    if isinstance(conv.padding, str) or len(shape) != 4 or len(out_shape) != 4:
        return shape
    spatial = list(shape[2:])
    for i, (size, out) in enumerate(zip(shape[2:], out_shape[2:])):
        k, s, d, p = conv.kernel_size[i], conv.stride[i], conv.dilation[i], conv.padding[i]
        if (size + 2 * p - d * (k - 1) - 1) // s + 1 != out:
            spatial[i] = max(size, (out - 1) * s + d * (k - 1) + 1 - 2 * p)
    return (*shape[:2], *spatial)

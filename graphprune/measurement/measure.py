"""One call that measures a model: parameters, MACs and CPU latency."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.measurement.flops import analyze_macs
from graphprune.measurement.latency import (
    ExampleInputs,
    as_input_tuple,
    eval_mode,
    measure_latency,
)

__all__ = ["Measurement", "count_params", "default_example_inputs", "measure"]


@dataclass(frozen=True)
class Measurement:
    """What a model costs, measured once.

    MACs follow ``graphprune.measurement.flops`` (one fused multiply-add = one MAC)
    and are for one pass on ``example_inputs`` as given (usually batch 1), not
    scaled by ``batch_size``; latency is for a pass on ``batch_size`` copies.

    Attributes:
        params: Number of parameters (shared tensors counted once).
        macs: Multiply-accumulates of one forward pass on the example inputs.
        macs_by_module: Qualified module name -> MACs; ``""`` is the whole model.
        uncounted_ops: Op name -> calls that MACs could not account for.
        latency_ms_median: Median CPU latency, or ``None`` if not timed.
        latency_ms_p10: 10th percentile latency, or ``None``.
        latency_ms_p90: 90th percentile latency, or ``None``.
        batch_size: Copies of the example input per timed pass.
        threads: Intra-op threads used for timing.
    """

    params: int
    macs: int
    macs_by_module: Mapping[str, int] = field(hash=False, repr=False)
    uncounted_ops: Mapping[str, int] = field(hash=False)
    latency_ms_median: float | None
    latency_ms_p10: float | None
    latency_ms_p90: float | None
    batch_size: int
    threads: int

    @property
    def flops(self) -> int:
        """Floating-point operations, two per MAC."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict, ``flops`` included.

        Returns:
            Field name -> value.

        Example:
            >>> m = Measurement(10, 5, {"": 5}, {}, None, None, None, 1, 1)
            >>> m.to_dict()["flops"]
            10
        """
        values = asdict(self)
        values["macs_by_module"] = dict(self.macs_by_module)
        values["uncounted_ops"] = dict(self.uncounted_ops)
        values["flops"] = self.flops
        return values


def count_params(model: nn.Module) -> int:
    """Number of parameter elements; a tensor shared by two modules counts once.

    Args:
        model: Any module.

    Returns:
        Sum of ``numel`` over ``model.parameters()``.

    Example:
        >>> count_params(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def default_example_inputs(model: nn.Module) -> Tensor:
    """A zero tensor of shape ``(1, *model.pretrained_cfg["input_size"])``.

    Models created with a non-default size (e.g. ``img_size=`` for a ViT) keep the
    pretrained ``input_size``; pass ``example_inputs`` explicitly for those.

    Args:
        model: A timm model (anything with a ``pretrained_cfg`` holding ``input_size``).

    Returns:
        The example input, on the device and dtype of the model's first parameter.

    Example:
        >>> import timm
        >>> default_example_inputs(timm.create_model("resnet18", pretrained=False)).shape
        torch.Size([1, 3, 224, 224])
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping) or "input_size" not in cfg:
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg['input_size'] to derive an input "
            "from (only timm models do); pass example_inputs explicitly"
        )
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return torch.zeros(1, *cfg["input_size"], device=device, dtype=dtype)


def measure(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    latency: bool = True,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
) -> Measurement:
    """Measures parameters, MACs and (optionally) CPU latency of ``model``.

    Everything runs in eval mode; the model's train/eval flags, thread count and
    parameters are as they were afterwards, even on error.

    Args:
        model: Model to measure.
        example_inputs: A tensor or a sequence of tensors, batch first; ``None``
            derives one from timm's ``pretrained_cfg`` (see ``default_example_inputs``).
        latency: Time the model; ``False`` leaves the latency fields ``None``.
        batch_size: Copies of the example input per timed pass.
        threads: Intra-op threads for timing; ``None`` keeps the current count.
        warmup: Untimed passes before timing.
        repeats: Timed passes.

    Returns:
        The measurement.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> m = measure(model, torch.zeros(1, 3, 64, 64), repeats=3)
        >>> m.params, m.macs, m.flops == 2 * m.macs
        (11181642, 148050944, True)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    inputs = as_input_tuple(example_inputs)
    threads = torch.get_num_threads() if threads is None else threads
    timing = None
    with eval_mode(model):
        mac_count = analyze_macs(model, inputs)
        if latency:
            timing = measure_latency(
                model,
                inputs,
                batch_size=batch_size,
                threads=threads,
                warmup=warmup,
                repeats=repeats,
            )
    return Measurement(
        params=count_params(model),
        macs=mac_count.macs,
        macs_by_module=mac_count.macs_by_module,
        uncounted_ops=mac_count.uncounted_ops,
        latency_ms_median=None if timing is None else timing.median_ms,
        latency_ms_p10=None if timing is None else timing.p10_ms,
        latency_ms_p90=None if timing is None else timing.p90_ms,
        batch_size=batch_size,
        threads=threads,
    )

"""Example inputs: what the tracer feeds the model.

``example_inputs=None`` means one random image of the size the timm model was trained
at (``pretrained_cfg["input_size"]``). Anything else is normalised to a tuple of
positional arguments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError

ExampleInputs = torch.Tensor | tuple[Any, ...] | list[Any] | None


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The ``(C, H, W)`` a timm model declares in ``pretrained_cfg["input_size"]``.

    Example:
        >>> import timm
        >>> default_input_size(timm.create_model("resnet18", pretrained=False))
        (3, 224, 224)
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not cfg or "input_size" not in cfg:
        raise InvalidArgumentError(
            f"{type(model).__name__} has no pretrained_cfg['input_size']; "
            "pass example_inputs, e.g. torch.randn(1, 3, 224, 224)"
        )
    return tuple(int(s) for s in cfg["input_size"])


def as_args(model: nn.Module, example_inputs: ExampleInputs, *, seed: int = 0) -> tuple[Any, ...]:
    """Normalise ``example_inputs`` to positional arguments for ``model(*args)``.

    ``None`` draws one seeded random image of the model's default input size.

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", pretrained=False)
        >>> [a.shape for a in as_args(m, None)]
        [torch.Size([1, 3, 224, 224])]
    """
    if example_inputs is None:
        generator = torch.Generator().manual_seed(seed)
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        return (torch.randn(1, *default_input_size(model), generator=generator, dtype=dtype),)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InvalidArgumentError(
        f"example_inputs must be a Tensor, a tuple of arguments or None, not {type(example_inputs).__name__}"
    )

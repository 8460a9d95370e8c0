"""Example inputs: what the tracer feeds the model.

``example_inputs=None`` means one random image of the size the timm model was trained
at (``pretrained_cfg["input_size"]``). A tensor, or a tuple of positional arguments, is one
example input; a *list* holds several, each a tensor or a tuple, so a model whose forward
branches on the data can be traced down every branch (``[x, -x]``).
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


def as_examples(model: nn.Module, example_inputs: ExampleInputs, *, seed: int = 0) -> tuple[tuple[Any, ...], ...]:
    """Normalise ``example_inputs`` to one tuple of positional arguments per example input.

    A list is several example inputs (each a tensor or a tuple of arguments); anything
    else is one, as in :func:`as_args`.

    Raises:
        InvalidArgumentError: an empty list, or an item that is neither a tensor nor a tuple.

    Example:
        >>> x = torch.randn(1, 4)
        >>> [len(args) for args in as_examples(torch.nn.Linear(4, 2), [x, (-x,)])]
        [1, 1]
    """
    if not isinstance(example_inputs, list):
        return (as_args(model, example_inputs, seed=seed),)
    if not example_inputs:
        raise InvalidArgumentError("example_inputs is an empty list; give at least one example input")
    for number, item in enumerate(example_inputs, start=1):
        if not isinstance(item, (torch.Tensor, tuple)):
            raise InvalidArgumentError(
                f"example input {number} of {len(example_inputs)} is a {type(item).__name__}; each item of a list of "
                "example inputs is a Tensor or a tuple of positional arguments")
    return tuple(as_args(model, item) for item in example_inputs)


def as_args(model: nn.Module, example_inputs: ExampleInputs, *, seed: int = 0) -> tuple[Any, ...]:
    """Normalise one example input to positional arguments for ``model(*args)``.

    ``None`` draws one seeded random image of the model's default input size. A list
    of one example input is that input; a list of several is refused here (see
    :func:`as_examples` for the callers that trace each).

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
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        if len(example_inputs) == 1:
            return as_examples(model, example_inputs)[0]
        raise InvalidArgumentError(f"this function takes one example input, got a list of {len(example_inputs)}")
    raise InvalidArgumentError(
        f"example_inputs must be a Tensor, a tuple of arguments, a list of those, or None, "
        f"not {type(example_inputs).__name__}"
    )

"""The MODEL argument of the command line: a saved graphprune directory or a timm model, and its input.

Example:
    >>> loaded = load_model("resnet18", num_classes=3)
    >>> check_runs(loaded, example_inputs(loaded, (3, 32, 32)))
    >>> loaded.model.fc.out_features, loaded.architecture["timm"]
    (3, 'resnet18')
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError

# create_model arguments that only say where weights come from (with --pretrained); never recorded in a save
FETCH_KWARGS = frozenset({"pretrained_cfg_overlay", "cache_dir"})
SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


@dataclass(frozen=True)
class LoadedModel:
    """A model from the command line.

    Attributes:
        model: the module, in eval mode.
        source: what MODEL named (a directory or a timm name).
        architecture: the rebuild recipe ``save`` records (``{"timm", "kwargs", "input_size"}``).
    """

    model: nn.Module
    source: str
    architecture: dict[str, Any]


def parse_input_size(text: str) -> tuple[int, ...]:
    """``--input-size``: ``C,H,W`` (or ``CxHxW``) or one side ``S``; argparse reports a bad value."""
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,224,224) or one size S, got {text!r}") from None
    if len(size) not in (1, 3) or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,224,224) or one size S, got {text!r}")
    return size


def parse_kwargs(text: str) -> dict[str, Any]:
    """``--model-kwargs``: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


def load_model(source: str, *, num_classes: int | None = None, model_kwargs: dict[str, Any] | None = None,
               pretrained: bool = False, checkpoint: str | os.PathLike | None = None) -> LoadedModel:
    """A saved graphprune directory, or a timm model, with weights from ``pretrained`` or ``checkpoint``.

    Args:
        source: a path to a saved model, a timm model name (``resnet18``, ``resnet18.a1_in1k``)
            or a timm source (``hf-hub:...``, ``local-dir:...``).
        num_classes: classifier size for a timm name (a saved model keeps its own).
        model_kwargs: more ``timm.create_model`` keyword arguments for a timm name;
            ``pretrained_cfg_overlay`` / ``cache_dir`` only with ``pretrained``.
        pretrained: timm's pretrained weights (:func:`graphprune.sources.create_model`).
        checkpoint: a local safetensors file or torch state dict to load instead.

    Raises:
        InvalidArgumentError: an unknown model name, or options that do not apply.
        graphprune.io.ModelFileError: a saved model that cannot be read.
        graphprune.sources.PretrainedWeightsError: pretrained weights that cannot be fetched.

    Example:
        >>> load_model("resnet18", num_classes=3).model.fc.out_features
        3
    """
    from . import io, sources

    path = Path(source)
    if not source.startswith(SOURCE_PREFIXES) and path.exists():
        if num_classes is not None or model_kwargs or pretrained or checkpoint is not None:
            raise InvalidArgumentError(f"--num-classes/--model-kwargs/--pretrained/--checkpoint apply to timm model "
                                       f"names, not to the saved model {source}")
        model = io.load(path)
        return LoadedModel(model, source, getattr(model, io.ARCHITECTURE_ATTR))
    import timm

    if not source.startswith(SOURCE_PREFIXES) and not timm.is_model(source):
        import difflib

        close = difflib.get_close_matches(source, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise io.ModelFileNotFoundError(f"{source!r} is neither a saved model (no such file or directory) "
                                        f"nor a timm model name{hint}")
    kwargs = dict(model_kwargs or {})
    for key, option in (("pretrained", "--pretrained"), ("checkpoint_path", "--checkpoint PATH")):
        if key in kwargs:
            raise InvalidArgumentError(f"--model-kwargs may not set {key}; use {option}")
    fetch = {k: kwargs.pop(k) for k in sorted(FETCH_KWARGS & set(kwargs))}
    if fetch and not pretrained:
        raise InvalidArgumentError(f"--model-kwargs {sorted(fetch)} say where pretrained weights come from; "
                                   "they need --pretrained")
    if num_classes is not None:
        if num_classes < 0:
            raise InvalidArgumentError(f"--num-classes must be >= 0, got {num_classes}")
        kwargs["num_classes"] = num_classes
    architecture = io.Architecture.from_dict({"timm": source, "kwargs": kwargs})  # JSON values, no file arguments
    model = sources.create_model(source, pretrained=pretrained, checkpoint=checkpoint, **kwargs, **fetch).eval()
    recipe = io.infer_architecture(model).to_dict()
    recipe["kwargs"] = {**recipe["kwargs"], **architecture.kwargs}
    return LoadedModel(model, source, recipe)


def example_inputs(loaded: LoadedModel, input_size: tuple[int, ...] | None) -> torch.Tensor:
    """One seeded random image: ``--input-size``, else the saved ``input_size``, else timm's default.

    Example:
        >>> example_inputs(load_model("resnet18"), (3, 32, 32)).shape
        torch.Size([1, 3, 32, 32])
    """
    from .inputs import default_input_size

    if input_size is None:
        input_size = tuple(loaded.architecture.get("input_size") or default_input_size(loaded.model))
    elif len(input_size) == 1:
        channels = (loaded.architecture.get("input_size") or default_input_size(loaded.model))[0]
        input_size = (channels, input_size[0], input_size[0])
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *input_size, generator=generator)


def check_runs(loaded: LoadedModel, inputs: torch.Tensor) -> None:
    """Run the model once; a failure is bad input (a wrong ``--input-size``), not a crash.

    Raises:
        InvalidArgumentError: the forward pass fails, with the model's own message.

    Example:
        >>> check_runs(load_model("resnet18"), torch.randn(1, 3, 32, 32))
    """
    try:
        with torch.no_grad():
            loaded.model(inputs)
    except Exception as error:  # the model's own failure is the message
        raise InvalidArgumentError(f"{loaded.source} does not run on an input of shape {tuple(inputs.shape)} "
                                   f"(set --input-size): {type(error).__name__}: {error}") from error

"""Where a model's weights come from: timm's own pretrained loading, or a local checkpoint file.

:func:`create_model` is ``timm.create_model`` with two ways in for weights and clear errors:

* ``pretrained=True``: timm loads them its own way, so a registry name (``resnet18.a1_in1k``,
  from the Hugging Face hub or timm's cache), ``hf-hub:org/name``, ``local-dir:/folder`` and
  ``pretrained_cfg_overlay=dict(file=...)`` all work as in timm. A download that fails
  (offline, no such repo) raises :class:`PretrainedWeightsError`, which says to use a
  checkpoint instead.
* ``checkpoint=PATH``: a local ``.safetensors`` file, or a ``torch.save`` state dict read with
  ``torch.load(..., weights_only=True)`` (plain tensors only, no arbitrary objects), possibly
  wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, keys possibly prefixed
  ``module.`` (DDP). Keys and shapes must match the model exactly; with an explicit
  ``num_classes`` the classifier is new and its tensors are not loaded (timm's rule for
  pretrained weights and a new head).

A name with a pretrained tag (``resnet18.a1_in1k``) but neither gives random weights, as in
timm; :func:`create_model` says so with a :class:`RandomWeightsWarning`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GraphpruneError, InvalidArgumentError

_WRAPPER_KEYS = ("state_dict", "model")
_ARGUMENTS_INSTEAD = {"checkpoint_path": "checkpoint=", "pretrained": "pretrained="}
_SHOWN_KEYS = 5


class PretrainedWeightsError(GraphpruneError):
    """timm could not fetch or read the pretrained weights (offline, unknown repo, missing file)."""


class RandomWeightsWarning(UserWarning):
    """The model name asks for pretrained weights, but the model was created with random ones."""


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _check_name(name: str) -> tuple[str | None, str]:
    """(source prefix or None, pretrained tag or "") of a timm model name; unknown names raise."""
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"a model name must be a non-empty string, got {name!r}")
    try:
        source, model_id = parse_model_name(name)
    except ValueError as error:
        raise InvalidArgumentError(str(error)) from error
    if source is not None:
        return source, ""
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise InvalidArgumentError(f"{name!r} is not a timm model name{hint}")
    tag = split_model_name_tag(model_id)[1]
    if tag:
        from timm.models import get_pretrained_cfg

        try:
            get_pretrained_cfg(name)
        except RuntimeError as error:  # a tag the architecture does not have
            raise InvalidArgumentError(f"{name!r}: {error}") from error
    return None, tag


def _has_pretrained_source(name: str, overlay: Mapping[str, Any] | None) -> bool:
    """Whether timm knows where pretrained weights for the registry name ``name`` are."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)  # the tag was checked by _check_name
    fields = dict(cfg.to_dict() if cfg is not None else {}) | dict(overlay or {})
    return any(fields.get(key) for key in ("file", "state_dict", "hf_hub_id", "url"))


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as error:  # downloads (huggingface_hub, urllib) and missing local files
        if not pretrained and not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
            raise
        raise PretrainedWeightsError(
            f"cannot get pretrained weights for {name!r}: {' '.join(str(error).split())}. Offline? Download the "
            "weights where you are online and pass them as checkpoint=PATH (CLI: --checkpoint PATH), or give timm a "
            "local file with pretrained_cfg_overlay=dict(file=PATH)") from error
    except (TypeError, ValueError, AssertionError) as error:
        raise InvalidArgumentError(f"cannot create timm model {name!r} with {kwargs}: {error}") from error
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        raise InvalidArgumentError(f"the pretrained weights timm found for {name!r} do not fit the model: "
                                   f"{' '.join(str(error).split())[:600]}") from error


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, or a torch state dict read with ``weights_only=True``.

    Args:
        path: the file; its kind is read from its first bytes, not its name.

    Raises:
        InvalidArgumentError: no such file, not a checkpoint, or not a mapping of names to tensors.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save({"model": {"module.fc.weight": torch.zeros(2, 3)}}, path)
        >>> {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
        {'fc.weight': (2, 3)}
    """
    from .io import sniff

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"checkpoint {path} does not exist or is not a file")
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: object = load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise InvalidArgumentError(f"cannot read checkpoint {path}: {error}") from error
    elif kind in ("zip", "pickle"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise InvalidArgumentError(f"cannot read checkpoint {path} with torch.load(weights_only=True), which "
                                       f"reads tensors and plain containers only: {' '.join(str(error).split())}"
                                       ) from error
    else:
        raise InvalidArgumentError(f"checkpoint {path} is neither a safetensors file nor a torch.save state dict")
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise InvalidArgumentError(f"checkpoint {path} holds no state dict (got {type(state).__name__})")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InvalidArgumentError(f"checkpoint {path} is not a state dict: {_listed(not_tensors)} are not tensors")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def load_checkpoint_(model: nn.Module, path: str | os.PathLike, *, new_head: bool = False) -> nn.Module:
    """Load a checkpoint file into ``model`` with exact key and shape matching (trailing underscore: mutates).

    Args:
        model: the model to fill.
        path: see :func:`read_state_dict`.
        new_head: the model has a new head for another task: classifier tensors
            (``pretrained_cfg["classifier"]``) whose shapes differ from the checkpoint's stay
            as they are; everything else must match.

    Raises:
        InvalidArgumentError: naming the missing, unexpected and mismatched tensors.

    Example:
        >>> import tempfile, timm, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/w.safetensors"
        >>> safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), path)
        >>> load_checkpoint_(timm.create_model("test_resnet", num_classes=3), path, new_head=True).fc.out_features
        3
    """
    from .groups import classifier_names

    state = read_state_dict(path)
    expected = model.state_dict()
    head = tuple(f"{name}." for name in classifier_names(model)) if new_head else ()
    if new_head:  # a classifier tensor of another shape (or only on one side) stays as the model has it
        heads = {k for k in (*state, *expected) if k.startswith(head)
                 and not (k in state and k in expected and state[k].shape == expected[k].shape)}
        state = {k: v for k, v in state.items() if k not in heads}
        expected = {k: v for k, v in expected.items() if k not in heads}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    mismatched = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(expected[k].shape)}" for k in wrong]
    if missing or unexpected or mismatched:
        problems = [f"{label} {_listed(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if keys]
        classifier = tuple(f"{name}." for name in classifier_names(model))
        if wrong and all(k.startswith(classifier) for k in wrong) and not new_head:
            hint = "; the checkpoint has another head: give num_classes= (CLI: --num-classes) for a new one"
        elif wrong:
            hint = ("; is it another architecture, or a pruned model? A model pruned by graphprune loads from "
                    "its saved directory (graphprune.load, or the directory as MODEL)")
        else:
            hint = ""
        raise InvalidArgumentError(f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}"
                                   f"{hint}")
    model.load_state_dict(state, strict=not new_head)
    return model


def create_model(name: str, *, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with weights from timm (``pretrained``) or from a local ``checkpoint``.

    Args:
        name: a timm name, with or without a pretrained tag (``resnet18.a1_in1k``), or a
            timm source (``hf-hub:timm/resnet18.a1_in1k``, ``local-dir:/path/to/folder``).
        pretrained: load timm's pretrained weights, the timm way (hub, cache, a
            ``pretrained_cfg_overlay=dict(file=...)``).
        checkpoint: instead: a local ``.safetensors`` file or ``torch.save`` state dict.
        **kwargs: more ``timm.create_model`` arguments (``num_classes``, ``img_size``, ...).
            With ``checkpoint`` and an explicit ``num_classes`` that differs from the
            checkpoint's, the new classifier keeps its fresh weights.

    Returns:
        The model, in train mode as timm returns it.

    Raises:
        InvalidArgumentError: an unknown name, conflicting options, or a checkpoint that
            does not fit (its missing / unexpected / mismatched keys are named).
        PretrainedWeightsError: timm has no pretrained weights for ``name`` or cannot fetch them.

    Example:
        >>> import tempfile, timm, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/resnet.safetensors"
        >>> safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), path)
        >>> create_model("test_resnet", checkpoint=path).fc.out_features
        1000
    """
    for key, instead in _ARGUMENTS_INSTEAD.items():
        if key in kwargs:
            raise InvalidArgumentError(f"pass {instead} to graphprune.sources.create_model, not {key} in kwargs")
    if pretrained and checkpoint is not None:
        raise InvalidArgumentError("give pretrained=True or checkpoint=PATH, not both")
    source, tag = _check_name(name)
    if pretrained and source is None and not _has_pretrained_source(name, kwargs.get("pretrained_cfg_overlay")):
        raise PretrainedWeightsError(f"timm has no pretrained weights for {name!r}; pass checkpoint=PATH "
                                     "(CLI: --checkpoint PATH) or pretrained_cfg_overlay=dict(file=PATH)")
    if tag and not pretrained and checkpoint is None:
        warnings.warn(f"{name!r} names pretrained weights (tag {tag!r}), but neither pretrained=True nor a checkpoint "
                      "was given: the weights are random (CLI: add --pretrained or --checkpoint PATH)",
                      RandomWeightsWarning, stacklevel=2)
    model = _create(name, pretrained, dict(kwargs))
    if checkpoint is not None:
        load_checkpoint_(model, checkpoint, new_head="num_classes" in kwargs)
    return model

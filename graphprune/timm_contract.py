# Over 350 lines: 41 are the description of the contract; finding and applying its width attributes is ~325 lines.
"""The timm contract after removal: the width attributes timm reads, kept equal to the weights.

timm models describe their widths in plain attributes that ``reset_classifier``,
``forward_head``, ``forward_intermediates``, ``get_classifier`` and ``features_only``
read: the model's ``num_features``, ``head_hidden_size``, ``embed_dim`` (``embed_dims``),
the head module's ``in_features`` / ``hidden_size`` / ``num_features``, and every
``feature_info[i]["num_chs"]``. Removal cuts weights; this module makes those numbers
follow, in the same pass.

How: before any tensor is cut, each attribute is tied to a **witness**, one tensor
dimension that carries the same channels (``head.fc.weight`` dim 1 for the head's
``in_features``); after the cut the attribute is set to the witness's new size. A witness
must have the attribute's old value as its size, so a rule that does not apply to a model
is skipped, never guessed from. The rules, in the order tried:

* a timm head type (:data:`HEAD_RULES`) names its own layers;
* ``head_hidden_size`` is the classifier's input width (``pretrained_cfg["classifier"]``);
* a ``feature_info`` entry's module: the last layer inside it when that layer's output has
  the recorded width (a residual stage, a transformer block), else the first layer after
  it that takes that width as input (a concatenating block such as DenseNet's); a module
  without weights (an activation) reads the layer just before it. HRNet's recorded names
  are not modules (timm says so); they map to ``bn1`` and ``incre_modules[i]``;
* ``num_features`` (the output of ``forward_features``): the first layer after the last
  feature module that takes that width;
* ``embed_dim`` follows ``num_features`` when they are equal (ViT, Mixer), else the output
  of ``patch_embed`` / ``stem``; a per-stage tuple or list follows ``feature_info``.

Attributes with no witness keep their value and are listed by :func:`unresolved` (the zoo
test asserts it is empty for every zoo model). Only models with a timm ``pretrained_cfg``
are touched. Depth pruning (:mod:`graphprune.blocks`) changes no width. Hugging Face models
follow their own contract instead (:mod:`graphprune.hf_contract`: module widths and config).

Example:
    >>> import timm, torch, graphprune as gp
    >>> model = timm.create_model("test_convnext", pretrained=False, num_classes=10)
    >>> small = gp.prune(model, torch.randn(1, 3, 64, 64), ratio=0.5)
    >>> small.head.in_features == small.num_features == small.head.norm.weight.shape[0] < model.num_features
    True
    >>> small.reset_classifier(5)
    >>> small(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import hf_contract

Slot = tuple[str, str, int | None]  # (module name, attribute, index into a tuple / list attribute or None)


@dataclass(frozen=True)
class Witness:
    """The tensor dimension an attribute's width is read from after removal.

    Attributes:
        tensor: parameter or buffer name, e.g. ``"head.fc.weight"``.
        dim: the dimension whose size is the width.
    """

    tensor: str
    dim: int


@dataclass(frozen=True)
class _Tensor:
    name: str
    module: int  # position of the owning module in named_modules() order
    size_out: int | None  # size along the output-channel dim, if this tensor has one
    dim_out: int | None
    size_in: int | None  # size along the input-channel dim, if any
    dim_in: int | None


# timm head type -> attribute -> candidate (layer inside the head, "in" or "out" width), first that fits wins;
# derived attributes (the head's num_features) are recomputed afterwards by _derive_head
HEAD_RULES: Mapping[str, Mapping[str, tuple[tuple[str, str], ...]]] = {
    "ClassifierHead": {"in_features": (("fc", "in"),)},
    "NormMlpClassifierHead": {"in_features": (("norm", "out"), ("pre_logits.fc", "in"), ("fc", "in")),
                              "hidden_size": (("pre_logits.fc", "out"),)},
    "ClNormMlpClassifierHead": {"in_features": (("norm", "out"), ("pre_logits.fc", "in"), ("fc", "in")),
                                "hidden_size": (("pre_logits.fc", "out"),)},
}
_MODEL_WIDTHS = ("num_features", "head_hidden_size", "embed_dim", "embed_dims")


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` carries a timm ``pretrained_cfg`` (and so the timm contract).

    Example:
        >>> import timm
        >>> is_timm_model(timm.create_model("test_resnet", pretrained=False)), is_timm_model(torch.nn.Linear(2, 2))
        (True, False)
    """
    return isinstance(getattr(model, "pretrained_cfg", None), Mapping)


def _channel_dims(module: nn.Module, attr: str, tensor: torch.Tensor) -> tuple[int | None, int | None]:
    """(output dim, input dim) of a tensor whose dims are channels; None where it has none."""
    if tensor is None or tensor.dim() == 0:
        return None, None
    if isinstance(module, nn.modules.conv._ConvNd):
        if attr == "bias":
            return 0, None
        if attr != "weight":
            return None, None
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if module.transposed:
            return (1 if module.groups == 1 else None), (0 if module.groups == 1 or depthwise else None)
        return 0, (1 if module.groups == 1 else 0 if depthwise and module.in_channels == module.out_channels else None)
    if isinstance(module, nn.Linear):
        return (0, 1) if attr == "weight" else (0, None) if attr == "bias" else (None, None)
    if isinstance(module, nn.Embedding):
        return None, None
    wide = [d for d, size in enumerate(tensor.shape) if size != 1]
    if len(wide) == 1:  # norm affine, running statistics, layer scale (C,) / (C, 1, 1), class token (1, 1, C)
        return wide[0], wide[0]
    return None, None


def _tensors(model: nn.Module) -> tuple[list[_Tensor], dict[str, int]]:
    """Every parameter and buffer in ``state_dict`` order, and each module's position."""
    order: dict[str, int] = {}
    found: list[_Tensor] = []
    for position, (name, module) in enumerate(model.named_modules(remove_duplicate=False)):
        order.setdefault(name, position)
        for store in (module._parameters, module._buffers):
            for attr, tensor in store.items():
                if tensor is None or tensor.dim() == 0:
                    continue
                dim_out, dim_in = _channel_dims(module, attr, tensor)
                found.append(_Tensor(f"{name}.{attr}" if name else attr, position,
                                     None if dim_out is None else int(tensor.shape[dim_out]), dim_out,
                                     None if dim_in is None else int(tensor.shape[dim_in]), dim_in))
    return found, order


class _Resolver:
    """Finds witnesses on the model as it is before removal."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors, self.order = _tensors(model)

    def _inside(self, module: str) -> list[int]:
        prefix = f"{module}." if module else ""
        return [i for i, t in enumerate(self.tensors) if t.name.startswith(prefix)]

    def layer(self, module: str, side: str, width: int) -> Witness | None:
        """The ``side`` ("in"/"out") width of the layer ``module`` (its weight, else its first tensor)."""
        candidates = [t for t in self.tensors if t.name.rpartition(".")[0] == module]
        for t in sorted(candidates, key=lambda t: not t.name.endswith(".weight")):
            size, dim = (t.size_in, t.dim_in) if side == "in" else (t.size_out, t.dim_out)
            if size == width:
                return Witness(t.name, dim)
        return None

    def classifier_input(self, width: int) -> Witness | None:
        cfg = self.model.pretrained_cfg
        names = cfg.get("classifier") or ()
        for name in (names,) if isinstance(names, str) else names:
            found = self.layer(name, "in", width)
            if found is not None:
                return found
        return None

    def consumer_after(self, start: int, width: int) -> Witness | None:
        """The first tensor from position ``start`` on that takes ``width`` channels as input."""
        for t in self.tensors[start:]:
            if t.size_in == width:
                return Witness(t.name, t.dim_in)
        return None

    def module_output(self, module: str, width: int) -> Witness | None:
        """A witness of the width of ``module``'s output."""
        if module not in self.order:
            return None
        inside = self._inside(module)
        if inside:
            last = self.tensors[inside[-1]]
            if last.size_out == width:
                return Witness(last.name, last.dim_out)
            start = inside[-1] + 1
        else:  # no weights of its own (an activation, a pool): the layer before it, else the one after
            position = self.order[module]
            start = next((i for i, t in enumerate(self.tensors) if t.module > position), len(self.tensors))
            before = self.tensors[start - 1] if start > 0 else None
            if before is not None and before.size_out == width:
                return Witness(before.name, before.dim_out)
        return self.consumer_after(start, width)

    def features_end(self) -> int:
        """Position just after the last feature module's tensors (0 without ``feature_info``)."""
        info = getattr(self.model, "feature_info", None)
        if not isinstance(info, list) or not info:
            return 0
        module = info[-1].get("module") if isinstance(info[-1], Mapping) else None
        module = _feature_module(self.model, module) if isinstance(module, str) else None
        inside = self._inside(module) if isinstance(module, str) and module in self.order else []
        if inside:
            return inside[-1] + 1
        return 0


def _feature_module(model: nn.Module, name: str) -> str:
    """The module whose output ``feature_info`` calls ``name``; timm's HRNet records names that are
    "not actually valid" (its own comment): the stem is ``bn1``, stage ``i`` the ``incre_modules[i-1]``."""
    if type(model).__name__ == "HighResolutionNet" and getattr(model, "incre_modules", None) is not None:
        if name == "stem":
            return "bn1"
        if name.startswith("stage") and name[5:].isdigit():
            return f"incre_modules.{int(name[5:]) - 1}"
    return name


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def find_witnesses(model: nn.Module) -> dict[Slot, Witness | None]:
    """Tie every width attribute of the timm contract to a witness (call before removal).

    Returns:
        ``{(module, attribute, index): Witness or None}``; ``module`` is ``""`` for the model
        itself and ``"feature_info"`` for ``feature_info[index]["num_chs"]``. Empty for a
        model that is not a timm model.

    Example:
        >>> import timm
        >>> witnesses = find_witnesses(timm.create_model("test_resnet", pretrained=False))
        >>> witnesses[("", "head_hidden_size", None)]
        Witness(tensor='fc.weight', dim=1)
    """
    if hf_contract.is_hf_model(model):
        return hf_contract.find_ties(model)
    if not is_timm_model(model):
        return {}
    resolver = _Resolver(model)
    found: dict[Slot, Witness | None] = {}
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        for index, entry in enumerate(info):
            if isinstance(entry, Mapping) and _int(entry.get("num_chs")) and isinstance(entry.get("module"), str):
                module = _feature_module(model, entry["module"])
                found[("feature_info", "num_chs", index)] = resolver.module_output(module, entry["num_chs"])
    num_features = getattr(model, "num_features", None)
    if _int(num_features):
        found[("", "num_features", None)] = (resolver.consumer_after(resolver.features_end(), num_features)
                                             or resolver.classifier_input(num_features))
    hidden = getattr(model, "head_hidden_size", None)
    if _int(hidden):
        witness = resolver.classifier_input(hidden)
        if witness is None and hidden == num_features:
            witness = found.get(("", "num_features", None))
        found[("", "head_hidden_size", None)] = witness
    for attr in ("embed_dim", "embed_dims"):
        value = getattr(model, attr, None)
        if _int(value):
            if value == num_features:
                witness = found.get(("", "num_features", None))
            else:
                witness = resolver.module_output("patch_embed", value) or resolver.module_output("stem", value)
            found[("", attr, None)] = witness
        elif isinstance(value, (tuple, list)) and isinstance(info, list) and len(value) == len(info):
            for index, width in enumerate(value):
                if _int(width) and isinstance(info[index], Mapping) and info[index].get("num_chs") == width:
                    found[("", attr, index)] = found.get(("feature_info", "num_chs", index))
    for name, module in model.named_modules():
        rules = HEAD_RULES.get(type(module).__name__)
        for attr, candidates in (rules or {}).items():
            value = getattr(module, attr, None)
            if not _int(value):
                continue
            witness = None
            for layer, side in candidates:
                witness = resolver.layer(f"{name}.{layer}" if name else layer, side, value)
                if witness is not None:
                    break
            if witness is None and attr == "in_features" and value == num_features:  # a removed classifier
                witness = found.get(("", "num_features", None))
            found[(name, attr, None)] = witness
    return found


def unresolved(witnesses: Mapping[Slot, Witness | None]) -> list[str]:
    """The attributes :func:`find_witnesses` found no witness for (they are left as they are).

    Example:
        >>> unresolved({("", "num_features", None): None})
        ['num_features']
    """
    names = []
    for (module, attr, index), witness in witnesses.items():
        if witness is None:
            where = "feature_info" if module == "feature_info" else module
            label = f"{where}.{attr}" if where else attr
            names.append(f"{label}[{index}]" if index is not None else label)
    return names


def _size(model: nn.Module, witness: Witness) -> int:
    module_name, _, attr = witness.tensor.rpartition(".")
    module = model.get_submodule(module_name)
    tensor = module._parameters.get(attr)
    if tensor is None:
        tensor = module._buffers[attr]
    return int(tensor.shape[witness.dim])


def _derive_head(module: nn.Module) -> None:
    """Recompute what a timm head derives from its in_features / hidden_size."""
    kind = type(module).__name__
    if kind == "ClassifierHead" and _int(getattr(module, "in_features", None)):
        module.num_features = module.in_features * module.global_pool.feat_mult()
    elif kind in ("NormMlpClassifierHead", "ClNormMlpClassifierHead"):
        module.num_features = module.hidden_size or module.in_features


def apply_witnesses_(model: nn.Module, witnesses: Mapping[Slot, Witness | None]) -> None:
    """Set every attribute to its witness's size (call after the weights are cut).

    ``feature_info`` is replaced by a new list of new dicts (so
    :func:`graphprune.removal.restore_on_error` puts the old one back on failure).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", pretrained=False)
        >>> witnesses = find_witnesses(model)
        >>> model.fc = torch.nn.Linear(100, 1000)  # stands in for a removal that left 100 channels
        >>> apply_witnesses_(model, witnesses)
        >>> model.head_hidden_size
        100
    """
    if hf_contract.is_hf_model(model):
        hf_contract.apply_ties_(model, witnesses)
        return
    if not witnesses:
        return
    info = getattr(model, "feature_info", None)
    new_info = [dict(entry) if isinstance(entry, Mapping) else entry for entry in info] if isinstance(info, list) \
        else None
    heads: set[str] = set()
    for (module_name, attr, index), witness in witnesses.items():
        if witness is None:
            continue
        size = _size(model, witness)
        if module_name == "feature_info":
            new_info[index]["num_chs"] = size
            continue
        owner = model.get_submodule(module_name) if module_name else model
        if index is None:
            setattr(owner, attr, size)
        else:
            values = list(getattr(owner, attr))
            values[index] = size
            old = getattr(owner, attr)
            setattr(owner, attr, tuple(values) if isinstance(old, tuple) else values)
        if module_name:
            heads.add(module_name)
    for name in heads:
        _derive_head(model.get_submodule(name))
    if new_info is not None:
        model.feature_info = new_info

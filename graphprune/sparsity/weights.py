"""Which weights a mask may cover, and what masked weights cost: sparsity and effective MACs.

A *maskable* module is an ``nn.Conv2d`` or ``nn.Linear`` (subclasses included, e.g. timm's
``Conv2dSame``: ``torch.nn.utils.prune`` reparametrizes the ``weight`` attribute, whatever the
forward does with it). The classifier is left out by default (timm's
``pretrained_cfg["classifier"]``): in transfer learning it is the new, target-task head.

*Effective MACs* count only the multiply-adds whose weight is not zero: a dense layer of ``macs``
MACs whose weight has density ``d`` costs ``d * macs`` (each weight is used the same number of
times, once per output position), the rest of the model as
:func:`graphprune.measurement.analyze_macs` counts it. It is the FLOPs figure of the sparse
literature, not what a dense kernel executes (see ``docs/how-to/sparsity.md``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import InvalidArgumentError
from ..groups import classifier_names

# Module types whose ``weight`` a mask may cover (isinstance: subclasses with another forward are fine).
MASKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def maskable_modules(model: nn.Module, ignore: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of the layers a mask may cover, in model order.

    Args:
        model: any model.
        ignore: module names to leave dense (their submodules too); ``None``: the timm classifier.

    Example:
        >>> import timm
        >>> names = maskable_modules(timm.create_model("resnet18", pretrained=False))
        >>> len(names), "fc" in names
        (20, False)
    """
    ignored = tuple(classifier_names(model) if ignore is None else ignore)
    modules = dict(model.named_modules())
    unknown = [name for name in ignored if name not in modules]
    if unknown:
        raise InvalidArgumentError(f"ignore names modules the model does not have: {unknown}")
    return {name: module for name, module in modules.items()
            if isinstance(module, MASKABLE_TYPES)
            and not any(name == i or name.startswith(i + ".") for i in ignored if i)}


def resolve_modules(model: nn.Module, names: Iterable[str] | None, ignore: Iterable[str] | None = None
                    ) -> dict[str, nn.Module]:
    """The maskable modules named by ``names`` (``None``: all of them but ``ignore``); unknown names raise.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> list(resolve_modules(net, ["0"]))
        ['0']
    """
    if names is None:
        found = maskable_modules(model, ignore)
    else:
        modules = dict(model.named_modules())
        found = {}
        for name in names:
            module = modules.get(name)
            if not isinstance(module, MASKABLE_TYPES):
                kind = "no such module" if module is None else f"a {type(module).__name__}"
                raise InvalidArgumentError(f"{name!r} is {kind}; masks cover the weights of "
                                           f"{', '.join(t.__name__ for t in MASKABLE_TYPES)} layers")
            found[name] = module
    if not found:
        raise InvalidArgumentError("no Conv2d or Linear weight to mask")
    return found


def is_masked(module: nn.Module) -> bool:
    """Whether ``module.weight`` is reparametrized by ``torch.nn.utils.prune`` (``weight_orig * weight_mask``).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> is_masked(layer), is_masked(prune.identity(layer, "weight"))
        (False, True)
    """
    return "weight_orig" in module._parameters and "weight_mask" in module._buffers


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward uses: ``weight_orig * weight_mask`` while masked, else ``weight``; no grad.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> _ = prune.l1_unstructured(layer, "weight", amount=4)
        >>> int((effective_weight(layer) == 0).sum())
        4
    """
    with torch.no_grad():
        if is_masked(module):
            return module.weight_orig * module.weight_mask
        return module.weight.detach()


def module_sparsity(modules: dict[str, nn.Module]) -> dict[str, float]:
    """``{name: fraction of exactly-zero weights}``.

    Example:
        >>> layer = nn.Linear(4, 1)
        >>> _ = prune.l1_unstructured(layer, "weight", amount=1)
        >>> module_sparsity({"l": layer})
        {'l': 0.25}
    """
    sparsity = {}
    for name, module in modules.items():
        weight = effective_weight(module)
        sparsity[name] = float((weight == 0).sum()) / weight.numel()
    return sparsity


def overall_sparsity(modules: dict[str, nn.Module]) -> float:
    """Fraction of exactly-zero weights over all of ``modules`` together (each weight counts once).

    Example:
        >>> layer = nn.Linear(10, 10)
        >>> _ = prune.l1_unstructured(layer, "weight", amount=0.3)
        >>> overall_sparsity({"l": layer})
        0.3
    """
    zeros = total = 0
    for module in modules.values():
        weight = effective_weight(module)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


def effective_macs(model: nn.Module, example_inputs, modules: dict[str, nn.Module] | None = None) -> int:
    """MACs of one forward pass counting only nonzero weights of ``modules`` (default: every maskable layer).

    Args:
        model: the (possibly masked) model.
        example_inputs: a tensor or a sequence of positional tensors.
        modules: ``{name: module}`` whose zero weights are discounted; others count dense.

    Example:
        >>> conv = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False))
        >>> x = torch.zeros(1, 4, 10, 10)
        >>> _ = prune.l1_unstructured(conv[0], "weight", amount=0.25)
        >>> effective_macs(conv, x, {"0": conv[0]}), 8 * 4 * 9 * 8 * 8 * 3 // 4
        (13824, 13824)
    """
    from ..measurement import analyze_macs

    count = analyze_macs(model, example_inputs)
    modules = maskable_modules(model, ignore=()) if modules is None else modules
    saved = 0
    for name, module in modules.items():
        weight = effective_weight(module)
        dense = count.macs_by_module.get(name, 0)
        saved += dense * int((weight == 0).sum()) // weight.numel()
    return count.macs - saved

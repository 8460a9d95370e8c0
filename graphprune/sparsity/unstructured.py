"""Unstructured magnitude (or random) masks, layer-wise or global, on ``torch.nn.utils.prune``.

``torch.nn.utils.prune`` reparametrizes a layer's ``weight`` as ``weight_orig`` (the trained
parameter) times ``weight_mask`` (a buffer), recomputed by a forward pre-hook before every
forward. Any training loop therefore trains ``weight_orig`` while the forward only ever sees
``weight_orig * weight_mask``: masked weights are exactly zero during and after fine-tuning,
with no change to the loop (the recipes' ``finetune_`` included). ``prune.remove`` (here
:func:`make_permanent_`) folds the mask into a plain ``weight`` for export.

Masks are chosen with ``prune.L1Unstructured.compute_mask`` over an importance tensor:
``|weight| * mask`` for ``"magnitude"``, ``U(0, 1) * mask`` for ``"random"``. Already-masked
weights score 0 and are taken first, so masks only grow (what a gradual schedule needs), and
the new mask is copied into the existing ``weight_mask`` buffer in place (the optimizer, DDP and
the hooks keep the same tensors). ``"local"`` zeroes ``round(sparsity * numel)`` weights in
every layer; ``"global"`` ranks all layers' weights together, ``round(sparsity * total)`` in all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import InvalidArgumentError
from .weights import effective_weight, is_masked, module_sparsity, overall_sparsity, resolve_modules

SCOPES = ("local", "global")
SIGNALS = ("magnitude", "random")


@dataclass(frozen=True)
class SparsityReport:
    """What a masking step did.

    Attributes:
        target_sparsity: the fraction of zero weights asked for.
        sparsity: the fraction reached over the masked layers together (exact zeros).
        scope: ``"local"``, ``"global"`` or ``"n:m"``.
        signal: ``"magnitude"`` or ``"random"``.
        module_sparsity: ``{layer name: its fraction of zero weights}``.
        skipped: ``{layer name: why it was left dense}``.
    """

    target_sparsity: float
    sparsity: float
    scope: str
    signal: str
    module_sparsity: Mapping[str, float] = field(hash=False)
    skipped: Mapping[str, str] = field(default_factory=dict, hash=False)


def check_sparsity(value: float, name: str = "sparsity") -> float:
    """``value`` if it is a fraction in ``[0, 1)``; else an error naming ``name``.

    Example:
        >>> check_sparsity(0.5)
        0.5
        >>> check_sparsity(1.5)
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: sparsity must be a fraction of the weights in [0, 1), got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise InvalidArgumentError(f"{name} must be a fraction of the weights in [0, 1), got {value!r}")
    return float(value)


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {choices}, got {value!r}")


@contextlib.contextmanager
def seeded_draws(seed: int | None) -> Iterator[None]:
    """Draw from ``seed`` without moving the caller's random stream (``None``: no draws are made)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def install_masks_(modules: Mapping[str, nn.Module]) -> None:
    """Reparametrize each ``weight`` as ``weight_orig * weight_mask`` (mask of ones) unless it is already.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> install_masks_({"l": layer})
        >>> sorted(name for name, _ in layer.named_buffers())
        ['weight_mask']
    """
    for module in modules.values():
        if not is_masked(module):
            prune.identity(module, "weight")
        refresh_(module)


def refresh_(module: nn.Module) -> None:
    """Recompute the masked ``weight`` attribute without grad.

    ``prune`` leaves a non-leaf tensor there, which ``copy.deepcopy`` (used by the recipes and
    timm's EMA) refuses; the forward pre-hook recomputes it with grad when training.

    Example:
        >>> import copy
        >>> layer = prune.l1_unstructured(nn.Linear(2, 2), "weight", amount=1)
        >>> refresh_(layer); layer.weight.requires_grad, type(copy.deepcopy(layer)).__name__
        (False, 'Linear')
    """
    with torch.no_grad():
        module.weight = module.weight_orig * module.weight_mask


def _importance(module: nn.Module, signal: str) -> torch.Tensor:
    mask = module.weight_mask
    if signal == "magnitude":
        return effective_weight(module).abs() * mask
    return torch.rand(mask.shape, device=mask.device).clamp_min_(1e-12) * mask


def _masked_count(module: nn.Module) -> int:
    return int((module.weight_mask == 0).sum())


def _grow(importance: torch.Tensor, mask: torch.Tensor, zeros: int) -> torch.Tensor:
    """``mask`` with the ``zeros`` least important entries zero (already-zero ones score 0: taken first)."""
    # contiguous: prune views them flat, and a channels_last weight has no flat view
    return prune.L1Unstructured(amount=zeros).compute_mask(importance.contiguous(), default_mask=mask.contiguous())


def grow_masks_(modules: Mapping[str, nn.Module], sparsity: float, *, scope: str = "local",
                signal: str = "magnitude") -> None:
    """Grow the installed masks of ``modules`` to ``sparsity`` (draws from torch's global stream for ``random``).

    Raises:
        InvalidArgumentError: a layer (or, global, all of them) is already sparser than asked;
            masks only grow, :func:`make_permanent_` first to start over.

    Example:
        >>> layer = nn.Linear(10, 10)
        >>> install_masks_({"l": layer}); grow_masks_({"l": layer}, 0.2)
        >>> int((layer.weight_mask == 0).sum())
        20
    """
    if scope == "local":
        for name, module in modules.items():
            zeros = round(sparsity * module.weight_mask.numel())
            already = _masked_count(module)
            if zeros < already:
                raise InvalidArgumentError(f"{name} already has {already} masked weights, more than the {zeros} of "
                                           f"sparsity {sparsity}; masks only grow (make_permanent_ first)")
            if zeros > already:
                with torch.no_grad():
                    module.weight_mask.copy_(_grow(_importance(module, signal), module.weight_mask, zeros))
    else:
        masks = [m.weight_mask for m in modules.values()]
        total = sum(mask.numel() for mask in masks)
        zeros, already = round(sparsity * total), sum(_masked_count(m) for m in modules.values())
        if zeros < already:
            raise InvalidArgumentError(f"the layers already have {already} masked weights, more than the {zeros} "
                                       f"of sparsity {sparsity}; masks only grow (make_permanent_ first)")
        if zeros > already:
            importance = torch.cat([_importance(m, signal).flatten() for m in modules.values()])
            flat = _grow(importance, torch.cat([mask.flatten() for mask in masks]), zeros)
            with torch.no_grad():
                for mask, part in zip(masks, flat.split([mask.numel() for mask in masks])):
                    mask.copy_(part.view_as(mask))
    for module in modules.values():
        refresh_(module)


def magnitude_masks_(model: nn.Module, sparsity: float, *, scope: str = "local", signal: str = "magnitude",
                     modules: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
                     seed: int = 0) -> SparsityReport:
    """Mask ``sparsity`` of the weights of ``model``'s Conv2d / Linear layers, in place (one shot).

    Args:
        model: the model; its layers get ``torch.nn.utils.prune``'s ``weight_orig`` / ``weight_mask``.
        sparsity: fraction of weights to zero, in ``[0, 1)``; per layer (``local``) or in all (``global``).
        scope: ``"local"`` (every layer at ``sparsity``) or ``"global"`` (one ranking over all layers).
        signal: ``"magnitude"`` (smallest ``|w|`` first) or ``"random"`` (seeded by ``seed``).
        modules: layer names to mask; ``None``: every Conv2d / Linear but ``ignore``.
        ignore: layers left dense when ``modules`` is ``None``; ``None``: the timm classifier.
        seed: seed of the ``random`` signal (the caller's random stream is not moved).

    Returns:
        The sparsity reached, overall and per layer.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> report = magnitude_masks_(model, 0.7, scope="global")
        >>> round(report.sparsity, 4), "fc" in report.module_sparsity
        (0.7, False)
    """
    sparsity = check_sparsity(sparsity)
    check_choice(scope, SCOPES, "scope")
    check_choice(signal, SIGNALS, "signal")
    found = resolve_modules(model, modules, ignore)
    install_masks_(found)
    with seeded_draws(seed if signal == "random" else None):
        grow_masks_(found, sparsity, scope=scope, signal=signal)
    return SparsityReport(sparsity, overall_sparsity(found), scope, signal, module_sparsity(found))


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` whose ``weight`` is reparametrized by ``torch.nn.utils.prune``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> _ = magnitude_masks_(net, 0.5, modules=["1"])
        >>> list(masked_modules(net))
        ['1']
    """
    return {name: m for name, m in model.named_modules() if is_masked(m)}


def make_permanent_(model: nn.Module) -> list[str]:
    """Fold every mask into a plain ``weight`` parameter (``prune.remove``): the zeros stay, hooks go.

    The model then has an ordinary ``state_dict`` that :func:`graphprune.io.save` writes.
    ``requires_grad`` of each weight is kept.

    Returns:
        The names of the layers made permanent.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = magnitude_masks_(net, 0.5)
        >>> make_permanent_(net), sorted(net.state_dict()), int((net[0].weight == 0).sum())
        (['0'], ['0.bias', '0.weight'], 8)
    """
    names = []
    for name, module in masked_modules(model).items():
        trains = module.weight_orig.requires_grad
        prune.remove(module, "weight")
        module.weight.requires_grad_(trains)
        names.append(name)
    return names

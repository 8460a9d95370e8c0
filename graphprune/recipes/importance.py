"""Importance factors ``beta``: TransTailor's frozen per-channel scale during fine-tuning, and its folding.

``beta`` is the channel scale ``alpha`` that :func:`~graphprune.scoring.target_taylor.fit_channel_scales`
trained on the target data with the weights frozen, applied exactly where it was trained: on
the output of every conv/linear layer that produces the channel (a pointwise conv and the
depthwise conv after it both carry the channel, and both were scaled while ``alpha`` trained).
So fine-tuning starts from the model the target loss tuned, and the Taylor *scores* only rank.

Why not the normalized score (``score / group mean``): on ImageNet EfficientNet-Lite0 ->
Flowers-17 those ratios span 0.02 to 50 within a layer; multiplying ~50 layers' channels by
them took validation accuracy from 0.52 to 0.05 (chance) before any training, and 4
fine-tuning steps did not recover it. Even a tame rank-based ``beta`` in [0.75, 1.25] on the
norm outputs cut it to 0.25. A score is a loss difference, not a scale.

A scale on a conv/linear output is the same function as that scale on the layer's weight
rows (and bias), in train and eval mode alike, so :func:`fold_factors_` is exact and the
deployed model has no extra ops. A BatchNorm after the layer is left alone: in eval mode it
sees exactly what it saw under the hook.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..groups import Groups
from ..scoring.target_taylor import producer_sites

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def importance_factors(groups: Groups, model: nn.Module, alphas: Mapping[int, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """Per-layer factors from per-group channel scales: ``{producer: Tensor[out channels]}``.

    Every conv/linear layer whose weight rows carry a group's channels gets that group's
    ``alpha`` on those rows (1.0 on rows of no group); groups missing from ``alphas`` count as 1.

    Example:
        >>> import graphprune as gp
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3, 4, 4)))
        >>> importance_factors(groups, net, {0: torch.tensor([0.5, 1.0, 1.5, 2.0])})
        {'0': tensor([0.5000, 1.0000, 1.5000, 2.0000])}
    """
    factors: dict[str, torch.Tensor] = {}
    for site in producer_sites(groups, model):
        if site.group_id not in alphas:
            continue
        alpha = torch.as_tensor(alphas[site.group_id], dtype=torch.float32).flatten()
        factor = factors.get(site.module, torch.ones(int(site.channel.numel()))).clone()
        owned = site.channel >= 0  # -1: an output row of another group
        factor[owned] = factor[owned] * alpha[site.channel[owned]]
        factors[site.module] = factor
    return factors


def slice_factors(factors: Mapping[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """The factors of the pruned model: each keeps the entries its layer's weight rows keep.

    Example:
        >>> from graphprune.plan import Plan, ParamEdit
        >>> plan = Plan({0: (1,)}, (ParamEdit("conv.weight", 0, 3, (0, 2)),))
        >>> slice_factors({"conv": torch.tensor([1.0, 2.0, 3.0])}, plan)
        {'conv': tensor([1., 3.])}
    """
    keep = {e.name: e.keep for e in plan.edits if e.dim == 0}
    return {name: (f[list(keep[f"{name}.weight"])] if f"{name}.weight" in keep else f).clone()
            for name, f in factors.items()}


def _layer(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    module = modules.get(name)
    if not isinstance(module, _PRODUCERS):
        raise InvalidArgumentError(f"importance factors go on conv or linear layers; {name!r} is "
                                   f"{type(module).__name__ if module is not None else 'not in the model'}")
    return module


def _scale_output(module: nn.Module, factor: torch.Tensor):
    channel_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1  # conv: (B, C, *spatial); linear: (..., C)

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.dim()
        shape[channel_dim] = -1
        return output * factor.to(output).view(shape)

    return hook


@contextmanager
def applied_factors(model: nn.Module, factors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Scale each layer's output channels by its factor (hooks, never parameters); removed on exit, even on error.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> with applied_factors(net, {"0": torch.tensor([0.0, 1.0])}), torch.no_grad():
        ...     float(net(torch.ones(1, 2))[0, 0]) == 0.0  # the first output channel is switched off
        True
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, factor in factors.items():
            module = _layer(modules, name)
            handles.append(module.register_forward_hook(_scale_output(module, factor.detach())))
        yield
    finally:
        for handle in handles:
            handle.remove()


def fold_factors_(model: nn.Module, factors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Multiply the factors into the layers' weight rows and biases, so the model alone computes what the hooks did.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> x, f = torch.randn(3, 2), {"0": torch.tensor([0.5, 2.0])}
        >>> with applied_factors(net, f):
        ...     hooked = net(x)
        >>> torch.allclose(fold_factors_(net, f)(x), hooked)
        True
    """
    modules = dict(model.named_modules())
    layers = {name: _layer(modules, name) for name in factors}  # check all before changing any
    with torch.no_grad():
        for name, factor in factors.items():
            module = layers[name]
            module.weight.mul_(factor.to(module.weight).view(-1, *[1] * (module.weight.dim() - 1)))
            if module.bias is not None:
                module.bias.mul_(factor.to(module.bias))
    return model

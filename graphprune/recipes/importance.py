"""Importance factors ``beta``: a frozen per-channel scale on a channel's output, and its folding.

TransTailor's importance-aware fine-tuning multiplies every kept channel by its importance
while the weights train. Here ``beta`` is applied where the scale can later be folded into
the weights *exactly*:

* a conv/linear producer directly followed by a BatchNorm: on the norm's output, before its
  activation (timm's ``BatchNormAct2d``: a pre-hook on ``.act``); folded into the norm's
  affine ``weight`` and ``bias``. (On the conv output it would be undone by the norm's
  statistics in train mode and would not fold exactly in eval mode.)
* a producer with no norm after it: on its output; folded into its weight rows and bias.

A depthwise conv that only carries a group already produced upstream (the ``conv_dw`` after
``conv_pw`` in an inverted residual) gets no factor of its own, so each path is scaled once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from ..errors import InvalidArgumentError
from ..groups import Groups
from ..scoring.target_taylor import producer_sites

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # BatchNormAct2d subclasses BatchNorm2d
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def following_norms(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, str]:
    """``{producer: norm}`` for every conv/linear whose output tensor is fed straight into a BatchNorm.

    Found by one eval-mode forward pass that compares tensor identities; the model is left as found.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> following_norms(net, torch.randn(1, 3, 4, 4))
        {'0': '1'}
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept so its id is not reused
    found: dict[str, str] = {}
    handles = []
    modes = [(m, m.training) for m in model.modules()]

    def record_output(name: str):
        return lambda _m, _i, out: produced.__setitem__(id(out), (name, out))

    def record_input(name: str):
        def hook(_m, inputs):
            if inputs and id(inputs[0]) in produced:
                found[produced[id(inputs[0])][0]] = name
        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, _PRODUCERS):
                handles.append(module.register_forward_hook(record_output(name)))
            elif isinstance(module, _NORMS):
                handles.append(module.register_forward_pre_hook(record_input(name)))
        model.eval()
        with torch.no_grad():
            model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return found


def _is_pass_through(module: nn.Module) -> bool:
    """A depthwise conv: each output channel reads only the same input channel."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and \
        module.groups == module.in_channels == module.out_channels


def importance_factors(groups: Groups, model: nn.Module, scores: Mapping[int, torch.Tensor],
                       example_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-module factors from per-group importances: ``{fold target: Tensor[out channels]}``.

    Each group's scores are divided by their mean, so the average factor is 1 and activations
    keep their scale; a group whose scores are all zero gets factors of 1. The fold target is
    the BatchNorm after the producer, or the producer itself (see the module docstring).

    Example:
        >>> import graphprune as gp
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> x = torch.randn(1, 3, 4, 4)
        >>> groups = gp.find_groups(gp.trace(net, x))
        >>> importance_factors(groups, net, {0: torch.tensor([1.0, 1.0, 3.0, 3.0])}, x)
        {'1': tensor([0.5000, 0.5000, 1.5000, 1.5000])}
    """
    modules = dict(model.named_modules())
    norms = following_norms(model, example_inputs)
    sites = producer_sites(groups, model)
    by_group: dict[int, list] = {}
    for site in sites:
        by_group.setdefault(site.group_id, []).append(site)
    factors: dict[str, torch.Tensor] = {}
    for group_id, group_sites in by_group.items():
        score = torch.as_tensor(scores[group_id], dtype=torch.float64).flatten()
        mean = score.mean()
        beta = (score / mean if mean > 0 else torch.ones_like(score)).to(torch.float32)
        primary = [s for s in group_sites if not _is_pass_through(modules[s.module])] or group_sites
        for site in primary:
            target = norms.get(site.module, site.module)
            width = int(site.channel.numel())
            factor = factors.get(target, torch.ones(width))
            owned = site.channel >= 0
            factor = factor.clone()
            factor[owned] = factor[owned] * beta[site.channel[owned]]
            factors[target] = factor
    return factors


def slice_factors(factors: Mapping[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """The factors of the pruned model: each keeps the entries its target's weight rows keep.

    Example:
        >>> from graphprune.plan import Plan, ParamEdit
        >>> plan = Plan({0: (1,)}, (ParamEdit("bn.weight", 0, 3, (0, 2)),))
        >>> slice_factors({"bn": torch.tensor([1.0, 2.0, 3.0])}, plan)
        {'bn': tensor([1., 3.])}
    """
    keep = {e.name: e.keep for e in plan.edits if e.dim == 0}
    return {name: (f[list(keep[f"{name}.weight"])] if f"{name}.weight" in keep else f).clone()
            for name, f in factors.items()}


def _scale(output: torch.Tensor, factor: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    return output * factor.to(output).view(shape)


@contextmanager
def applied_factors(model: nn.Module, factors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Scale each target's output channels by its factor (hooks), removed on exit even on error.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> with applied_factors(net, {"0": torch.tensor([0.0, 1.0])}):
        ...     float(net(torch.ones(1, 2))[0, 0])
        0.0
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, factor in factors.items():
            module = modules.get(name)
            if isinstance(module, BatchNormAct2d):  # scale between the norm and its activation
                handles.append(module.act.register_forward_pre_hook(
                    lambda _m, inputs, f=factor: (_scale(inputs[0], f, 1), *inputs[1:])))
            elif isinstance(module, (*_NORMS, nn.modules.conv._ConvNd)):
                handles.append(module.register_forward_hook(lambda _m, _i, out, f=factor: _scale(out, f, 1)))
            elif isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(lambda _m, _i, out, f=factor: _scale(out, f, -1)))
            else:
                raise InvalidArgumentError(f"cannot apply an importance factor to {name!r} "
                                           f"({type(module).__name__})")
        yield
    finally:
        for handle in handles:
            handle.remove()


def fold_factors_(model: nn.Module, factors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Multiply the factors into the weights, so the model alone computes what the hooks did.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> x, f = torch.randn(3, 2), {"0": torch.tensor([0.5, 2.0])}
        >>> with applied_factors(net, f):
        ...     hooked = net(x)
        >>> torch.allclose(fold_factors_(net, f)(x), hooked)
        True
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, factor in factors.items():
            module = modules[name]
            if isinstance(module, _NORMS):
                if module.weight is None or module.bias is None:
                    raise InvalidArgumentError(f"cannot fold into {name!r}: the norm has no affine parameters")
            rows = factor.to(module.weight).view(-1, *[1] * (module.weight.dim() - 1))
            module.weight.mul_(rows)
            if module.bias is not None:
                module.bias.mul_(factor.to(module.bias))
    return model

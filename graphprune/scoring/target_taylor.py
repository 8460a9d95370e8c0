"""Target-aware importance (TransTailor, Liu et al., AAAI 2021): train channel scales, then Taylor on them.

Each channel of each group gets one multiplicative factor ``alpha`` (initialised to 1.0),
applied by forward hooks where the channel is produced: on the output of every conv or
linear layer whose weight rows (dim 0) carry the group's channels. A group produced in
several places (a residual stream written by several convs, or a pointwise conv followed
by its depthwise conv) shares one ``alpha`` tensor across all of them, so ``alpha -> 0``
zeroes the channel at every place it is produced. (Where a BatchNorm follows, zeroing the
conv output leaves the norm's shift ``bias - weight * mean / std``, so the score estimates
"this conv output is zero", which equals removal only up to that constant.) With every weight frozen, only the alphas
are trained on the target data; the importance of a channel is then ``|dL/dalpha * alpha|``
averaged over batches: the first-order change of the target loss when the channel is cut.

That quantity is in units of loss and does not depend on the scale of the layer's weights,
so scores of different groups are comparable and can be ranked globally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import math

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..groups import Groups
from .data import LossFn, ScoringData, left_as_found
from .registry import Scores, register_scorer

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True, eq=False)
class Site:
    """One place where channels of a group are produced.

    Attributes:
        module: qualified name of a conv or linear layer.
        group_id: the group whose channels some of its outputs are.
        channel: int64 Tensor[out_features]: group channel of each output, or ``-1``.
    """

    module: str
    group_id: int
    channel: torch.Tensor


def producer_sites(groups: Groups, model: nn.Module) -> list[Site]:
    """Every (conv/linear layer, group) pair where the layer's weight rows carry the group's channels.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3, 4, 4)))
        >>> [(s.module, s.group_id, s.channel.tolist()) for s in producer_sites(groups, net)]
        [('0', 0, [0, 1, 2, 3])]
    """
    modules = dict(model.named_modules())
    sites = []
    for group in groups:
        for member in group.members:
            module = modules.get(member.module)
            if (member.role == "out" and member.dim == 0 and member.name.endswith(".weight")
                    and isinstance(module, _PRODUCERS)):
                sites.append(Site(member.module, group.id, torch.from_numpy(member.channel.copy())))
    return sites


def _check_sites(groups: Groups, sites: list[Site]) -> None:
    covered = {s.group_id for s in sites}
    missing = [g for g in groups if g.id not in covered]
    if missing:
        names = ", ".join(f"{g.id} ({g.name})" for g in missing[:5])
        raise InvalidArgumentError(f"scorer 'target_taylor' needs a conv or linear layer producing every group; "
                                   f"none produces group(s) {names}; exclude them with ignore= or use 'taylor'")


def _scale_hook(module: nn.Module, factors: list[tuple[torch.Tensor, torch.Tensor]]):
    """Forward hook multiplying the module output by ``alpha[channel]`` along its channel dim."""
    spatial_dims = len(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else 0

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        scale = None
        for alpha, channel in factors:
            # index -1 (an output this group does not own) reads the trailing 1.0
            extended = torch.cat([alpha, alpha.new_ones(1)])[channel]
            scale = extended if scale is None else scale * extended
        dim = output.dim() - spatial_dims - 1  # conv: (B, C, *spatial) -> 1; linear: (..., C) -> last
        shape = [1] * output.dim()
        shape[dim] = -1
        return output * scale.view(shape)

    return hook


def _check_schedule(epochs: int, lr: float) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise InvalidArgumentError(f"scorer 'target_taylor': epochs must be an int >= 0, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InvalidArgumentError(f"scorer 'target_taylor': lr must be a positive number, got {lr!r}")


@dataclass(frozen=True, eq=False)
class ChannelScales:
    """What :func:`fit_channel_scales` learned.

    Attributes:
        scores: ``{group_id: float64 Tensor[group.size]}``: ``|dL/dalpha * alpha|`` averaged over batches.
        alphas: ``{group_id: float32 Tensor[group.size]}``: the trained scales (1.0 where untrained).
    """

    scores: dict[int, torch.Tensor]
    alphas: dict[int, torch.Tensor]


def fit_channel_scales(groups: Groups, model: nn.Module, *, data: Iterable | None = None,
                       loss_fn: LossFn | None = None, epochs: int = 1, lr: float = 0.01,
                       max_batches: int | None = None, progress: bool = True,
                       device: str | torch.device | None = None) -> ChannelScales:
    """Train the per-channel scales ``alpha`` on target data and score them; :func:`target_taylor` without
    throwing the trained scales away (TransTailor's importance-aware fine-tuning multiplies by them).

    Arguments, schedule and guarantees (model left as found) are those of :func:`target_taylor`.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3, 8, 8)))
        >>> data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))]
        >>> fitted = fit_channel_scales(groups, net, data=data, epochs=0, progress=False)
        >>> fitted.alphas[0].tolist(), fitted.scores[0].shape
        ([1.0, 1.0, 1.0, 1.0], torch.Size([4]))
    """
    _check_schedule(epochs, lr)
    options = ScoringData.create("target_taylor", data, loss_fn=loss_fn, max_batches=max_batches,
                                 progress=progress, device=device, passes=epochs + 1)
    sites = producer_sites(groups, model)
    _check_sites(groups, sites)
    modules = dict(model.named_modules())
    with left_as_found(model, options.device) as hooks:
        reference = next(iter(model.parameters()), None)
        where = options.device or (reference.device if reference is not None else torch.device("cpu"))
        alphas = {g.id: torch.ones(g.size, device=where, requires_grad=True) for g in groups}
        per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for site in sites:
            per_module.setdefault(site.module, []).append((alphas[site.group_id], site.channel.to(where)))
        for name, factors in per_module.items():
            hooks.append(modules[name].register_forward_hook(_scale_hook(modules[name], factors)))
        params = list(alphas.values())
        optimizer = torch.optim.Adam(params, lr=lr)
        for epoch in range(epochs):
            for index, batch in enumerate(options.batches(f"alphas {epoch + 1}/{epochs}")):
                loss = options.loss(model(*batch.inputs), batch.targets, index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        sums = {gid: torch.zeros_like(a, dtype=torch.float64) for gid, a in alphas.items()}
        n_batches = 0
        for index, batch in enumerate(options.batches("scoring")):
            loss = options.loss(model(*batch.inputs), batch.targets, index)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for (gid, alpha), grad in zip(alphas.items(), grads):
                if grad is not None:  # None: no producer of the group ran on this batch
                    sums[gid].add_((grad * alpha.detach()).abs().to(torch.float64))
            n_batches += 1
    return ChannelScales(scores={gid: (total / n_batches).cpu() for gid, total in sums.items()},
                         alphas={gid: a.detach().float().cpu() for gid, a in alphas.items()})


@register_scorer("target_taylor", needs_data=True)
def target_taylor(groups: Groups, model: nn.Module, *, data: Iterable | None = None, loss_fn: LossFn | None = None,
                  epochs: int = 1, lr: float = 0.01, max_batches: int | None = None, progress: bool = True,
                  device: str | torch.device | None = None) -> Scores:
    """TransTailor target-aware importance: train per-channel scales on target data, score ``|dL/dalpha * alpha|``.

    Weights stay frozen; only the alphas (one per group channel, shared by every layer that
    produces the channel) are trained with Adam for ``epochs`` passes over ``data``, then one
    more pass accumulates the scores. The model runs in eval mode (BatchNorm running
    statistics, no dropout) and is left exactly as found: hooks removed, ``requires_grad``
    restored, weights bit-identical. Scores are comparable across groups (units of loss),
    so they suit a global ranking. :func:`fit_channel_scales` also returns the trained alphas.

    Args:
        groups: from :func:`graphprune.find_groups`.
        model: the model to score.
        data: re-iterable of ``(inputs, targets)`` batches of the target task (required).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; ``None`` is cross entropy.
        epochs: passes of alpha training before scoring (0 scores at alpha = 1).
        lr: Adam learning rate of the alphas.
        max_batches: read at most this many batches per pass.
        progress: show tqdm progress bars.
        device: run there (the model is moved back afterwards); ``None`` keeps its device.

    Returns:
        ``{group_id: float64 Tensor[group.size]}``, lower is removed first.

    Raises:
        InvalidArgumentError: no or unusable data, an empty loader, a NaN loss, a bad
            schedule, or a group that no conv/linear layer produces.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3)))
        >>> target_taylor(groups, net, data=[(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], epochs=2,
        ...               progress=False)[0].shape
        torch.Size([4])
    """
    return fit_channel_scales(groups, model, data=data, loss_fn=loss_fn, epochs=epochs, lr=lr,
                              max_batches=max_batches, progress=progress, device=device).scores

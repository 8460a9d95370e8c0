"""First-order Taylor importance: |w * dL/dw| summed over every parameter slice of a channel.

The score of a channel estimates how much the loss changes when its weights go to zero.
Every member counts: conv and linear rows and columns, depthwise convs, biases and the
BatchNorm / LayerNorm affine (Torch-Pruning's Taylor skips norm layers; we do not, since
their scale carries the channel too). Buffers (running statistics) have no gradient and
add nothing.

Per batch, ``|w * g|`` is taken elementwise with ``g`` the gradient of that batch's loss;
the scores are the mean over batches. Averaging magnitudes rather than gradients keeps
the signal of a converged (fine-tuned) model, whose full-data gradient is close to zero
(Molchanov et al., 2019, average per-minibatch contributions for the same reason).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..groups import Groups
from .data import Batch, LossFn, ScoringData, check_loss, left_as_found
from .registry import Scores, register_scorer
from .sums import channel_sums

Step = Callable[[nn.Module, Batch], torch.Tensor]


def _plain_step(options: ScoringData) -> Step:
    def step(model: nn.Module, batch: Batch) -> torch.Tensor:
        return options.loss_fn(model(*batch.inputs), batch.targets)
    return step


def taylor_scores(groups: Groups, model: nn.Module, options: ScoringData, step: Step) -> Scores:
    """Mean over batches of ``|w * dL/dw|``, summed per channel over every parameter member.

    This is the engine behind ``taylor`` and ``classmean``; ``step(model, batch)`` returns the
    batch loss, which is what sets the objective.

    Args:
        groups: from :func:`graphprune.find_groups`.
        model: the model the groups were found on; left exactly as found.
        options: checked data options.
        step: computes the scalar loss of one batch.

    Returns:
        ``{group_id: float64 Tensor[group.size]}`` on the CPU.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3)))
        >>> options = ScoringData.create("taylor", [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))],
        ...                              progress=False)
        >>> taylor_scores(groups, net, options, _plain_step(options))[0].shape
        torch.Size([4])
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    names = sorted({m.name for g in groups for m in g.members if m.name in tensors})
    params = list({id(tensors[n]): tensors[n] for n in names}.values())
    with left_as_found(model, options.device):
        for p in params:
            p.requires_grad_(True)
        # elementwise running sum of |w * g|, in float64 whatever the parameters' dtype
        sums = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
        n_batches = 0
        for index, batch in enumerate(options.batches()):
            loss = check_loss(options.scorer, step(model, batch), index)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    sums[id(p)].add_((p.detach().to(torch.float64) * g.to(torch.float64)).abs())
            n_batches += 1
        per_name = {n: sums[id(tensors[n])].to("cpu", torch.float64) / n_batches for n in names}
    return {g.id: channel_sums(g, per_name) for g in groups}


@register_scorer("taylor", needs_data=True)
def taylor(groups: Groups, model: nn.Module, *, data: Iterable | None = None, loss_fn: LossFn | None = None,
           max_batches: int | None = None, progress: bool = True, device: str | torch.device | None = None) -> Scores:
    """First-order Taylor importance ``|w * dL/dw|`` on target data, every member included.

    The model runs in eval mode (BatchNorm running statistics, no dropout), so the scores
    are deterministic and no buffer changes; it is left exactly as found.

    Args:
        groups: from :func:`graphprune.find_groups`.
        model: the model to score.
        data: re-iterable of ``(inputs, targets)`` batches of the target task (required).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; ``None`` is cross entropy.
        max_batches: read at most this many batches.
        progress: show a tqdm progress bar.
        device: run there (the model is moved back afterwards); ``None`` keeps its device.

    Returns:
        ``{group_id: float64 Tensor[group.size]}``, lower is removed first.

    Raises:
        InvalidArgumentError: no or unusable data, an empty loader, a NaN loss.

    Example:
        >>> import torch, graphprune as gp
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 3)))
        >>> with torch.no_grad():
        ...     _ = net[0].weight[1].zero_(), net[0].bias[1].zero_()
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> scores = taylor(groups, net, data=data, progress=False)
        >>> float(scores[0][1]), bool(scores[0].max() > 0)  # the zeroed channel scores exactly 0
        (0.0, True)
    """
    options = ScoringData.create("taylor", data, loss_fn=loss_fn, max_batches=max_batches, progress=progress,
                                 device=device)
    return taylor_scores(groups, model, options, _plain_step(options))

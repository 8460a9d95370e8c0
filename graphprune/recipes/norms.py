"""BatchNorm statistics after a structural change: re-estimate them on target data.

Removing channels (or blocks) changes what every later layer sees, so the running mean and
variance a BatchNorm kept for the unpruned network no longer describe its input. Fine-tuning
with frozen statistics (:class:`~graphprune.recipes.FinetuneConfig` ``norm_stats="frozen"``)
would keep those stale numbers. :func:`recalibrate_norms_` resets them and re-estimates them
with forward passes over unaugmented training batches, no gradients, weights untouched: the
"adaptive BatchNorm" of EagleEye (Li et al., ECCV 2020), which showed that a pruned
candidate's accuracy right after this step already predicts its accuracy after fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .device import Placement


def recalibrate_norms_(model: nn.Module, batches: Iterable, *, max_batches: int | None = None,
                       placement: Placement | None = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on ``batches``, in place.

    The estimate is the cumulative average over the batches read (``momentum=None``); every
    other module runs in eval mode (no dropout, no drop-path), and modes and momenta are
    restored on exit, even on error.

    Args:
        model: the (pruned) model.
        batches: ``(images, labels)`` batches, unaugmented (e.g. ``TransferData.train_eval``).
        max_batches: batches read (``None``: all).
        placement: autocast settings of the forward passes.

    Returns:
        The number of BatchNorm layers re-estimated (0: nothing to do; the model is unchanged).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> recalibrate_norms_(net, [(torch.randn(8, 3, 8, 8) + 5, torch.zeros(8))])
        1
        >>> bool(net[1].running_mean.abs().sum() > 0), net.training, net[1].momentum
        (True, True, 0.1)
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average: every batch counts equally
            norm.train()
        with torch.no_grad():
            for index, (images, _) in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                with (placement or Placement()).autocast():
                    model(images)
    finally:
        for norm, momentum in momenta:
            norm.momentum = momentum
        for module, training in modes:
            module.training = training
    return len(norms)

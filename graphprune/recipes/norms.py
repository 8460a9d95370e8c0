"""BatchNorm statistics after a structural change: correct them on target data.

Removing channels (or blocks) changes what every later layer sees, so the running mean and
variance a BatchNorm kept for the unpruned network no longer describe its input. Two fixes,
both forward passes over unaugmented training batches, no gradients, weights untouched:

- :func:`shift_norms_` (the recipes' default): run the model before and after the change on
  the same batches and move each layer's statistics by what the change did to its input, so
  its output keeps the distribution it had. A layer the change did not reach keeps its
  statistics bit for bit: ratio 0 is the identity.
- :func:`recalibrate_norms_`: reset them and re-estimate them from scratch, the "adaptive
  BatchNorm" of EagleEye (Li et al., ECCV 2020), which showed that a pruned candidate's
  accuracy right after this step predicts its accuracy after fine-tuning. It also discards
  whatever the old statistics encoded: a model fine-tuned with frozen statistics (the
  recipes' default before pruning) normalizes with its *source* statistics, and re-estimating
  them on the target set can cost it most of its accuracy with nothing removed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..plan import Plan
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
    norms = list(_norms(model).values())
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
        _forward_batches((model,), batches, max_batches, placement)
    finally:
        for norm, momentum in momenta:
            norm.momentum = momentum
        for module, training in modes:
            module.training = training
    return len(norms)




def _batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and variance of one batch, float64."""
    flat = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(1)
    return mean, (flat * flat).mean(1).sub_(mean * mean).clamp_min_(0.0)


def _forward_batches(models: Sequence[nn.Module], batches: Iterable, max_batches: int | None,
                     placement: Placement | None) -> int:
    """Run each batch's images through ``models`` in turn, no gradients; the number of batches read."""
    count = 0
    with torch.no_grad():
        for images, _ in itertools.islice(batches, max_batches):
            with (placement or Placement()).autocast():
                for model in models:
                    model(images)
            count += 1
    return count


def _set_statistics_(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    with torch.no_grad():
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_(var.to(norm.running_var.dtype))


def _norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _kept_index(norms: dict, ref_norms: dict, kept: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """The kept reference channels of each narrowed norm; refuses a width that matches neither."""
    index = {name: torch.as_tensor(list(kept[name]), dtype=torch.long) for name in norms if name in kept}
    for name, norm in norms.items():
        width = len(index[name]) if name in index else ref_norms[name].running_mean.numel()
        if width != norm.running_mean.numel():
            raise InvalidArgumentError(f"{name}: {norm.running_mean.numel()} channels, {width} in the reference; "
                                       "pass the kept channels of a narrowed layer in kept=")
    return index


def _corrected(mean_0: torch.Tensor, var_0: torch.Tensor, mean_ref: torch.Tensor, var_ref: torch.Tensor,
               mean_now: torch.Tensor, var_now: torch.Tensor, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics under which a norm's output on input moments ``(mean_now, var_now)`` has the
    per-channel mean and variance it had with ``(mean_0, var_0)`` on ``(mean_ref, var_ref)``;
    and the channels whose input did not move (they keep ``mean_0, var_0`` bit for bit)."""
    scale = torch.where(var_ref > 0, var_now / var_ref.clamp_min(1e-300), torch.ones_like(var_ref))
    var = ((var_0 + eps) * scale - eps).clamp_min(0.0)  # sqrt(var + eps) scales with the input's std
    # the output's mean (mean_ref - mean_0) / sqrt(var_0 + eps) is kept as well
    mean = mean_now - (mean_ref - mean_0) * ((var + eps) / (var_0 + eps)).sqrt()
    same = (mean_now == mean_ref) & (var_now == var_ref)
    return torch.where(same, mean_0, mean), torch.where(same, var_0, var), same


def shift_norms_(model: nn.Module, reference: nn.Module, batches: Iterable, *,
                 kept: Mapping[str, Sequence[int]] | None = None, max_batches: int | None = None,
                 placement: Placement | None = None) -> int:
    """Correct BatchNorm running statistics by the shift a structural change caused, in place.

    ``reference`` is the model before the change. On every batch both models run (eval mode,
    no gradients); each BatchNorm of ``model`` is given statistics under which its normalized
    output ``(x - mean) / sqrt(var + eps)`` has, per channel, the batch mean and variance the
    same layer of ``reference`` produced on that batch, and the final statistics are the
    average over the batches. Corrections are made in forward order within each batch, so
    a layer sees its inputs as already corrected upstream: one pass, like a BatchNorm in
    training mode. A layer whose input did not change keeps its statistics bit for bit,
    so an unchanged model is returned unchanged.

    Unlike a reset and re-estimate (:func:`recalibrate_norms_`), this keeps what the running
    statistics encode about the data the model was trained with: a model fine-tuned with
    frozen statistics (``norm_stats="frozen"``) depends on them, and re-estimating them on the
    target data can cost it most of its accuracy even when nothing was removed.

    Args:
        model: the changed (pruned) model; its BatchNorm names are those of ``reference``.
        reference: the model before the change (not modified).
        batches: ``(images, labels)`` batches, unaugmented.
        kept: BatchNorm name -> the original channels a narrowed layer kept (a plan's
            ``running_mean`` edits); absent: the layer kept every channel.
        max_batches: batches read (``None``: all).
        placement: autocast settings of the forward passes.

    Returns:
        The number of BatchNorm layers whose statistics changed.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
        ...                     nn.BatchNorm2d(4)).eval()
        >>> batches = [(torch.randn(8, 3, 8, 8), torch.zeros(8))]
        >>> import copy
        >>> changed = copy.deepcopy(net)
        >>> shift_norms_(changed, net, batches)  # nothing changed: nothing corrected
        0
        >>> with torch.no_grad():
        ...     _ = changed[0].weight.mul_(3.0)  # the first norm absorbs the scale
        >>> shift_norms_(changed, net, batches) >= 1
        True
        >>> torch.allclose(changed(batches[0][0]), net(batches[0][0]), atol=1e-5)
        True
    """
    norms, ref_norms = _norms(model), _norms(reference)
    norms = {name: norm for name, norm in norms.items() if name in ref_norms}
    if not norms:
        return 0
    index = _kept_index(norms, ref_norms, kept or {})
    original = {name: (norm.running_mean.detach().double().clone(), norm.running_var.detach().double().clone())
                for name, norm in norms.items()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    totals = {name: [torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m, dtype=torch.bool)]
              for name, (m, _) in original.items()}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            mean, var = _batch_moments(args[0])
            if name in index:
                mean, var = mean[index[name].to(mean.device)], var[index[name].to(mean.device)]
            seen[name] = (mean, var)
        return hook

    def correct(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            mean, var, same = _corrected(*original[name], *seen[name], *_batch_moments(args[0]), module.eps)
            total = totals[name]
            total[0] += mean
            total[1] += var
            total[2] |= ~same
            _set_statistics_(module, mean, var)  # what this batch is normalized with
        return hook

    handles = [ref_norms[name].register_forward_pre_hook(observe(name)) for name in norms]
    handles += [norm.register_forward_pre_hook(correct(name)) for name, norm in norms.items()]
    modes = [(m, m.training) for m in (*model.modules(), *reference.modules())]
    try:
        model.eval()
        reference.eval()
        count = _forward_batches((reference, model), batches, max_batches, placement)
    except BaseException:
        for name, norm in norms.items():  # leave the statistics as they were
            _set_statistics_(norm, *original[name])
        raise
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    changed = 0
    for name, norm in norms.items():
        mean_sum, var_sum, moved = totals[name]
        mean_0, var_0 = original[name]
        if not bool(moved.any()):  # also when no batch was read
            _set_statistics_(norm, mean_0, var_0)
            continue
        changed += 1
        _set_statistics_(norm, torch.where(moved, mean_sum / count, mean_0),
                         torch.where(moved, var_sum / count, var_0))
    return changed


def kept_channels(plan: Plan) -> dict[str, tuple[int, ...]]:
    """BatchNorm module name -> the original channels it kept, from a plan's ``running_mean`` edits.

    Example:
        >>> import graphprune as gp
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(2, 3, 4, 4)))
        >>> kept_channels(gp.make_plan(groups, removed={groups[0].id: (1,)}))
        {'1': (0, 2, 3)}
    """
    suffix = ".running_mean"
    return {edit.name[: -len(suffix)]: tuple(edit.keep) for edit in plan.edits if edit.name.endswith(suffix)}

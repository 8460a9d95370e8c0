"""FLOPs budgets for the fine granularities: the kernel keep ratio or the sparsity that removes a fraction of MACs.

A budget is a fraction of the model's MACs (:mod:`graphprune.measurement`, one fused
multiply-add = one MAC, ``flops = 2 * macs``) to remove, as in the channel recipes' ``flops_reduction``.

* **kernel**: about one keep ratio ``f`` for every dense conv, ``k = max(1, round(f * in))``; a
  conv of ``macs`` MACs then costs ``macs * k / in``. ``f`` is found by bisection on that closed
  form, the last step taken one kernel per output at a time, then the pruned model is measured
  with fvcore.
* **unstructured**, ``local``: one sparsity ``s = reduction * total / maskable`` in every layer.
  ``global``: one magnitude ranking of all weights, each weight costing its layer's MACs per
  weight (``H' * W'`` for a conv); the smallest weights are masked until their MACs reach the budget.
  The figure reported is :func:`~graphprune.sparsity.weights.effective_macs` (nonzero weights only).
* **channel** pruning is the recipes' own (``PruneConfig(flops_reduction=...)``); a uniform
  channel ratio ``r`` removes about ``1 - (1 - r) ** 2`` of a conv's MACs (inputs and outputs
  shrink), hence the ``1 - sqrt(1 - X)`` per-layer rate of the papers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..measurement import analyze_macs, count_macs
from .kernel_masks import kernel_convs_from_masks_, kernel_masks_  # noqa: F401  (kernel_convs_from_masks_: example)
from .kernel_plan import KernelPlan, dense_convs, kernel_prune_
from .unstructured import SCOPES, SparsityReport, check_choice, magnitude_masks_
from .weights import effective_macs, effective_weight, resolve_modules


@dataclass(frozen=True)
class BudgetResult:
    """A fine-granularity pruning at a FLOPs budget, measured.

    Attributes:
        granularity: ``"kernel"`` or ``"unstructured"``.
        target_flops_reduction: the fraction of MACs asked to go.
        flops_reduction: the fraction measured (effective MACs for unstructured).
        macs_before: MACs of the model before.
        macs_after: MACs after (kernel: what fvcore counts; unstructured: nonzero-weight MACs).
        weight_sparsity: the fraction of the pruned layers' weights that are zero by the pruning
            (kernel: ``1 -`` the fraction of kernels kept).
    """

    granularity: str
    target_flops_reduction: float
    flops_reduction: float
    macs_before: int
    macs_after: int
    weight_sparsity: float


def check_reduction(value: float) -> float:
    """``value`` if it is a fraction of MACs in ``(0, 1)``.

    Example:
        >>> check_reduction(0.0)
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: flops_reduction must be a fraction of the MACs in (0, 1), got 0.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InvalidArgumentError(f"flops_reduction must be a fraction of the MACs in (0, 1), got {value!r}")
    return float(value)


def _counts_at(layers: dict[str, tuple[int, int, int]], keep_ratio: float) -> dict[str, int]:
    """``{name: k}`` at one keep ratio; ``layers``: ``{name: (macs, in_channels, out_channels)}``."""
    return {name: max(1, round(keep_ratio * cin)) for name, (_, cin, _) in layers.items()}


def _removed(layers: dict[str, tuple[int, int, int]], counts: dict[str, int]) -> int:
    return sum(macs - macs * counts[name] // cin for name, (macs, cin, _) in layers.items())


def _kernel_counts(layers: dict[str, tuple[int, int, int]], wanted: float) -> dict[str, int]:
    """Per-layer ``k`` removing about ``wanted`` MACs: one keep ratio by bisection, then single kernels.

    One ratio moves every layer's ``k`` at once (channel counts are often powers of two), so the
    ratio lands within a step of the budget; the remainder is taken one kernel per output at a
    time, from the layer keeping the largest fraction among those whose step fits in what is
    left (else the smallest step), and the count closest to the budget wins.
    """
    low, high = 0.0, 1.0  # removed(low) >= wanted > removed(high) = 0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if _removed(layers, _counts_at(layers, middle)) >= wanted else (low, middle)
    counts = _counts_at(layers, high)
    best = dict(counts)
    while (gap := wanted - _removed(layers, counts)) > 0:
        open_ = [n for n in counts if counts[n] > 1]
        if not open_:
            break
        fits = [n for n in open_ if layers[n][0] / layers[n][1] <= gap]  # one kernel per output of n: macs / in
        name = (max(fits, key=lambda n: counts[n] / layers[n][1]) if fits
                else min(open_, key=lambda n: layers[n][0] / layers[n][1]))
        best = dict(counts)
        counts[name] -= 1
    if abs(_removed(layers, counts) - wanted) <= abs(_removed(layers, best) - wanted):
        best = counts
    return best


def _kernel_budget(model: nn.Module, example_inputs, flops_reduction: float, ignore: Iterable[str] | None):
    """The checked target, the MAC count, the dense convs, their ``(macs, in, out)`` and the
    kernels per output channel that remove ``flops_reduction`` of the MACs; refuses a budget
    beyond one kernel per output."""
    target = check_reduction(flops_reduction)
    count = analyze_macs(model, example_inputs)
    convs = dense_convs(model, ignore)
    layers = {name: (count.macs_by_module.get(name, 0), conv.in_channels, conv.out_channels)
              for name, conv in convs.items()}
    wanted = target * count.macs
    most = _removed(layers, _counts_at(layers, 0.0))
    if wanted > most:
        raise InvalidArgumentError(f"the dense convs can give at most {most / count.macs:.3f} of the MACs "
                                   f"(one kernel per output), less than flops_reduction={target}")
    return target, count, convs, layers, _kernel_counts(layers, wanted)


def kernel_prune_to_flops_(model: nn.Module, example_inputs, flops_reduction: float, *, signal: str = "magnitude",
                           ignore: Iterable[str] | None = None, seed: int = 0) -> tuple[KernelPlan, BudgetResult]:
    """Kernel-prune every dense conv, about one keep ratio for all, so that ``flops_reduction`` of the MACs go.

    ``BudgetResult.weight_sparsity`` is the fraction of the dense convs' kernels removed.

    Raises:
        InvalidArgumentError: the dense convs hold fewer MACs than the budget asks for.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> plan, result = kernel_prune_to_flops_(model, torch.zeros(1, 3, 64, 64), 0.5)
        >>> abs(result.flops_reduction - 0.5) < 0.005
        True
    """
    target, count, _, layers, counts = _kernel_budget(model, example_inputs, flops_reduction, ignore)
    plan = kernel_prune_(model, counts, signal=signal, seed=seed)
    after = count_macs(model, example_inputs)
    kept = sum(counts[n] * layers[n][2] for n in counts) / sum(cin * cout for _, cin, cout in layers.values())
    return plan, BudgetResult("kernel", target, 1.0 - after / count.macs, count.macs, after, 1.0 - kept)


def kernel_masks_to_flops_(model: nn.Module, example_inputs, flops_reduction: float, *, signal: str = "magnitude",
                           ignore: Iterable[str] | None = None, seed: int = 0) -> tuple[dict[str, int], BudgetResult]:
    """As :func:`kernel_prune_to_flops_`, as kernel-shaped masks on the dense convs (to train at dense speed).

    ``BudgetResult.macs_after`` is the MACs of the kept kernels, equal to what the
    :class:`~graphprune.sparsity.kernel_conv.KernelConv2d` form counts
    (:func:`~graphprune.sparsity.kernel_masks.kernel_convs_from_masks_` makes it); a weight
    that is exactly zero inside a kept kernel still counts, as it does in that form.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> x = torch.zeros(1, 3, 64, 64)
        >>> counts, result = kernel_masks_to_flops_(model, x, 0.5)
        >>> _ = kernel_convs_from_masks_(model)
        >>> count_macs(model, x) == result.macs_after
        True
    """
    target, count, _, layers, wanted_counts = _kernel_budget(model, example_inputs, flops_reduction, ignore)
    counts = kernel_masks_(model, wanted_counts, signal=signal, seed=seed)
    after = count.macs - _removed({name: layers[name] for name in counts}, counts)
    kept = sum(counts[n] * layers[n][2] for n in counts) / sum(cin * cout for _, cin, cout in layers.values())
    return counts, BudgetResult("kernel", target, 1.0 - after / count.macs, count.macs, after, 1.0 - kept)


def global_sparsity_for_macs(modules: dict[str, nn.Module], macs_by_module: dict[str, int], wanted_macs: float
                             ) -> float:
    """Sparsity of one ``|w|`` ranking over ``modules`` whose masked weights' MACs first reach ``wanted_macs``.

    Each weight of a layer costs the layer's MACs divided by its weight count.

    Example:
        >>> layers = {"a": nn.Linear(10, 10), "b": nn.Linear(10, 10)}
        >>> global_sparsity_for_macs(layers, {"a": 100, "b": 1000}, 250.0) <= 0.5
        True
    """
    wanted = wanted_macs
    magnitudes, costs = [], []
    for name, module in modules.items():
        weight = effective_weight(module).abs().flatten().double().cpu()
        magnitudes.append(weight)
        costs.append(torch.full_like(weight, macs_by_module.get(name, 0) / weight.numel()))
    magnitude, cost = torch.cat(magnitudes), torch.cat(costs)
    order = torch.argsort(magnitude, stable=True)
    cumulative = torch.cumsum(cost[order], 0)
    count = int(torch.searchsorted(cumulative, torch.tensor([wanted], dtype=cumulative.dtype)).item()) + 1
    return min(count, magnitude.numel()) / magnitude.numel()


def unstructured_to_flops_(model: nn.Module, example_inputs, flops_reduction: float, *, scope: str = "local",
                           signal: str = "magnitude", ignore: Iterable[str] | None = None, seed: int = 0
                           ) -> tuple[SparsityReport, BudgetResult]:
    """Mask Conv2d / Linear weights so that their zero weights account for ``flops_reduction`` of the MACs.

    ``global`` ranks by magnitude (with ``signal="random"`` use ``local``: a random global mask
    is a uniform one).

    Raises:
        InvalidArgumentError: the maskable layers hold fewer MACs than the budget asks for.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> report, result = unstructured_to_flops_(model, torch.zeros(1, 3, 64, 64), 0.5, scope="global")
        >>> abs(result.flops_reduction - 0.5) < 0.005
        True
    """
    target = check_reduction(flops_reduction)
    check_choice(scope, SCOPES, "scope")
    if scope == "global" and signal != "magnitude":
        raise InvalidArgumentError("a global budget ranks by magnitude; use scope='local' for signal='random'")
    count = analyze_macs(model, example_inputs)
    modules = resolve_modules(model, None, ignore)
    maskable = sum(count.macs_by_module.get(name, 0) for name in modules)
    wanted = target * count.macs
    if wanted >= maskable:
        raise InvalidArgumentError(f"the maskable layers hold {maskable / count.macs:.3f} of the MACs, not more "
                                   f"than flops_reduction={target}")
    if scope == "local":
        sparsity = wanted / maskable
    else:
        sparsity = global_sparsity_for_macs(modules, count.macs_by_module, wanted)
    report = magnitude_masks_(model, sparsity, scope=scope, signal=signal, modules=list(modules), seed=seed)
    after = effective_macs(model, example_inputs, modules)
    return report, BudgetResult("unstructured", target, 1.0 - after / count.macs, count.macs, after, report.sparsity)

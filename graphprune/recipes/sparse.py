"""The kernel and unstructured granularities of the recipes' pruning stage (``PruneConfig.granularity``).

Zero-shot structured pruning of a pretrained model at a FLOPs budget (*Towards compute-optimal
transfer learning*: channel vs kernel vs unstructured, magnitude vs random) and sparse transfer
by linear probing vs full fine-tuning (*How well do sparse ImageNet models transfer?*) are
options of the existing recipes, not recipes of their own::

    prune = PruneConfig(granularity="kernel", scorer="l1", flops_reduction=0.5)
    sp_t(model, data, TransferConfig(prune=prune, target=FinetuneConfig(epochs=5, mode="linear")))

What this module adds to the stages of :mod:`.pipelines`:

* :func:`sparse_prune_` is the ``prune`` stage for ``"kernel"`` and ``"unstructured"``:
  :mod:`graphprune.sparsity` masks the model to the budget (``torch.nn.utils.prune``
  reparametrizations; kernel-shaped for ``"kernel"``, the same function as the gather + grouped
  conv at dense-kernel speed). The selection reads only the weights (and the run's seed for
  ``random``), so every DDP rank computes the same masks on its identical copy: no plan is
  shipped. ``gradual=True`` installs masks of ones and leaves the sparsity to the next stage.
* :func:`gradual_pruner` grows those masks during the fine-tuning after pruning along GMP's
  cubic schedule (the final sparsity was fixed by the budget in the ``prune`` stage's record, so
  a resumed run rebuilds the same schedule).
* :func:`sparse_finish_` ends that fine-tuning stage: unless ``keep_masks``, the masks are made
  permanent (plain zeros, unstructured) or the kernel-masked convs become
  :class:`~graphprune.sparsity.KernelConv2d` layers (kernel), the deployed form that
  :func:`graphprune.io.save` writes; the record gets the sparsity and the *effective* FLOPs
  reduction (nonzero-weight MACs, the sparse literature's figure), while its ``macs`` is what the
  model executes (a dense kernel runs every MAC of an unstructured model).

Masked stage checkpoints are handled by :class:`~graphprune.recipes.checkpoint.StageStore` (the
permanent form plus the masks). :func:`sparse_sp_t` / :class:`SparseTransferConfig` are the
earlier spelling of ``sp_t`` with these options, kept for the benchmark scripts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError
from ..groups import classifier_names
from ..measurement import analyze_macs, count_macs, count_params
from ..sparsity import (GradualPruner, GradualSchedule, effective_macs, install_masks_, kernel_convs_from_masks_,
                        kernel_mask_index, kernel_masks_to_flops_, make_permanent_, maskable_modules,
                        overall_sparsity, unstructured_to_flops_)
from ..sparsity.budget import global_sparsity_for_macs
from .config import HEAD_INITS, FinetuneConfig, PruneConfig, RunConfig, TransferConfig
from .prune_config import GRANULARITIES
from .device import Placement
from .records import RecipeResult, StageRecord

SIGNALS = ("magnitude", "random")


def sparse_prune_(model: nn.Module, example_inputs, config: PruneConfig, *, seed: int = 0) -> dict[str, Any]:
    """Mask ``model`` in place to ``config.flops_reduction`` at ``config.granularity`` (kernel or unstructured).

    Deterministic given the weights and ``seed``: every DDP rank masks its copy the same way.

    Args:
        model: the model, with its target classifier (left dense).
        example_inputs: a batch to count MACs on.
        config: granularity, budget, signal (``scorer``), scope, gradual.
        seed: seed of the ``random`` signal.

    Returns:
        The stage's details: granularity, signal, scope, the target and the measured (effective)
        ``flops_reduction``, ``effective_macs``, ``sparsity`` (of the maskable layers' weights),
        ``keep_ratio`` (kernel), ``gradual_final_sparsity`` (gradual: measured 0 until the next stage).

    Raises:
        InvalidArgumentError: ``granularity="channel"``, or the budget is out of the layers' reach.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
        >>> config = PruneConfig(granularity="unstructured", flops_reduction=0.5)
        >>> round(sparse_prune_(model, torch.zeros(1, 3, 32, 32), config)["flops_reduction"], 2)
        0.5
    """
    if config.granularity not in GRANULARITIES[1:]:
        raise InvalidArgumentError(f"sparse_prune_ prunes kernels or single weights, not {config.granularity!r} "
                                   "(channels go through the engine's plan: prune_stage_)")
    ignore = classifier_names(model)
    details: dict[str, Any] = {"granularity": config.granularity, "signal": config.signal, "scope": config.scope,
                               "target_flops_reduction": config.flops_reduction}
    if config.granularity == "kernel":
        _, budget = kernel_masks_to_flops_(model, example_inputs, config.flops_reduction, signal=config.signal,
                                           ignore=ignore, seed=seed)
        details.update(keep_ratio=1.0 - budget.weight_sparsity, effective_macs=budget.macs_after,
                       flops_reduction=budget.flops_reduction,
                       sparsity=overall_sparsity(maskable_modules(model, ignore)))
        return details
    if not config.gradual:
        report, budget = unstructured_to_flops_(model, example_inputs, config.flops_reduction, scope=config.scope,
                                                signal=config.signal, ignore=ignore, seed=seed)
        details.update(sparsity=report.sparsity, effective_macs=budget.macs_after,
                       flops_reduction=budget.flops_reduction)
        return details
    # gradual: the final sparsity the budget needs on today's weights, reached during the next stage
    count = analyze_macs(model, example_inputs)
    modules = maskable_modules(model, ignore)
    wanted = config.flops_reduction * count.macs
    maskable = sum(count.macs_by_module.get(name, 0) for name in modules)
    if wanted >= maskable:
        raise InvalidArgumentError(f"the maskable layers hold {maskable / count.macs:.3f} of the MACs, not more than "
                                   f"flops_reduction={config.flops_reduction}")
    final = (wanted / maskable if config.scope == "local"
             else global_sparsity_for_macs(modules, count.macs_by_module, wanted))
    install_masks_(modules)  # masks of ones: the checkpoint of this stage already has the masked form
    details.update(gradual_final_sparsity=final, sparsity=0.0, effective_macs=count.macs, flops_reduction=0.0)
    return details


def gradual_pruner(model: nn.Module, prune_details: dict[str, Any], config: PruneConfig, steps: int, *,
                   seed: int = 0) -> GradualPruner | None:
    """The :class:`~graphprune.sparsity.GradualPruner` of a ``gradual`` config for a stage of ``steps`` steps.

    Args:
        model: the model the ``prune`` stage masked (trained now or loaded from its checkpoint).
        prune_details: that stage's ``details`` (its ``gradual_final_sparsity``).
        config: the pruning config; ``None`` is returned unless ``config.gradual``.
        steps: optimizer steps of the stage; the final sparsity is reached at
            ``round(gradual_end_fraction * steps)``.
        seed: seed of the ``random`` signal.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
        >>> config = PruneConfig(granularity="unstructured", flops_reduction=0.5, gradual=True)
        >>> details = sparse_prune_(model, torch.zeros(1, 3, 32, 32), config)
        >>> gradual_pruner(model, details, config, steps=10).schedule.end_step
        8
    """
    if not config.gradual:
        return None
    schedule = GradualSchedule(final_sparsity=prune_details["gradual_final_sparsity"],
                               end_step=max(1, round(config.gradual_end_fraction * steps)), scope=config.scope)
    return GradualPruner(model, schedule, modules=list(maskable_modules(model, classifier_names(model))),
                         signal=config.signal, seed=seed)


def deploy_(model: nn.Module, granularity: str) -> None:
    """The exportable form of a masked model, in place: kernel-masked convs become ``KernelConv2d``
    (the ``graphprune.kernels/1`` plan recorded), every other mask is folded into plain zeros.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
        >>> _ = sparse_prune_(model, torch.zeros(1, 3, 32, 32), PruneConfig(granularity="kernel", flops_reduction=0.3))
        >>> deploy_(model, "kernel")
        >>> any(type(m).__name__ == "KernelConv2d" for m in model.modules())
        True
    """
    if granularity == "kernel" and any(kernel_mask_index(m) is not None for m in model.modules()):
        kernel_convs_from_masks_(model)
    make_permanent_(model)


def sparse_finish_(model: nn.Module, record: StageRecord, config: PruneConfig, example_inputs, base_macs: int,
                   placement: Placement | None = None) -> StageRecord:
    """End the fine-tuning after a kernel / unstructured pruning: the deployed form (unless
    ``config.keep_masks``) and the record with what the model costs.

    Returns:
        ``record`` with ``macs`` / ``params`` of the returned form and ``details`` holding the
        granularity, the weight ``sparsity`` of the maskable layers, ``effective_macs`` and the
        effective ``flops_reduction`` from ``base_macs``.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
        >>> x = torch.zeros(1, 3, 32, 32)
        >>> config = PruneConfig(granularity="kernel", flops_reduction=0.5)
        >>> _ = sparse_prune_(model, x, config)
        >>> record = sparse_finish_(model, StageRecord("target", "finetune", 0.5, 0, 0, 0.0), config, x,
        ...                         count_macs(timm.create_model("test_resnet", num_classes=2), x))
        >>> record.macs == count_macs(model, x), round(record.details["flops_reduction"], 2)
        (True, 0.5)
    """
    modules = maskable_modules(model, classifier_names(model))
    details = {**record.details, "granularity": config.granularity, "sparsity": overall_sparsity(modules)}
    if not config.keep_masks:
        deploy_(model, config.granularity)
        if placement is not None:
            placement.model_(model)  # new KernelConv2d modules take the run's layout
    after = effective_macs(model, example_inputs, maskable_modules(model, classifier_names(model)))
    details.update(effective_macs=after, flops_reduction=1.0 - after / base_macs if base_macs else 0.0)
    return dataclasses.replace(record, macs=int(count_macs(model, example_inputs)), params=int(count_params(model)),
                               details=details)


@dataclass(frozen=True)
class SparseTransferConfig:
    """The earlier spelling of SP->T with a granularity; :meth:`transfer_config` is what runs.

    Prefer ``TransferConfig(prune=PruneConfig(granularity=..., scorer="l1" | "random",
    flops_reduction=...))`` with :func:`~graphprune.recipes.sp_t` (or ``s_tp_t``): the same
    stages, checkpoints and resume. Fields map one to one: ``signal`` ``"magnitude"`` /
    ``"random"`` is ``scorer`` ``"l1"`` / ``"random"``; the rest keep their names.
    """

    granularity: str = "kernel"
    flops_reduction: float = 0.5
    signal: str = "magnitude"
    scope: str = "local"
    gradual: bool = False
    gradual_end_fraction: float = 0.8
    target: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=5.0))
    run: RunConfig = field(default_factory=RunConfig)
    head_init: str = "probe"
    recalibrate_batches: int | None = 16
    keep_masks: bool = False

    def __post_init__(self) -> None:
        for name, value, choices in (("signal", self.signal, SIGNALS), ("head_init", self.head_init, HEAD_INITS)):
            if value not in choices:
                raise InvalidArgumentError(f"SparseTransferConfig.{name} must be one of {choices}, got {value!r}")
        self.transfer_config()  # PruneConfig / TransferConfig check the rest

    def transfer_config(self) -> TransferConfig:
        """The :class:`TransferConfig` that :func:`~graphprune.recipes.sp_t` runs.

        Example:
            >>> SparseTransferConfig(granularity="channel", signal="random").transfer_config().prune.scorer
            'random'
        """
        prune = PruneConfig(scorer="l1" if self.signal == "magnitude" else "random",
                            flops_reduction=self.flops_reduction, scope=self.scope, granularity=self.granularity,
                            gradual=self.gradual, gradual_end_fraction=self.gradual_end_fraction,
                            keep_masks=self.keep_masks, recalibrate_batches=self.recalibrate_batches)
        return TransferConfig(prune=prune, target=self.target, run=self.run, head_init=self.head_init)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict.

        Example:
            >>> SparseTransferConfig().to_dict()["granularity"]
            'kernel'
        """
        return asdict(self)


def sparse_sp_t(model: nn.Module, data, config: SparseTransferConfig | None = None
                ) -> tuple[nn.Module, RecipeResult]:
    """``sp_t(model, data, config.transfer_config())``: the earlier entry point, kept as a thin alias.

    Example:
        >>> SparseTransferConfig(granularity="unstructured").transfer_config().prune.granularity
        'unstructured'
    """
    from .pipelines import sp_t

    return sp_t(model, data, (config or SparseTransferConfig()).transfer_config())

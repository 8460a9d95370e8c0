"""SP->T at a FLOPs budget with the granularity as an option: channel, kernel or unstructured.

Zero-shot structured pruning of a pretrained model (*Towards compute-optimal transfer
learning*) and sparse transfer by linear probing vs full fine-tuning (*How well do sparse
ImageNet models transfer?*) in one recipe, :func:`sparse_sp_t`:

* ``granularity="channel"`` is :func:`~graphprune.recipes.sp_t` itself (``PruneConfig(scorer=
  "l1" or "random", flops_reduction=...)``).
* ``"kernel"`` and ``"unstructured"`` follow the same stages: the source model gets the
  target's classifier, fitted as a linear probe on the *unpruned* features (stage ``probe``, by
  :func:`~graphprune.recipes.s_to_t` with no fine-tuning, as SP->T does before pruning), then
  :mod:`graphprune.sparsity` prunes it to the budget (stage ``prune``: BatchNorm statistics
  re-estimated as in SP->T), then :func:`~graphprune.recipes.finetune_` trains it (stage
  ``target``: ``mode="full"`` or ``"linear"``, ``epochs=0`` is zero-shot).
* Both are ``torch.nn.utils.prune`` masks while the model trains (kernel-shaped for
  ``"kernel"``: the dense conv with its removed kernels zero is the same function, and trains
  at dense speed), so ``finetune_`` keeps them unchanged; ``gradual=True`` instead grows
  unstructured masks during ``target`` along GMP's cubic schedule. Unless ``keep_masks=True``
  the returned model has them made permanent: plain zero weights (unstructured), or
  :class:`~graphprune.sparsity.KernelConv2d` layers, gather + grouped conv (kernel).

Every stage's ``details`` holds the granularity and the measured ``flops_reduction``; for
unstructured masks that is of the *effective* MACs (nonzero weights only), while ``macs`` is
what a dense kernel still executes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..groups import classifier_names
from ..measurement import count_macs, count_params
from ..sparsity import (GradualPruner, GradualSchedule, check_reduction, effective_macs, kernel_convs_from_masks_,
                        kernel_masks_to_flops_, make_permanent_, maskable_modules, overall_sparsity,
                        unstructured_to_flops_)
from ..sparsity.budget import global_sparsity_for_macs
from .config import HEAD_INITS, FinetuneConfig, PruneConfig, RunConfig, TransferConfig
from .data import TransferData
from .device import Placement
from .distributed import context, rank_device
from .finetune import finetune_, measure_record, seed_everything, stage_steps
from .pipelines import on_device, s_to_t, sp_t
from .records import RecipeResult, StageRecord
from .stages import recalibrate_after_removal_

GRANULARITIES = ("channel", "kernel", "unstructured")
SIGNALS = ("magnitude", "random")


@dataclass(frozen=True)
class SparseTransferConfig:
    """SP->T with a choice of granularity.

    Attributes:
        granularity: ``"channel"`` (whole channels, a smaller dense model), ``"kernel"`` (k of the
            ``kh x kw`` kernels per output channel, a gather + grouped conv) or ``"unstructured"``
            (single weights, masks).
        flops_reduction: fraction of the MACs to remove, in (0, 1); for unstructured, of the
            effective (nonzero-weight) MACs.
        signal: ``"magnitude"`` (channel: the ``l1`` scorer) or ``"random"``: the two signals of the paper.
        scope: unstructured only: ``"local"`` (the same sparsity in every layer) or ``"global"``
            (one magnitude ranking, each weight costing its layer's MACs per weight).
        gradual: unstructured only: grow the masks during ``target`` (GMP) instead of one shot
            before it; needs ``target.epochs > 0`` and ``target.mode="full"``.
        gradual_end_fraction: the fraction of the ``target`` steps at which the final sparsity is reached.
        target: the fine-tuning after pruning; ``mode="linear"`` probes the frozen sparse
            backbone, ``"full"`` fine-tunes it with the masks kept, ``epochs=0`` is zero-shot.
        run: seed, progress, device (``checkpoint_dir`` only with ``"channel"``).
        head_init: ``"probe"`` (the classifier fitted on the unpruned features first) or ``"random"``.
        recalibrate_batches: BatchNorm re-estimate after pruning, as :attr:`PruneConfig.recalibrate_batches`.
        keep_masks: kernel and unstructured: return the model with its ``torch.nn.utils.prune``
            masks (to train on, or to evaluate at dense-kernel speed) instead of permanent zeros
            or ``KernelConv2d`` layers (to save and deploy).
    """

    granularity: str = "kernel"
    flops_reduction: float = 0.5
    signal: str = "magnitude"
    scope: str = "local"
    gradual: bool = False
    gradual_end_fraction: float = 0.8
    target: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=5.0, norm_stats="train"))
    run: RunConfig = field(default_factory=RunConfig)
    head_init: str = "probe"
    recalibrate_batches: int | None = 16
    keep_masks: bool = False

    def __post_init__(self) -> None:
        for name, value, choices in (("granularity", self.granularity, GRANULARITIES),
                                     ("signal", self.signal, SIGNALS), ("scope", self.scope, ("local", "global")),
                                     ("head_init", self.head_init, HEAD_INITS)):
            if value not in choices:
                raise InvalidArgumentError(f"SparseTransferConfig.{name} must be one of {choices}, got {value!r}")
        check_reduction(self.flops_reduction)
        if self.granularity != "unstructured" and (self.gradual or self.scope != "local"):
            raise InvalidArgumentError("SparseTransferConfig.gradual and scope apply to "
                                       f"granularity='unstructured', not {self.granularity!r}")
        if self.granularity == "channel" and self.keep_masks:
            raise InvalidArgumentError("SparseTransferConfig.keep_masks applies to granularity 'kernel' and "
                                       "'unstructured'; channel pruning leaves no mask")
        if self.scope == "global" and self.signal == "random":
            raise InvalidArgumentError("a global ranking is by magnitude; use scope='local' with signal='random'")
        if self.gradual and (self.target.epochs == 0 or self.target.mode != "full"):
            raise InvalidArgumentError("gradual pruning happens while the backbone trains: it needs target.epochs > 0 "
                                       "and target.mode='full'")
        if not 0.0 < self.gradual_end_fraction <= 1.0:
            raise InvalidArgumentError(f"SparseTransferConfig.gradual_end_fraction must be in (0, 1], got "
                                       f"{self.gradual_end_fraction!r}")
        if self.granularity != "channel" and self.run.checkpoint_dir is not None:
            raise InvalidArgumentError("stage checkpoints are written for granularity='channel' only; set "
                                       "RunConfig(checkpoint_dir=None) and save the result with graphprune.io.save")
        self.transfer_config()  # the channel path's own checks (recalibrate_batches, ...)

    def transfer_config(self) -> TransferConfig:
        """The :class:`TransferConfig` of the ``channel`` path (and of the probe of the others).

        Example:
            >>> SparseTransferConfig(granularity="channel", signal="random").transfer_config().prune.scorer
            'random'
        """
        prune = PruneConfig(scorer="l1" if self.signal == "magnitude" else "random",
                            flops_reduction=self.flops_reduction, recalibrate_batches=self.recalibrate_batches)
        return TransferConfig(prune=prune, target=self.target, run=self.run, head_init=self.head_init)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict.

        Example:
            >>> SparseTransferConfig().to_dict()["granularity"]
            'kernel'
        """
        return asdict(self)


def _prune(model: nn.Module, data: TransferData, config: SparseTransferConfig, placement: Placement
           ) -> tuple[dict, GradualPruner | None]:
    """Prune ``model`` in place to the budget; the details for the record, and the pruner of a gradual run."""
    example = data.example_inputs()
    ignore = classifier_names(model)
    details: dict = {"granularity": config.granularity, "signal": config.signal,
                     "target_flops_reduction": config.flops_reduction}
    if config.granularity == "kernel":
        _, budget = kernel_masks_to_flops_(model, example, config.flops_reduction, signal=config.signal,
                                           ignore=ignore, seed=config.run.seed)
        details.update(keep_ratio=1.0 - budget.weight_sparsity, effective_macs=budget.macs_after,
                       flops_reduction=budget.flops_reduction,
                       sparsity=overall_sparsity(maskable_modules(model, ignore)))
        return details, None
    details["scope"] = config.scope
    if not config.gradual:
        report, budget = unstructured_to_flops_(model, example, config.flops_reduction, scope=config.scope,
                                                signal=config.signal, ignore=ignore, seed=config.run.seed)
        details.update(sparsity=report.sparsity, effective_macs=budget.macs_after,
                       flops_reduction=budget.flops_reduction)
        return details, None
    # gradual: the final sparsity the budget needs on today's weights, reached during ``target``
    from ..measurement import analyze_macs

    count = analyze_macs(model, example)
    modules = maskable_modules(model, ignore)
    wanted = config.flops_reduction * count.macs
    maskable = sum(count.macs_by_module.get(name, 0) for name in modules)
    if wanted >= maskable:
        raise InvalidArgumentError(f"the maskable layers hold {maskable / count.macs:.3f} of the MACs, not more than "
                                   f"flops_reduction={config.flops_reduction}")
    final = (wanted / maskable if config.scope == "local"
             else global_sparsity_for_macs(modules, count.macs_by_module, wanted))
    loader_batches = len(data.train)
    steps = stage_steps(config.target, loader_batches)
    schedule = GradualSchedule(final_sparsity=final, end_step=max(1, round(config.gradual_end_fraction * steps)),
                               scope=config.scope)
    pruner = GradualPruner(model, schedule, modules=list(modules), signal=config.signal, seed=config.run.seed)
    details.update(gradual_final_sparsity=final, gradual_end_step=schedule.end_step, sparsity=0.0,
                   effective_macs=count.macs, flops_reduction=0.0)
    return details, pruner


def sparse_sp_t(model: nn.Module, data: TransferData, config: SparseTransferConfig | None = None
                ) -> tuple[nn.Module, RecipeResult]:
    """SP->T at ``config.flops_reduction`` with ``config.granularity``: probe, prune, fine-tune.

    Args:
        model: the source (pretrained) timm model; not modified.
        data: the target task.
        config: granularity, budget, signal and the ``target`` fine-tuning; ``None``: the defaults.

    Returns:
        The pruned (fine-tuned) model and the record (stages ``probe``, ``prune``, ``target``).

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> data = TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b"))
        >>> config = SparseTransferConfig(granularity="unstructured", flops_reduction=0.5,
        ...                               target=FinetuneConfig(epochs=1), run=RunConfig(progress=False))
        >>> pruned, result = sparse_sp_t(timm.create_model("resnet18", pretrained=False), data, config)
        >>> [s.name for s in result.stages], round(result.final.details["flops_reduction"], 2)
        (['probe', 'prune', 'target'], 0.5)
    """
    config = config or SparseTransferConfig()
    if config.granularity == "channel":
        return sp_t(model, data, config.transfer_config())
    run = config.run
    # the probe on the unpruned features, as SP->T fits it before pruning
    probe_config = TransferConfig(source=FinetuneConfig(epochs=0), run=run, head_init=config.head_init)
    probed, probe_result = s_to_t(model, data, probe_config)
    resolved = Placement.resolve(probed, run.device, run.precision, run.channels_last)
    ctx = context(resolved.device)
    placement = Placement(rank_device(resolved.device), resolved.bf16, resolved.channels_last)
    data = on_device(data, placement)
    model = placement.model_(probed)
    seed_everything(run.seed)
    progress = run.progress and ctx.is_main

    start = time.perf_counter()
    details, pruner = _prune(model, data, config, placement)
    placement.model_(model)  # new modules take the run's layout
    details["recalibrated_norms"] = recalibrate_after_removal_(model, data, config.recalibrate_batches, placement)
    pruned = measure_record(model, data, "prune", "prune", time.perf_counter() - start, ctx=ctx, placement=placement)
    pruned = dataclasses.replace(pruned, details=details)

    if pruner is not None:
        with pruner.attached():
            target = finetune_(model, data, config.target, name="target", ctx=ctx, seed=run.seed, progress=progress,
                               placement=placement)
    else:
        target = finetune_(model, data, config.target, name="target", ctx=ctx, seed=run.seed, progress=progress,
                           placement=placement)
    example = data.example_inputs()
    modules = maskable_modules(model, classifier_names(model))
    target_details = {**target.details, "granularity": config.granularity, "sparsity": overall_sparsity(modules)}
    if not config.keep_masks:
        if config.granularity == "kernel":
            kernel_convs_from_masks_(model)  # the deployed form: gather + grouped conv, on the plan history
            placement.model_(model)
        else:
            make_permanent_(model)
    after = effective_macs(model, example, maskable_modules(model, classifier_names(model)))
    target_details.update(effective_macs=after, flops_reduction=1.0 - after / probe_result.base_macs)
    target = dataclasses.replace(target, macs=int(count_macs(model, example)), params=int(count_params(model)),
                                 details=target_details)
    stages = (*[s for s in probe_result.stages if s.name == "probe"], pruned, target)
    result = RecipeResult(recipe=f"SP->T/{config.granularity}", stages=tuple(stages),
                          base_macs=probe_result.base_macs, config=config.to_dict())
    return model.to(memory_format=torch.contiguous_format), result  # as the other recipes return theirs
